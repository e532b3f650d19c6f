"""Resilience helpers. For now: the back-off every reconnecting loop uses.

(The service-level toolkit — breakers, retry policies, bulkheads — joins this
module later; see DESIGN.md §3.)
"""

from __future__ import annotations

import random


class Backoff:
    """Capped exponential back-off with jitter, for loops that retry after engine
    errors: 50 ms, 100 ms, 200 ms … up to ``cap``, each scaled by a random factor in
    [0.5, 1.0] so that many nodes reconnecting at once do not retry in lock-step."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay = min(self.cap, self.base * 2.0**self.failures)
        self.failures += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """A success: the next failure starts from ``base`` again."""
        self.failures = 0
