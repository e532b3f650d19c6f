"""The node app of tests/test_scale_out.py (``--app tests.scale_out_app``): capability
tasks (``whoami``) and addressed, stateful counters (``increment`` tasks, ``send``
messages) on the same nodes, so one stream of work exercises both planes."""

from tests.agents import Toolbox
from tests.stateful import Counter

agents = [Toolbox, Counter]
