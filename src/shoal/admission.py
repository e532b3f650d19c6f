"""How many tasks of each capability a node may start now: the capability's
concurrency limit on this node and its start rate across the cluster.

The node asks ``budgets(free)`` before each fetch and hands the answer to
fetch.lua, which reads no more of a capability than its budget (a capability
absent from the budgets is bounded by the node's free slots only). So a limit
holds without fetching a task and then sitting on it:

* **Concurrency** (per node): a budget of ``limit - running``. Lowering the limit
  below what runs cancels nothing: no new task starts until enough finished.
  A finishing task of a limited capability wakes the fetch loop (``on_open``),
  so a freed place is filled at once, not at the next blocking read's timeout.
* **Rate** (cluster-wide): one token from the capability's shared TokenBucket
  (``ratelimit:capability:<name>``) per task started; a round takes one token per
  rate-limited capability with room, and the fetch then starts at most one task
  of it. Refused, the capability gets no budget for ``retry_after`` seconds
  (others go on), after which ``on_open`` wakes the loop. A token taken for a
  queue that turns out empty is spent all the same: an idle capability uses up
  its burst, so the first tasks after an idle spell may wait up to one
  ``1/rate`` (documented in docs/coordination.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.coordination.ratelimit import TokenBucket

if TYPE_CHECKING:
    from shoal.client import Client

BUCKETS = "capability"  # the TokenBucket name: keys ratelimit:capability:<name>


@dataclass(frozen=True)
class Limits:
    """A capability's admission limits as configured now."""

    concurrency: int | None = None  # per node; None: only the node's free slots
    rate: float | None = None  # starts per second across the cluster
    burst: int | None = None  # None: one second's worth of the rate

    @property
    def bucket_size(self) -> int:
        assert self.rate is not None
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))

    @property
    def limited(self) -> bool:
        return self.concurrency is not None or self.rate is not None


class Admission:
    """The limits of one node's capabilities and what runs of each."""

    def __init__(self, client: Client, on_open: Callable[[], None]) -> None:
        self._bucket = TokenBucket(client, BUCKETS)
        self._on_open = on_open
        self.limits: dict[str, Limits] = {}
        self.running: Counter[str] = Counter()
        self._refused_until: dict[str, float] = {}  # monotonic time
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def set_limits(self, limits: dict[str, Limits]) -> None:
        """New limits (a config change): a capability no longer rate-limited is not
        held back by an earlier refusal."""
        self.limits = {cap: lim for cap, lim in limits.items() if lim.limited}
        for cap in list(self._refused_until):
            if self.limits.get(cap, Limits()).rate is None:
                self._refused_until.pop(cap)
        self._on_open()

    def started(self, capability: str) -> None:
        self.running[capability] += 1

    def finished(self, capability: str) -> None:
        self.running[capability] -= 1
        if self.running[capability] <= 0:
            del self.running[capability]
        if capability in self.limits:
            self._on_open()

    async def budgets(self, free: int) -> dict[str, int]:
        """How many tasks of each limited capability may start in this round."""
        budgets: dict[str, int] = {}
        now = time.monotonic()
        for cap, limits in self.limits.items():
            room = free
            if limits.concurrency is not None:
                room = min(room, limits.concurrency - self.running[cap])
            if room > 0 and limits.rate is not None:
                room = 1 if await self._take(cap, limits, now) else 0
            budgets[cap] = max(0, room)
        return budgets

    async def _take(self, cap: str, limits: Limits, now: float) -> bool:
        if self._refused_until.get(cap, 0.0) > now:
            return False
        assert limits.rate is not None
        decision = await self._bucket.take(cap, rate=limits.rate, burst=limits.bucket_size)
        if decision.allowed:
            return True
        self._refused_until[cap] = now + decision.retry_after
        timer = self._timers.pop(cap, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        self._timers[cap] = loop.call_later(decision.retry_after, self._on_open)
        return False

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
