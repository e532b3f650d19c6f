"""How many tasks of each capability a node may start now: the capability's
concurrency limit on this node and its start rate across the cluster.

The node asks ``budgets(free)`` before each fetch round and hands the answer to
fetch.lua, which reads no more of a capability than its budget (a capability
absent from the budgets is bounded by the node's free slots only; one whose
budget is 0 is left out of the fetch and of the blocking read for work, so its
submissions do not wake the node for nothing). So a limit holds without fetching
a task and then sitting on it:

* **Concurrency** (per node): a budget of ``limit - running``. Lowering the limit
  below what runs cancels nothing: no new task starts until enough finished.
  A finishing task that brings a capability back under its limit wakes the fetch
  loop (``on_open``), so a freed place is filled at once.
* **Rate** (cluster-wide): one token from the capability's shared TokenBucket
  (``ratelimit:capability:<name>``) per task started. A round takes as many
  tokens as the capability could start (its room, at most the bucket's size), for
  every rate-limited capability in one pipelined round trip, and after the round
  ``settle`` gives back the tokens of tasks not started (an empty queue, a skipped
  entry, a slot taken by another capability, a hand-back): tokens pay for starts
  only. Refused, the capability gets no budget for ``retry_after`` seconds (the
  others go on), after which ``on_open`` wakes the loop. A bucket that cannot be
  read (an engine error) refuses its capability for ``ERROR_PAUSE_S``, not the
  whole node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.coordination.ratelimit import TokenBucket
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.node")

BUCKETS = "capability"  # the TokenBucket name: keys ratelimit:capability:<name>
ERROR_PAUSE_S = 1.0  # a capability whose bucket failed is not started for this long
WARN_EVERY_S = 5.0  # at most one warning this often for failing buckets or refunds


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
        self._taken: dict[str, int] = {}  # tokens taken for the round under way
        self._warned = 0.0
        self.token_calls = 0  # round trips to the buckets (takes and gives), for tests
        self.tokens: Counter[str] = Counter()  # start tokens kept (taken - given back)

    def set_limits(self, limits: dict[str, Limits]) -> None:
        """New limits (a config change). A capability whose limits changed is not
        held back by an earlier refusal: a raised rate applies at once, not after
        a retry_after computed at the old rate (up to 1/MIN_RATE seconds)."""
        new = {cap: lim for cap, lim in limits.items() if lim.limited}
        for cap in set(self.limits) | set(new):
            if self.limits.get(cap) != new.get(cap):
                self._refused_until.pop(cap, None)
                if (timer := self._timers.pop(cap, None)) is not None:
                    timer.cancel()
        self.limits = new
        self._on_open()

    def started(self, capability: str) -> None:
        self.running[capability] += 1

    def finished(self, capability: str) -> None:
        """A task ended. Wake the fetch loop only when this brought a capability
        back under its concurrency limit: under it, the node was not holding the
        capability back (a rate-only capability's finish opens nothing)."""
        self.running[capability] -= 1
        running = self.running[capability]
        if running <= 0:
            del self.running[capability]
        limit = self.limits.get(capability, Limits()).concurrency
        if limit is not None and running == limit - 1:
            self._on_open()

    def held_back(self, capability: str) -> float:
        """Seconds until the capability's rate lets the node try again (0: not held)."""
        return max(0.0, self._refused_until.get(capability, 0.0) - time.monotonic())

    async def budgets(self, free: int) -> dict[str, int]:
        """How many tasks of each limited capability may start in this round. The
        tokens taken for them are the node's until ``settle``: call it after the
        round, whatever happened."""
        budgets: dict[str, int] = {}
        wanted: dict[str, tuple[float, int, int]] = {}
        now = time.monotonic()
        for cap, limits in self.limits.items():
            room = free
            if limits.concurrency is not None:
                room = min(room, limits.concurrency - self.running[cap])
            room = max(0, room)
            if room > 0 and limits.rate is not None:
                if self._refused_until.get(cap, 0.0) > now:
                    room = 0
                else:
                    wanted[cap] = (limits.rate, limits.bucket_size, min(room, limits.bucket_size))
            budgets[cap] = room
        if wanted:
            budgets.update(await self._take(wanted, now))
        return budgets

    async def _take(self, wanted: dict[str, tuple[float, int, int]], now: float) -> dict[str, int]:
        self.token_calls += 1
        try:
            answers = await self._bucket.take_each(wanted)
        except ShoalError as exc:  # the pipeline failed as a whole
            answers = dict.fromkeys(wanted, exc)
        got: dict[str, int] = {}
        for cap, answer in answers.items():
            if isinstance(answer, ShoalError):
                self._warn("taking a start token of %s failed: %s", cap, answer)
                self._refuse(cap, now, ERROR_PAUSE_S)
                got[cap] = 0
                continue
            taken, decision = answer
            got[cap] = taken
            if taken:
                self._taken[cap] = self._taken.get(cap, 0) + taken
                self.tokens[cap] += taken
            else:
                self._refuse(cap, now, decision.retry_after)
        return got

    def _refuse(self, cap: str, now: float, pause: float) -> None:
        self._refused_until[cap] = now + pause
        if (timer := self._timers.pop(cap, None)) is not None:
            timer.cancel()
        self._timers[cap] = asyncio.get_running_loop().call_later(pause, self._on_open)

    async def settle(self, started: Counter[str]) -> None:
        """After a round: give back the tokens taken for it that no start used."""
        taken, self._taken = self._taken, {}
        unused: dict[str, tuple[float, int, int]] = {}
        for cap, count in taken.items():
            limits = self.limits.get(cap)
            left = count - started[cap]
            if left > 0 and limits is not None and limits.rate is not None:
                unused[cap] = (limits.rate, limits.bucket_size, left)
        if not unused:
            return
        self.token_calls += 1
        try:
            await self._bucket.give_each(unused)
            for cap, (_, _, left) in unused.items():
                self.tokens[cap] -= left
        except ShoalError as exc:  # lost tokens: the bucket refills later than it could
            self._warn("giving back unused start tokens failed: %s", exc)

    def _warn(self, message: str, *args: object) -> None:
        if time.monotonic() - self._warned > WARN_EVERY_S:
            self._warned = time.monotonic()
            log.warning(message, *args)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
