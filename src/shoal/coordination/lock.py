"""A lock shared through the engine, with fencing tokens and a renewal watchdog.

``async with client.lock("invoices", ttl=10, wait=5) as lock:`` holds the lock named
``invoices`` across every process of the namespace:

* **Fencing.** Each acquisition gets a token one greater than any before it (an
  INCR in the script that takes the lock), ``lock.token``. A lock held by time
  (a TTL) cannot stop a holder that was paused past its TTL from waking up and
  writing; a store that remembers the highest token it saw and refuses lower ones
  can. The token protects only stores that check it (docs/coordination.md).
* **Renewal.** While held, a watchdog extends the lock every ``ttl/3`` — if the
  engine still holds this holder's value, compared and extended in one script.
* **Loss.** When a renewal finds the lock expired or taken, or the engine cannot
  renew it before its TTL runs out, the lock is lost: ``lock.lost`` is set and the
  task that entered ``async with`` is cancelled, so the block stops at its next
  await, and ``LockLost`` comes out of the ``async with``. Cancelling is the one
  way to stop a block that is waiting on something else (a setting of ``lost``
  only helps a block that looks at it); LockLost instead of CancelledError, so
  the caller's own cancellation is not confused with the loss. A block that
  swallows the cancellation still gets LockLost at its end.
* **Waiting.** ``wait=None`` waits forever, ``wait=0`` tries once, else up to
  ``wait`` seconds, then LockTimeout. A waiter blocks on a wake-up list that a
  release pushes to (BLPOP), timed out at the holder's expiry: no polling.
* **Safe release.** Only the holder's value releases, compared in the script.

Why not redis-py's ``Lock``: it has no fencing token and no loss notification,
its ``extend`` compares by a token that it keeps in a thread-local, and its
waiting polls with ``sleep``. The whole protocol here is the ~35 lines of
``lock.lua``, so that one script owns the key schema (shoal.keys) and runs on a
Cluster (all three keys share the namespace's control tag).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.errors import ConfigurationError, EngineUnavailable, LockLost, LockTimeout, ShoalError

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.lock")

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,255}")
MIN_TTL = 0.1  # seconds; the watchdog renews at ttl/3, so shorter is all round trips
LOSS_MARGIN = 0.1  # a holder gives the lock up this share of its ttl before it expires
MAX_TTL = 86_400.0


class LockHolder(msgspec.Struct, frozen=True):
    """Who holds a lock: the holder's id and the fencing token of its acquisition."""

    holder: str
    token: int


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"lock name {name!r:.80} is invalid: start with a letter or '_', then up to "
            "255 letters, digits, '_', '.', ':', '/' or '-'"
        )
    return name


def _validate_ttl(ttl: Any) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not MIN_TTL <= ttl <= MAX_TTL:
        raise ConfigurationError(
            f"lock ttl must be a number of seconds within {MIN_TTL}..{MAX_TTL:.0f}, got {ttl!r}"
        )
    return float(ttl)


def _validate_wait(wait: Any) -> float | None:
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
        raise ConfigurationError(
            f"lock wait must be None (forever) or a number of seconds >= 0, got {wait!r}"
        )
    return float(wait)


async def holder_of(client: Client, name: str) -> LockHolder | None:
    """Who holds the lock ``name`` now (None when free)."""
    lock_key, _, _ = client.keys.lock(validate_name(name))
    async with client.errors():
        value = await client.redis.get(lock_key)
    if value is None:
        return None
    token, _, rest = value.decode().partition(" ")
    return LockHolder(rest.partition(" ")[0], int(token))


class Lock:
    """One lock, acquired by ``async with`` (or ``acquire()``/``release()``, which
    only set ``lost`` on a loss and cancel nothing: for an owner, like Leadership,
    that watches ``lost`` itself)."""

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        ttl: float = 10.0,
        wait: float | None = None,
        holder: str | None = None,
    ) -> None:
        self._client = client
        self.name = validate_name(name)
        self.ttl = _validate_ttl(ttl)
        self.wait = _validate_wait(wait)
        self.holder = holder or client.client_id
        if not isinstance(self.holder, str) or not self.holder or " " in self.holder:
            raise ConfigurationError(f"a lock holder id is a non-empty word, got {holder!r}")
        self.token: int | None = None  # the fencing token while held
        self.lost = asyncio.Event()
        self._watchdog: asyncio.Task[None] | None = None
        self._owner: asyncio.Task[Any] | None = None  # cancelled on a loss
        self._cancelled_owner = False
        self._why = ""
        self._claim = ""  # "<holder> <nonce>" of the current acquisition
        self._expires = 0.0  # monotonic time the lease surely lasts until

    @property
    def held(self) -> bool:
        return self.token is not None and not self.lost.is_set()

    def _call(self, op: str, *args: str | int) -> Any:
        keys = self._client.keys
        return self._client.scripts.lock(list(keys.lock(self.name)), [keys.prefix, op, *args])

    @property
    def _value(self) -> str:
        return f"{self.token} {self._claim}"

    @property
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def acquire(self) -> int:
        """Take the lock, waiting up to ``wait``; return the fencing token.
        Raises LockTimeout when the wait ran out."""
        if self.token is not None:
            raise ConfigurationError(f"lock {self.name!r} is already acquired by this Lock")
        deadline = None if self.wait is None else time.monotonic() + self.wait
        wake = self._client.keys.lock(self.name)[2]
        # A nonce per acquisition: the value names this acquisition even before its
        # token is known, so a cancelled acquire can free what it may have taken.
        self._claim = f"{self.holder} {secrets.token_hex(8)}"
        while True:
            sent = time.monotonic()
            try:
                async with self._client.errors():
                    taken, value = await self._call("acquire", self._claim, self._ttl_ms)
            except BaseException:  # cancelled, or no reply: the script may have run
                await asyncio.shield(self._abandon())
                raise
            if taken:
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise LockTimeout(
                    f"lock {self.name!r} not acquired within {self.wait}s: another holder "
                    "kept it (see client.leader_of / holder_of for who)"
                )
            # Sleep until a release wakes us or the holder's lease would expire.
            block = max(value / 1000, 0.01) if left is None else min(value / 1000, left)
            try:
                async with self._client.errors():
                    await self._client.blocking.blpop([wake], timeout=max(block, 0.01))
            except asyncio.CancelledError:  # the wake-up may have been ours: pass it on
                await asyncio.shield(self._pass_wake_up())
                raise
        self._expires = sent + self.ttl  # counted from before the acquire was sent
        self.token = int(value)
        self.lost.clear()
        self._client.held_locks.add(self)
        self._watchdog = asyncio.create_task(self._renew(), name=f"shoal-lock-{self.name}")
        return self.token

    async def _pass_wake_up(self) -> None:
        """A waiter leaving may have popped the wake-up a release pushed: if the lock
        is free, push one for the next waiter (else they sleep until a ttl runs out)."""
        try:
            async with self._client.errors():
                await self._call("wake")
        except ShoalError as exc:
            log.debug("lock %r: could not pass a wake-up on (%s)", self.name, exc)

    async def _abandon(self) -> None:
        """Free the lock if the acquire that was cancelled under way did take it:
        nobody would renew or release it, and it would block everyone for a ttl."""
        try:
            async with self._client.errors():
                if await self._call("abandon", self._claim):
                    log.info("lock %r: freed what a cancelled acquire had taken", self.name)
        except ShoalError as exc:
            log.warning("lock %r: a cancelled acquire may hold it for a ttl (%s)", self.name, exc)

    async def release(self) -> bool:
        """Give the lock up; True if this holder still held it (False after a loss)."""
        self._client.held_locks.discard(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self.token is None:
            return False
        # Forgotten before the call: a release racing this one (a closing client's
        # and the block's own exit) finds nothing left to release.
        value, self.token = self._value, None
        async with self._client.errors():
            return bool(await self._call("release", value))

    async def _renew(self) -> None:
        """Extend the lock every ttl/3 while held. The lease is counted from when the
        last successful renewal (or the acquire) was *sent*; the lock is given up as
        lost a margin before that lease runs out — whether renewals failed, or one is
        still waiting for its reply (a slow engine, a busy pool): a holder must stop
        before another can have taken the lock."""
        margin = self.ttl * LOSS_MARGIN
        while True:
            deadline = self._expires - margin
            await asyncio.sleep(max(0.0, min(self.ttl / 3, deadline - time.monotonic())))
            sent = time.monotonic()
            if sent >= deadline:
                return self._lose("the engine could not renew it before its ttl ran out")
            # The call is waited for, not cancelled, at the deadline: cancelling a
            # command mid-reply costs redis-py its connection. A late answer is moot.
            call = asyncio.ensure_future(self._renewal())
            done, _ = await asyncio.wait({call}, timeout=deadline - sent)
            if not done:
                call.add_done_callback(_ignore_outcome)
                return self._lose("no renewal was answered before its ttl ran out")
            try:
                held = call.result()
            except EngineUnavailable as exc:
                log.warning("lock %r: renewal failed (%s); retrying", self.name, exc)
                continue
            if not held:
                return self._lose("it expired or another holder took it")
            self._expires = sent + self.ttl

    async def _renewal(self) -> bool:
        async with self._client.errors():
            return bool(await self._call("renew", self._value, self._ttl_ms))

    def _lose(self, why: str) -> None:
        log.warning("lock %r (token %s) lost: %s", self.name, self.token, why)
        self._why = why
        self.lost.set()
        owner = self._owner
        if owner is not None and not owner.done() and owner is not asyncio.current_task():
            self._cancelled_owner = True
            owner.cancel(f"lock {self.name!r} lost")

    # --- async with --------------------------------------------------------------------

    async def __aenter__(self) -> Lock:
        await self.acquire()
        self._owner = asyncio.current_task()
        self._cancelled_owner = False
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        owner, self._owner = self._owner, None  # no cancellation from here on
        token = self.token
        await self.release()
        if not self.lost.is_set():
            return False
        if self._cancelled_owner and owner is not None and owner.uncancel() > 0:
            return False  # cancelled by someone else too: that cancellation wins
        if exc_type is not None and not issubclass(exc_type, asyncio.CancelledError):
            return False  # the block's own error says more; `lost` is set
        raise LockLost(
            f"lock {self.name!r} (fencing token {token}) was lost while held: {self._why}"
        ) from None


def _ignore_outcome(call: asyncio.Future[Any]) -> None:
    """A renewal answered after its lock was given up: its answer changes nothing."""
    if not call.cancelled():
        call.exception()  # retrieved, so asyncio does not log it as never retrieved
