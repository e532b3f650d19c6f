"""Coordination between processes through the engine: rate limiting, locks with
fencing tokens and leader election; caches, configuration and sagas belong here
too (DESIGN.md §3)."""

from shoal.coordination.leader import Leadership
from shoal.coordination.lock import Lock, LockHolder
from shoal.coordination.ratelimit import RateDecision, TokenBucket
from shoal.coordination.saga import Saga, SagaHandle, SagaInfo, Sagas, SagaStep

__all__ = [
    "Leadership",
    "Lock",
    "LockHolder",
    "RateDecision",
    "Saga",
    "SagaHandle",
    "SagaInfo",
    "SagaStep",
    "Sagas",
    "TokenBucket",
]
