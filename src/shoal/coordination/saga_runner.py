"""The SagaRunner: each node's loop that drives sagas, beside (not in) its task slots.

Why not a task: a coordinator that is a task holds a slot while it waits for its
steps, and steps need slots too — a node with concurrency 1 would hang on its
first saga, and enough waiting coordinators starve a whole cluster. A runner
waits for steps on the engine's reply streams, costing no slot, so sagas and
their steps never compete.

How a saga finds a runner:

* the engine lists the sagas that need driving (``sagas_active``: started, not
  ended, not stuck in compensation_failed);
* a runner takes a saga by taking the Lock ``saga:<id>`` (ttl ``LOCK_TTL``, renewed
  by the lock's watchdog), and drives it with the lock's fencing token — a token
  larger than any earlier holder's, which saga.lua checks on every log write;
* a new saga wakes every runner at once (saga.lua adds to the ``saga_wake``
  stream, which each runner blocks on); every ``SCAN_S`` a runner also looks for
  sagas whose lock lapsed — a dead node's lock expires after LOCK_TTL, so another
  node resumes its sagas within about LOCK_TTL + SCAN_S;
* at most ``max_sagas`` at once per node; the others wait for another runner or
  a free place;
* when the node stops, its runner stops driving and releases its locks at once
  (and wakes the others): another node resumes those sagas — a drain is never
  held up by a saga's steps.

Engine errors and full queues are retried here with back-off, from the log: a saga
never ends up undriven because its driver ran out of attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from shoal.coordination.lock import Lock
from shoal.coordination.saga_coordinator import Coordinator, StaleCoordinator
from shoal.errors import ConfigurationError, LockTimeout, SagaNotFound, ShoalError
from shoal.observability import metrics
from shoal.resilience import Backoff

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.saga")

LOCK_TTL = 3.0  # a saga's lock; a dead runner's sagas are resumed after about this
SCAN_S = 1.0  # how often a runner looks for sagas nobody drives (and its stop)
SCAN_BATCH = 200  # saga ids looked at per round trip of a scan
MAX_SAGAS = 256


def lock_name(saga_id: str) -> str:
    return f"saga:{saga_id}"


class SagaRunner:
    """Drives up to ``max_sagas`` sagas at once for the node ``node_id``."""

    def __init__(
        self, client: Client, node_id: str, *, max_sagas: int = MAX_SAGAS, ttl: float = LOCK_TTL
    ) -> None:
        if isinstance(max_sagas, bool) or not isinstance(max_sagas, int) or max_sagas < 1:
            raise ConfigurationError(f"max_sagas must be a whole number >= 1, got {max_sagas!r}")
        self.client = client
        self.node_id = node_id
        self.max_sagas = max_sagas
        self.ttl = ttl
        self.driving: dict[str, asyncio.Task[None]] = {}
        self._locks: dict[str, Lock] = {}
        self._stopped = False

    async def run(self, stopping: asyncio.Event) -> None:
        """Drive sagas until ``stopping`` is set; then release them all at once."""
        loop = asyncio.create_task(self._loop(stopping), name="shoal-saga-runner")
        try:
            await stopping.wait()
        finally:
            self._stopped = True
            await self._stop_all()
            await loop  # its blocking read ends within SCAN_S

    async def _loop(self, stopping: asyncio.Event) -> None:
        backoff, last = Backoff(cap=5.0), "$"
        while not stopping.is_set():
            try:
                await self._scan()
                last = await self._wait(last)
                backoff.reset()
            except ShoalError as exc:
                log.warning("saga runner %s: %s; retrying", self.node_id, exc)
                await asyncio.sleep(backoff.next_delay())
            except Exception:  # a bug here must not take the node down with it
                log.exception("saga runner %s: unexpected error; retrying", self.node_id)
                await asyncio.sleep(backoff.next_delay())

    async def _wait(self, last: str) -> str:
        """Block on the wake-up stream for up to SCAN_S; the last entry seen."""
        wake = self.client.keys.saga_wake
        async with self.client.errors():
            got = await self.client.blocking.xread({wake: last}, block=int(SCAN_S * 1000))
        for _, entries in got or ():
            if entries:
                last = entries[-1][0].decode()
        return last

    async def _scan(self) -> None:
        """Take the sagas nobody drives, while there is room."""
        start = 0
        while not self._stopped and len(self.driving) < self.max_sagas:
            async with self.client.errors():
                ids = await self.client.redis.zrange(
                    self.client.keys.sagas_active, start, start + SCAN_BATCH - 1
                )
            if not ids:
                return
            start += len(ids)
            for saga_id in await self._undriven([i.decode() for i in ids]):
                if self._stopped or len(self.driving) >= self.max_sagas:
                    return
                await self._take(saga_id)

    async def _undriven(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` whose lock is free (one pipelined look; taking is checked
        again by the lock itself)."""
        ids = [i for i in ids if i not in self.driving]
        if not ids:
            return []
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            for saga_id in ids:
                pipe.exists(self.client.keys.lock(lock_name(saga_id))[0])
            held = await pipe.execute()
        return [saga_id for saga_id, h in zip(ids, held, strict=True) if not h]

    async def _take(self, saga_id: str) -> None:
        lock = self.client.lock(lock_name(saga_id), ttl=self.ttl, wait=0, holder=self.node_id)
        try:
            await lock.acquire()
        except LockTimeout:
            return  # another runner was quicker
        if self._stopped:
            await self._release(lock)
            return
        self._locks[saga_id] = lock
        self.driving[saga_id] = asyncio.create_task(
            self._drive(saga_id, lock), name=f"shoal-saga-{saga_id}"
        )
        metrics.SAGAS_DRIVEN.set(len(self.driving))

    async def _drive(self, saga_id: str, lock: Lock) -> None:
        """Run the saga's coordinator until the saga ends, the lock is lost or a
        later runner took over; engine trouble is retried with back-off."""
        backoff = Backoff(base=0.1, cap=5.0)
        try:
            while True:
                assert lock.token is not None
                run = Coordinator(self.client, saga_id, token=lock.token, node=self.node_id)
                outcome = await self._until_lost(run, lock)
                if outcome is not None:
                    return
                await asyncio.sleep(backoff.next_delay())
        finally:
            self.driving.pop(saga_id, None)
            self._locks.pop(saga_id, None)
            metrics.SAGAS_DRIVEN.set(len(self.driving))
            await self._release(lock)

    async def _until_lost(self, run: Coordinator, lock: Lock) -> str | None:
        """One run: its outcome ('lost', 'stale', a final status…), or None to retry."""
        work = asyncio.create_task(run.run())
        lost = asyncio.create_task(lock.lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, lost, return_exceptions=True)
        if lock.lost.is_set():
            log.warning("saga %s: lock lost; this runner stops driving it", run.saga_id)
            return "lost"
        return await self._judge(run, work)

    async def _judge(self, run: Coordinator, work: asyncio.Task[str]) -> str | None:
        try:
            return work.result()
        except asyncio.CancelledError:
            return "stopped"
        except StaleCoordinator as exc:
            log.info("saga %s: %s; stopping", run.saga_id, exc)
            return "stale"
        except SagaNotFound:
            async with self.client.errors():
                await self.client.redis.zrem(self.client.keys.sagas_active, run.saga_id)
            return "missing"
        except ShoalError as exc:  # engine away, a full queue: resumed from the log
            log.warning("saga %s: %s; resuming from its log", run.saga_id, exc)
            return None
        except Exception:
            log.exception("saga %s: unexpected error; resuming from its log", run.saga_id)
            return None

    async def _release(self, lock: Lock) -> None:
        with contextlib.suppress(ShoalError):
            await lock.release()

    async def _stop_all(self) -> None:
        """Stop driving: every saga's run is cancelled and its lock released (the
        tasks it submitted go on), and the other runners are woken to take them."""
        tasks = list(self.driving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if tasks:
            with contextlib.suppress(ShoalError):
                async with self.client.errors():
                    await self.client.redis.xadd(
                        self.client.keys.saga_wake, {"released": self.node_id},
                        maxlen=1000, approximate=True,
                    )  # fmt: skip
