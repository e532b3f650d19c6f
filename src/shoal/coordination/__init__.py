"""Coordination between processes through the engine: rate limiting, locks with
fencing tokens and leader election; caches, configuration and sagas belong here
too (DESIGN.md §3)."""

from shoal.coordination.config import ConfigChange, ConfigConflict, ConfigEntry, ConfigView
from shoal.coordination.leader import Leadership
from shoal.coordination.lock import Lock, LockHolder
from shoal.coordination.ratelimit import RateDecision, TokenBucket

__all__ = ["Leadership", "Lock", "LockHolder", "RateDecision", "TokenBucket"]
__all__ += ["ConfigChange", "ConfigConflict", "ConfigEntry", "ConfigView"]
