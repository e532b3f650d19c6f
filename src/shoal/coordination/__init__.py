"""Coordination between processes through the engine: rate limiting, locks with
fencing tokens and leader election; caches, configuration and sagas belong here
too (DESIGN.md §3)."""

from shoal.coordination.cache import Cache, CacheOptions
from shoal.coordination.config import ConfigChange, ConfigConflict, ConfigEntry, ConfigView
from shoal.coordination.leader import Leadership
from shoal.coordination.lock import Lock, LockHolder
from shoal.coordination.ratelimit import RateDecision, RateLimiter, SlidingWindow, TokenBucket
from shoal.coordination.saga import Saga, SagaHandle, SagaInfo, Sagas, SagaStep

__all__ = [
    "Cache",
    "CacheOptions",
    "ConfigChange",
    "ConfigConflict",
    "ConfigEntry",
    "ConfigView",
    "Leadership",
    "Lock",
    "LockHolder",
    "RateDecision",
    "RateLimiter",
    "Saga",
    "SagaHandle",
    "SagaInfo",
    "SagaStep",
    "Sagas",
    "SlidingWindow",
    "TokenBucket",
]
