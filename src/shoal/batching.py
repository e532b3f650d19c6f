"""Coalescing: calls made while a round trip is under way share the next one.

The agent host loads states, starts tasks and commits turns for many agents at
once; one script call or pipeline per batch instead of one per agent is what makes
a million small turns affordable. (redis-py pipelines batch what one caller
queues; nothing in it batches across independent callers, hence this.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from shoal.errors import EngineUnavailable
from shoal.resilience import Backoff

I = TypeVar("I")  # noqa: E741 - item
R = TypeVar("R")

log = logging.getLogger("shoal.node")


class Coalescer(Generic[I, R]):
    """``await coalescer(item)`` returns ``run_batch``'s result for that item.

    One batch is in flight at a time, so batches run in the order their items were
    added (commits of one agent's turns stay in order). While the engine is
    unavailable the batch is retried with back-off rather than failed: the items
    are turns already run, whose effects must not be dropped.
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[I]], Awaitable[list[R]]],
        max_batch: int = 500,
        give_up_after: float | None = None,
        retry_on: tuple[type[Exception], ...] = (EngineUnavailable,),
    ) -> None:
        self.name = name
        self._run_batch = run_batch
        self._max_batch = max_batch
        # None: retry through an outage for as long as it lasts (effects that must
        # not be dropped); else fail the batch after this many seconds of trying.
        self._give_up_after = give_up_after
        self._retry_on = retry_on
        self._pending: list[tuple[I, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def __call__(self, item: I) -> asyncio.Future[R]:
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return fut

    @property
    def idle(self) -> bool:
        return self._flusher is None

    async def _flush(self) -> None:
        backoff, failing_since = Backoff(), 0.0
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                try:
                    results = await self._run_batch([item for item, _ in batch])
                except self._retry_on as exc:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if (
                        self._give_up_after is not None
                        and now - failing_since >= self._give_up_after
                    ):
                        self._fail(batch, exc)
                        failing_since = 0.0
                        continue
                    delay = backoff.next_delay()
                    log.warning("%s: %s; retrying in %.2fs", self.name, exc, delay)
                    await asyncio.sleep(delay)  # back-off while the engine is away
                    continue
                except Exception as exc:
                    self._fail(batch, exc)
                    continue
                backoff.reset()
                failing_since = 0.0
                del self._pending[: len(batch)]
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._flusher = None

    def _fail(self, batch: list[tuple[I, asyncio.Future[R]]], exc: BaseException) -> None:
        del self._pending[: len(batch)]
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(exc)
