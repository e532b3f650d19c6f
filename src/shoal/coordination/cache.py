"""A two-level cache: an in-process LRU in front of entries in the engine.

``users = client.cache("users", ttl=300, max_local_bytes=64 << 20)`` (or
``self.ctx.cache(...)`` in a handler) names a cache shared by every process of
the namespace:

* **Levels.** A read looks in this process's LRU first (a dict lookup: no await
  reaches the engine), then in the engine (one script call), and keeps what it
  found locally. The LRU is bounded in *bytes* (each entry's encoded value, its
  key and a fixed overhead), not only in entries.
* **Values** are msgpack data, stored encoded; values of ``COMPRESS_OVER`` bytes
  and more are zlib-compressed in the engine when that makes them smaller. The
  local level keeps them encoded and uncompressed, so a hit returns a fresh
  object (a caller that mutates it cannot corrupt the cache) and is decoded once
  per hit, never decompressed.
* **Expiry.** Each cache has a ttl (seconds, None: entries never expire), which a
  write may override. A local copy expires when its engine entry does: its
  deadline is taken before the request that read or wrote it was sent.
* **Invalidation.** Every write publishes the keys it changed from the script
  that writes them; every process drops its local copies older than the write on
  receipt (the writer's own copy is as new as its write: it stays). A process
  whose subscription broke, ended or was silent serves no local copy until it is
  sure again (shoal.coordination.invalidation). Writes are numbered in the engine
  (``cache_seq``) and reads return the number they saw, so an invalidation that
  arrives while a read of the same key is on its way back keeps that read's value
  out of the local level only if its write came after the read (a copy remembers
  its number too). A write that fails or is cancelled may still have run: the
  writer drops its copies of those keys at once.
* **Single flight.** ``get_or_set(key, fn)`` computes a missing value once across
  all processes: concurrent callers of one process share one attempt, and the
  processes race for a fill lease in the engine (SET NX PX, renewed while ``fn``
  runs). The winner computes and stores; the others wait for the write's message,
  each wait bounded by the lease, and take over if the winner dies (its lease
  lapses) or its ``fn`` fails, exceeds ``fill_timeout`` or is abandoned by all
  its callers (it releases the lease at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import re
import time
import zlib
from asyncio import Task
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import msgspec
from cachetools import LRUCache

from shoal.coordination.invalidation import Listener
from shoal.errors import ConfigurationError, EngineUnavailable, SerializationError
from shoal.observability.metrics import cache_stats
from shoal.protocol import new_id

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.cache")

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_KEY_CHARS = 1024
MAX_VALUE_BYTES = 32 << 20  # encoded; the engine's limit is 512 MiB, a cache's far less
MAX_TTL_S = 365 * 86_400.0
DEFAULT_TTL_S = 300.0
DEFAULT_LOCAL_BYTES = 64 << 20
DEFAULT_FILL_LEASE_S = 5.0
DEFAULT_FILL_TIMEOUT_S = 120.0  # the longest a get_or_set's fn may compute
MAX_FILL_TIMEOUT_S = 86_400.0
COMPRESS_OVER = 4096  # encoded bytes from which a value is compressed in the engine
ENTRY_OVERHEAD = 160  # bytes counted per local entry besides its key and value
MAX_BATCH = 1000  # keys per get_many/set_many/delete call (one script each)

_RAW, _ZLIB = b"\x00", b"\x01"  # the stored value's first byte: its format
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_size = itemgetter(2)


@dataclass(frozen=True)
class CacheOptions:
    """A cache's settings, fixed for its life in one client."""

    ttl: float | None = DEFAULT_TTL_S
    max_local_bytes: int = DEFAULT_LOCAL_BYTES
    fill_lease: float = DEFAULT_FILL_LEASE_S
    fill_timeout: float = DEFAULT_FILL_TIMEOUT_S

    def __post_init__(self) -> None:
        _check_ttl(self.ttl, "ttl")
        local = self.max_local_bytes
        if isinstance(local, bool) or not isinstance(local, int) or local < 0:
            raise ConfigurationError(
                f"max_local_bytes must be a whole number of bytes >= 0 (0: no local level), "
                f"got {local!r}"
            )
        lease = self.fill_lease
        if isinstance(lease, bool) or not isinstance(lease, int | float) or not 0.1 <= lease <= 300:
            raise ConfigurationError(
                f"fill_lease must be a number of seconds within 0.1..300 (how long another "
                f"process waits for a dead filler before taking over), got {lease!r}"
            )
        bound = self.fill_timeout
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not 0.1 <= bound <= MAX_FILL_TIMEOUT_S
        ):
            raise ConfigurationError(
                f"fill_timeout must be a number of seconds within 0.1..{MAX_FILL_TIMEOUT_S:.0f} "
                f"(how long a get_or_set's fn may compute before it is cancelled and "
                f"another process may take over), got {bound!r}"
            )


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"cache name {name!r:.80} is invalid: start with a letter or '_', then up to "
            "63 letters, digits, '_', '.' or '-'"
        )
    return name


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        raise ConfigurationError(
            f"cache key {key!r:.80} is invalid: a non-empty str of at most {MAX_KEY_CHARS} "
            "characters"
        )
    return key


def _check_ttl(ttl: Any, what: str) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0.001 <= ttl <= MAX_TTL_S:
        raise ConfigurationError(
            f"{what} must be None (never expires) or a number of seconds within "
            f"0.001..{MAX_TTL_S:.0f}, got {ttl!r}"
        )
    return float(ttl)


def _check_batch(keys: list[str]) -> list[str]:
    if len(keys) > MAX_BATCH:
        raise ConfigurationError(
            f"at most {MAX_BATCH} keys per call, got {len(keys)}: split the batch"
        )
    return [_check_key(k) for k in keys]


def pack(value: Any) -> tuple[bytes, bytes]:
    """The value as stored in the engine and as kept locally (uncompressed)."""
    try:
        raw = _encode(value)
    except (TypeError, OverflowError, UnicodeEncodeError, msgspec.EncodeError) as exc:
        raise SerializationError(
            f"a {type(value).__qualname__} cannot be cached ({exc}): cache values must be "
            "msgpack data (None, bool, int, float, str, bytes, list, dict, msgspec structs)"
        ) from None
    if len(raw) > MAX_VALUE_BYTES:
        raise ConfigurationError(
            f"a cache value is at most {MAX_VALUE_BYTES >> 20} MiB encoded, got {len(raw)} bytes"
        )
    if len(raw) >= COMPRESS_OVER:
        packed = zlib.compress(raw, 1)
        if len(packed) < len(raw):
            return _ZLIB + packed, raw
    return _RAW + raw, raw


def unpack(stored: bytes) -> bytes:
    """The encoded value of a stored one."""
    if stored[:1] == _ZLIB:
        return zlib.decompress(stored[1:])
    if stored[:1] == _RAW:
        return stored[1:]
    raise ValueError(f"unknown cache value format {stored[:1]!r}")


_MISSING: Any = object()
_UNKNOWN_SEQ = 1 << 62  # a write of unknown number may have happened: keep nothing


class _Flight:
    """One ``get_or_set`` computation in this process, shared by its callers."""

    __slots__ = ("callers", "found", "task")

    def __init__(self) -> None:
        self.task: Task[bytes] | None = None
        self.callers = 0
        self.found: bool | None = None  # the first look found the value in the engine


class Cache:
    """One named cache as seen by one client (see the module's docstring)."""

    def __init__(
        self, client: Client, name: str, options: CacheOptions, listener: Listener
    ) -> None:
        self._client = client
        self.name = validate_name(name)
        self.options = options
        self._listener = listener
        self._ttl_ms = _ttl_ms(options.ttl)
        # key -> (encoded value, expiry (monotonic), size counted, seq it was read at)
        self._local: LRUCache[str, tuple[bytes, float, int, int]] = LRUCache(
            maxsize=max(options.max_local_bytes, 1), getsizeof=_size
        )
        # key -> [engine calls in flight, the latest write seq heard meanwhile]
        self._pending: dict[str, list[int]] = {}
        self._waiters: dict[str, asyncio.Event] = {}  # key -> wake-up of a fill waiter
        self._flights: dict[str, _Flight] = {}  # get_or_set, per key
        self.stats = cache_stats(self.name)
        self.stats.sizes.add(self)
        listener.add(self.name, self)

    def local_bytes(self) -> int:
        """Bytes the local level counts as held (for ``shoal_cache_local_bytes``)."""
        return int(self._local.currsize)

    # --- the local level -----------------------------------------------------------

    def peek(self, key: str, default: Any = None) -> Any:
        """The local copy of ``key`` if this process may serve it, else ``default``;
        never asks the engine (counts nothing: for probes and benchmarks)."""
        raw = self._local_raw(key)
        return default if raw is None else _decode(raw)

    def _local_raw(self, key: str) -> bytes | None:
        try:
            raw, expires, _, _ = self._local[key]
        except KeyError:
            return None
        except TypeError:  # unhashable: not a key at all
            _check_key(key)
            raise
        now = time.monotonic()
        if expires <= now:
            self._local.pop(key, None)
            return None
        if not self._listener.fresh(now):  # invalidations may be late: not served
            return None
        return raw

    def _install(
        self, key: str, raw: bytes, ttl_ms: int, sent: float, epoch: int, seq: int
    ) -> None:
        """Keep a value read or written at ``sent`` (as of write ``seq``); ``ttl_ms``
        is what the engine gives it (-1: no expiry, as PTTL says)."""
        if self.options.max_local_bytes == 0 or ttl_ms == 0:
            return
        if epoch != self._listener.epoch or not self._listener.fresh(time.monotonic()):
            return
        expires = math.inf if ttl_ms < 0 else sent + ttl_ms / 1000
        size = len(raw) + len(key.encode(errors="surrogatepass")) + ENTRY_OVERHEAD
        if size <= self.options.max_local_bytes:  # else LRUCache refuses it
            self._local[key] = (raw, expires, size, seq)

    def _begin(self, key: str) -> None:
        slot = self._pending.get(key)
        if slot is None:
            self._pending[key] = [1, 0]
        else:
            slot[0] += 1

    def _end(self, key: str) -> int:
        """An engine call on ``key`` is back: the latest write seq heard meanwhile
        (its result may be kept locally only if it is at least as new)."""
        slot = self._pending[key]
        slot[0] -= 1
        if slot[0] == 0:
            del self._pending[key]
        return slot[1]

    def _touch(self, key: str, seq: int) -> bool:
        """Write ``seq`` changed ``key``: drop an older local copy, keep reads in
        flight from keeping theirs, wake a fill waiter. True if a copy was dropped."""
        entry = self._local.get(key)
        dropped = entry is not None and entry[3] < seq
        if dropped:
            del self._local[key]
        slot = self._pending.get(key)
        if slot is not None and slot[1] < seq:
            slot[1] = seq
        waiter = self._waiters.get(key)
        if waiter is not None:
            waiter.set()
        return dropped

    def invalidate(self, keys: list[str], seq: int, *, ours: bool) -> None:
        """Write ``seq`` changed ``keys`` (the listener calls this); ``ours``: this
        client wrote it (the copy the write kept is not older: it stays)."""
        for key in keys:
            if self._touch(key, seq) and not ours:
                self.stats.invalidated += 1

    def _forget(self, keys: list[str]) -> None:
        """A write of ``keys`` failed or was cancelled, perhaps after its script ran:
        drop their copies and keep reads in flight from keeping theirs (their
        number cannot be judged against a write whose number never came back)."""
        for key in keys:
            self._local.pop(key, None)
            slot = self._pending.get(key)
            if slot is not None:
                slot[1] = _UNKNOWN_SEQ

    def drop_local(self) -> None:
        """Forget every local copy (the listener calls this when messages may have
        been lost); reads in flight keep theirs out through the listener's epoch."""
        if self._local:
            self.stats.dropped += 1
        self._local.clear()
        for waiter in self._waiters.values():
            waiter.set()  # a fill's message may be among the lost: look again

    # --- reads -----------------------------------------------------------------------

    async def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` if the cache has none."""
        raw = self._local_raw(key)
        if raw is not None:
            self.stats.local_hits += 1
            return _decode(raw)
        _check_key(key)
        self.stats.local_misses += 1
        found = await self._fetch([key])
        return _decode(found[key]) if key in found else default

    async def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of those of ``keys`` the cache has (absent keys are left out);
        local copies first, the rest in one engine call."""
        wanted = _check_batch(list(dict.fromkeys(keys)))
        found: dict[str, bytes] = {}
        missing = []
        for key in wanted:
            raw = self._local_raw(key)
            if raw is None:
                missing.append(key)
            else:
                found[key] = raw
        self.stats.local_hits += len(found)
        self.stats.local_misses += len(missing)
        if missing:
            found.update(await self._fetch(missing))
        return {key: _decode(found[key]) for key in wanted if key in found}

    async def _fetch(self, keys: list[str]) -> dict[str, bytes]:
        """Read ``keys`` from the engine; keep what came back untouched locally."""
        await self._listener.wait_subscribed()
        for key in keys:
            self._begin(key)
        epoch, sent = self._listener.epoch, time.monotonic()
        try:
            reply = await self._call("get", [self._entry(k) for k in keys])
        finally:
            latest = [self._end(k) for k in keys]
        seq, found = int(reply[0]), {}
        for i, key in enumerate(keys):
            raw = self._read(key, reply[2 * i + 1])
            if raw is None:
                continue
            found[key] = raw
            if latest[i] <= seq:  # no write after the read was heard of meanwhile
                self._install(key, raw, int(reply[2 * i + 2]), sent, epoch, seq)
        self.stats.remote_hits += len(found)
        self.stats.remote_misses += len(keys) - len(found)
        return found

    def _read(self, key: str, stored: bytes | None) -> bytes | None:
        if stored is None:
            return None
        try:
            return unpack(stored)
        except (ValueError, zlib.error) as exc:  # not written by this cache: a miss
            log.warning("cache %r: entry %r is unreadable (%s)", self.name, key, exc)
            return None

    # --- writes ----------------------------------------------------------------------

    async def set(self, key: str, value: Any, *, ttl: float | None = _MISSING) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds (the cache's by default;
        None: no expiry). Other processes' local copies are dropped."""
        await self.set_many({key: value}, ttl=ttl)

    async def set_many(self, items: Mapping[str, Any], *, ttl: float | None = _MISSING) -> None:
        """Store every item in one engine call (atomically), with one invalidation."""
        keys = _check_batch(list(items))
        ttl_ms = self._ttl_ms if ttl is _MISSING else _ttl_ms(_check_ttl(ttl, "ttl"))
        packed = [pack(items[k]) for k in keys]
        if not keys:
            return
        stored = [p[0] for p in packed]
        await self._write("set", keys, [ttl_ms, *stored], [p[1] for p in packed], ttl_ms)

    async def delete(self, *keys: str) -> int:
        """Remove ``keys`` everywhere; how many of them the engine had."""
        keys = tuple(_check_batch(list(keys)))
        if not keys:
            return 0
        existed, _ = await self._write("delete", list(keys), [], None, 0)
        return int(existed)

    async def _write(
        self, op: str, keys: list[str], args: list[Any], raws: list[bytes] | None, ttl_ms: int
    ) -> Any:
        await self._listener.wait_subscribed()
        for key in keys:
            self._begin(key)
        epoch, sent = self._listener.epoch, time.monotonic()
        message = self._message(keys)
        channel = self._client.keys.cache_channel
        try:
            result = await self._call(op, [self._entry(k) for k in keys], channel, message, *args)
        except BaseException:
            self._forget(keys)
            raise
        finally:
            latest = [self._end(k) for k in keys]
        seq = int(result[1] if op == "delete" else result)
        for key in keys:  # supersedes older copies and reads in flight here too
            self._touch(key, seq)
        if raws is not None:
            for key, raw, heard in zip(keys, raws, latest, strict=True):
                if heard <= seq:  # else another process wrote it after us meanwhile
                    self._install(key, raw, ttl_ms or -1, sent, epoch, seq)
        return result

    # --- single flight -----------------------------------------------------------------

    async def get_or_set(
        self,
        key: str,
        fn: Callable[[], Any | Awaitable[Any]],
        *,
        ttl: float | None = _MISSING,
    ) -> Any:
        """The value of ``key``; if the cache has none, ``fn()`` (a function or a
        coroutine function) computes it — once across every process of the
        namespace however many ask at the same time — and it is stored for ``ttl``.
        Concurrent callers in one process share the first caller's ``fn`` and its
        outcome (its exception too); when every caller was cancelled, the
        computation is cancelled too (and its fill lease released)."""
        raw = self._local_raw(key)
        if raw is not None:
            self.stats.local_hits += 1
            return _decode(raw)
        _check_key(key)
        if not callable(fn):
            raise ConfigurationError(
                f"get_or_set needs a function to compute the value, got {fn!r:.80}"
            )
        ttl_ms = self._ttl_ms if ttl is _MISSING else _ttl_ms(_check_ttl(ttl, "ttl"))
        self.stats.local_misses += 1
        flight = self._flights.get(key)
        if flight is None or flight.task is None or flight.task.done():  # never a landed one
            flight = self._flights[key] = _Flight()
            task = flight.task = asyncio.ensure_future(self._fill(key, fn, ttl_ms, flight))
            task.add_done_callback(lambda _: self._landed(key, flight))
        task = flight.task
        flight.callers += 1
        try:
            return _decode(await asyncio.shield(task))
        finally:
            flight.callers -= 1
            if flight.found is not None:  # per caller: the engine had it, or it was computed
                if flight.found:
                    self.stats.remote_hits += 1
                else:
                    self.stats.remote_misses += 1
            if flight.callers == 0 and not task.done():  # every caller gave up on it
                self._landed(key, flight)
                task.cancel()

    def _landed(self, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        task = flight.task
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: a flight no caller awaits any more is no error

    async def _fill(self, key: str, fn: Callable[[], Any], ttl_ms: int, flight: _Flight) -> bytes:
        waiter = asyncio.Event()
        try:
            return await self._look_or_compute(key, fn, ttl_ms, flight, waiter)
        finally:
            if self._waiters.get(key) is waiter:
                del self._waiters[key]

    async def _look_or_compute(
        self, key: str, fn: Callable[[], Any], ttl_ms: int, flight: _Flight, waiter: asyncio.Event
    ) -> bytes:
        await self._listener.wait_subscribed()
        holder = f"{self._client.client_id}:{new_id()}"
        lease_ms = int(self.options.fill_lease * 1000)
        while True:
            waiter.clear()
            self._waiters[key] = waiter  # before the look: no lost wake
            self._begin(key)
            epoch, sent = self._listener.epoch, time.monotonic()
            try:
                stored, pttl, leased, seq = await self._call(
                    "load", list(self._client.keys.cache(self.name, key)), holder, lease_ms
                )
            except asyncio.CancelledError:  # the script may have granted us the lease
                await asyncio.shield(self._release(key, holder))
                raise
            finally:
                latest = self._end(key)
            raw = self._read(key, stored)
            if flight.found is None:
                flight.found = raw is not None
            if raw is not None:
                if latest <= seq:
                    self._install(key, raw, int(pttl), sent, epoch, seq)
                return raw
            if leased:
                return await self._compute(key, fn, ttl_ms, holder)
            # Another process computes it: its write's message wakes us, or its lease
            # lapses (it died) and the next look takes the lease over.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), max(int(pttl), 10) / 1000)

    async def _compute(self, key: str, fn: Callable[[], Any], ttl_ms: int, holder: str) -> bytes:
        renewal = asyncio.create_task(self._renew(key, holder), name=f"shoal-cache-fill-{key}")
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await self._bounded(key, value)
            stored, raw = pack(value)
        except BaseException:
            renewal.cancel()
            await asyncio.shield(self._release(key, holder))
            raise
        renewal.cancel()
        channel = self._client.keys.cache_channel
        self._begin(key)
        epoch, sent = self._listener.epoch, time.monotonic()
        try:
            seq = await self._call(
                "fill", list(self._client.keys.cache(self.name, key)), channel,
                self._message([key]), ttl_ms, stored, holder,
            )  # fmt: skip
        except BaseException:
            self._forget([key])
            raise
        finally:
            latest = self._end(key)
        self._touch(key, seq)
        if latest <= seq:
            self._install(key, raw, ttl_ms or -1, sent, epoch, seq)
        return raw

    async def _bounded(self, key: str, computing: Awaitable[Any]) -> Any:
        """``fn``'s awaitable, cancelled past ``fill_timeout``: a hung computation
        would otherwise keep its lease renewed, and every waiter waiting, forever."""
        bound = self.options.fill_timeout
        try:
            return await asyncio.wait_for(computing, bound)
        except TimeoutError:
            raise TimeoutError(
                f"cache {self.name!r}: computing {key!r} took more than fill_timeout="
                f"{bound:g}s; it was cancelled (raise fill_timeout for slower computations)"
            ) from None

    async def _renew(self, key: str, holder: str) -> None:
        """Keep the fill lease while ``fn`` runs, so a slow computation is not
        taken for a dead one (and run twice)."""
        lease_ms = int(self.options.fill_lease * 1000)
        keys = list(self._client.keys.cache(self.name, key))
        while True:
            await asyncio.sleep(self.options.fill_lease / 3)  # the renewal's period
            try:
                if not await self._call("renew", keys, holder, lease_ms):
                    log.warning("cache %r: the fill lease of %r lapsed", self.name, key)
                    return
            except EngineUnavailable as exc:
                log.warning(
                    "cache %r: renewing the fill lease of %r failed: %s", self.name, key, exc
                )

    async def _release(self, key: str, holder: str) -> None:
        channel = self._client.keys.cache_channel
        try:
            await self._call(
                "release", list(self._client.keys.cache(self.name, key)), channel,
                self._message([key]), holder,
            )  # fmt: skip
        except EngineUnavailable as exc:  # the lease lapses by itself
            log.warning("cache %r: releasing the fill lease of %r failed: %s", self.name, key, exc)

    # --- plumbing ----------------------------------------------------------------------

    def _entry(self, key: str) -> str:
        return self._client.keys.cache_entry(self.name, key)

    def _message(self, keys: list[str]) -> bytes:
        return _encode((self._listener.writer, self.name, keys))

    async def _call(self, op: str, keys: list[str], *args: Any) -> Any:
        client = self._client
        async with client.errors():
            return await client.scripts.cache(keys, [client.keys.prefix, op, *args])

    def close(self) -> None:
        """Cancel fills in flight (their callers get CancelledError)."""
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        self.stats.sizes.discard(self)
        self._local.clear()


def _ttl_ms(ttl: float | None) -> int:
    """Milliseconds for the engine: 0 means no expiry (the script's convention)."""
    return 0 if ttl is None else max(int(ttl * 1000), 1)
