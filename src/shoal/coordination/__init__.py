"""Coordination between processes through the engine: rate limiting now; locks,
caches, configuration and sagas belong here too (DESIGN.md §3)."""

from shoal.coordination.ratelimit import RateDecision, TokenBucket

__all__ = ["RateDecision", "TokenBucket"]
