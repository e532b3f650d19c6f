"""A node app hosting only the Counter agent type (``--app tests.stateful_counter``)."""

from tests.stateful import Counter

agents = [Counter]
