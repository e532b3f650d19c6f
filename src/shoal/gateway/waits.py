"""Bounds on the requests that wait: event streams, ``?wait=`` long-polls and agent
requests. Each may hold an engine connection (a blocking read) for minutes, so
without a bound one key could open enough of them to use up the engine's client
limit and stop the whole cluster. Past the bound the answer is at once: 429 for a
key over its share, 503 for a gateway that is full (try another, or later)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from shoal.gateway.problems import ApiError

DEFAULT_MAX_WAITS = 500  # per gateway process
DEFAULT_MAX_WAITS_PER_KEY = 50  # per API key (or for all callers of an open gateway)
RETRY_AFTER_S = "1"


@dataclass
class WaitSlot:
    """One waiting request's place; ``release`` is idempotent (a stream's end and
    its response's background task both call it)."""

    limits: WaitLimits
    holder: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits.release(self.holder)

    async def __aenter__(self) -> WaitSlot:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


@dataclass
class WaitLimits:
    total: int = DEFAULT_MAX_WAITS
    per_holder: int = DEFAULT_MAX_WAITS_PER_KEY
    _held: Counter[str] = field(default_factory=Counter)
    _count: int = 0

    def take(self, holder: str) -> WaitSlot:
        if self._held[holder] >= self.per_holder:
            raise ApiError(
                429, "TooManyWaits",
                f"{holder!r} already has {self.per_holder} requests waiting (event streams, "
                "?wait= and agent requests) on this gateway; close some or retry later",
                {"Retry-After": RETRY_AFTER_S},
            )  # fmt: skip
        if self._count >= self.total:
            raise ApiError(
                503, "TooManyWaits",
                f"this gateway already holds {self.total} waiting requests; retry later or "
                "on another gateway",
                {"Retry-After": RETRY_AFTER_S},
            )  # fmt: skip
        self._held[holder] += 1
        self._count += 1
        return WaitSlot(self, holder)

    def release(self, holder: str) -> None:
        self._count -= 1
        self._held[holder] -= 1
        if self._held[holder] <= 0:
            del self._held[holder]

    @property
    def held(self) -> int:
        return self._count
