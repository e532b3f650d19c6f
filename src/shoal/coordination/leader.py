"""Leader election on a Lock: whoever holds ``leader:<name>``'s lock leads.

``async with client.leader("reaper", on_elected=start, on_lost=stop) as lead:``
campaigns in the background for as long as the block runs: it waits for the lock
(a short ttl, 3 s by default, so a dead leader's successor takes over within about
that), calls ``on_elected(token)`` once it holds it, and ``on_lost(token)`` when
the lock is lost (the leader's renewal failed or found it taken — a paused or cut
off leader), then campaigns again. On exit the campaign stops and a leader
resigns (releases the lock) at once, so a successor need not wait for the ttl.

Callbacks may be plain functions or coroutines; they run in the campaign task, one
at a time, so on_lost never overtakes its on_elected. An exception in a callback
is logged and does not end the campaign: an election that a bad callback could
stop would leave no leader at all. ``token`` is the acquisition's fencing token:
pass it with the leader's writes so a store can refuse a deposed leader's.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from shoal.coordination.lock import Lock, LockHolder, holder_of, validate_name
from shoal.errors import EngineError, EngineUnavailable, ShoalError

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.leader")

Callback = Callable[[int], Awaitable[None] | None]
DEFAULT_TTL = 3.0
RETRY_DELAY = 0.5  # seconds after the engine failed a campaign step


def lock_name(name: str) -> str:
    return f"leader:{validate_name(name)}"


async def leader_of(client: Client, name: str) -> LockHolder | None:
    """Who leads ``name`` now: the holder's id and its fencing token (None: no one)."""
    return await holder_of(client, lock_name(name))


class Leadership:
    """One campaign for leadership of ``name`` (see the module's docstring)."""

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
        ttl: float = DEFAULT_TTL,
        holder: str | None = None,
    ) -> None:
        self.name = name
        self._client = client
        self._lock = Lock(client, lock_name(name), ttl=ttl, wait=None, holder=holder)
        self._on_elected, self._on_lost = on_elected, on_lost
        self._campaign: asyncio.Task[None] | None = None
        self.elected = asyncio.Event()  # set while this campaign leads

    @property
    def is_leader(self) -> bool:
        return self._lock.held

    @property
    def token(self) -> int | None:
        """The fencing token of the current term (None when not leading)."""
        return self._lock.token if self._lock.held else None

    @property
    def holder(self) -> str:
        return self._lock.holder

    async def start(self) -> Leadership:
        if self._campaign is None:
            self._campaign = asyncio.create_task(self._run(), name=f"shoal-leader-{self.name}")
            self._client.campaigns.add(self)
        return self

    async def stop(self) -> None:
        """Stop campaigning and resign if leading (on_lost is not called: a leader
        that resigns knows it).

        The resignation finishes even when the caller is cancelled meanwhile (a
        node shutting down cancels its tasks): cut short, it would leave the lock
        to its ttl, and a successor would wait that long."""
        resign = asyncio.ensure_future(self._stop(asyncio.current_task()))
        try:
            await asyncio.shield(resign)
        except asyncio.CancelledError:
            await asyncio.wait({resign})
            raise

    async def _stop(self, caller: asyncio.Task[Any] | None) -> None:
        campaign, self._campaign = self._campaign, None
        self._client.campaigns.discard(self)
        if campaign is not None and campaign is not caller:
            campaign.cancel()
            await asyncio.gather(campaign, return_exceptions=True)
        # (from a callback, the campaign is the caller: it ends when the callback returns)
        self.elected.clear()
        await self._lock.release()

    async def _run(self) -> None:
        while True:
            try:
                token = await self._lock.acquire()
            except (EngineUnavailable, EngineError) as exc:  # campaign again shortly
                log.warning("leader %r: campaign failed (%s); retrying", self.name, exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            self.elected.set()
            await self._call(self._on_elected, token, "on_elected")
            if self._campaign is not asyncio.current_task():
                return  # stopped by the callback
            await self._lock.lost.wait()
            self.elected.clear()
            try:  # forget the lost term (the script refuses to delete another's)
                await self._lock.release()
            except ShoalError as exc:
                log.warning("leader %r: release after the loss failed (%s)", self.name, exc)
            await self._call(self._on_lost, token, "on_lost")
            if self._campaign is not asyncio.current_task():
                return

    async def _call(self, callback: Callback | None, token: int, what: str) -> None:
        if callback is None:
            return
        try:
            result = callback(token)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("leader %r: %s (token %d) failed", self.name, what, token)

    async def __aenter__(self) -> Leadership:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
