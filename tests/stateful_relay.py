"""A node app hosting only the Relay agent type (``--app tests.stateful_relay``)."""

from tests.stateful import Relay

agents = [Relay]
