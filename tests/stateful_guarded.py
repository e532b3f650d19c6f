"""A node app hosting Counter and Guarded (``--app tests.stateful_guarded``): the
rebalancing test's nodes, whose traffic goes to Guarded agents."""

from tests.stateful import Counter, Guarded

agents = [Counter, Guarded]
