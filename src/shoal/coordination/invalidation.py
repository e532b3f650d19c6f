"""The cache's invalidation listener: one subscription per client, for all its caches.

Every cache write publishes ``<seq> [writer, cache, keys]`` (the write's number,
then msgpack) on the namespace's ``cache_changed`` shard channel from the script
that writes (shoal.keys); this listener drops the named local copies of the
client's caches (those older than the write) and wakes their ``get_or_set``
waiters. Our own writes' messages are applied too: the seq comparison keeps the
copy a write installed, and a write whose reply never came back (cancelled, or
its connection broke after the script ran) is still applied here.

Whether a local copy may be served at all is this listener's call — ``fresh()``:

* **A replaced connection loses messages.** redis-py reconnects a broken pub/sub
  connection by itself and subscribes again; whatever was published in between
  never arrives. So every (re)connection, and every error out of the read loop,
  drops the whole local level of every cache (``epoch`` grows, so reads that were
  in flight do not put old values back), and the level stays unused until the
  engine confirms the new subscription — and ``epoch`` grows again then, since a
  read sent before the confirmation may have been answered before a write whose
  message was never delivered to us.
* **A subscription the engine ended loses messages too.** On a Cluster, a slot
  migration (or a failover whose old primary stays up) makes the old owner send
  ``sunsubscribe``: the connection stays up and answers pings, but nothing is
  published to it any more. Any ``sunsubscribe``, or a pub/sub object that no
  longer counts a subscription, is treated as a broken connection: the level is
  dropped and the listener subscribes again, with a fresh slot map.
* **A silent connection may be delayed or dead.** The listener pings the engine
  every ``PING_EVERY_S`` of silence. A pong arrives after every message published
  before it (one ordered stream), so hearing anything at time t means every
  invalidation published before it was sent has been applied. Local copies are
  served only until ``LIVE_FOR_S`` after the last thing heard; past that, reads
  go to the engine until the listener hears again (or reconnects, and drops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from redis.asyncio.cluster import RedisCluster

from shoal.resilience import Backoff

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.cache")

PING_EVERY_S = 0.25  # a ping after this much silence
LIVE_FOR_S = 1.0  # local copies are served up to this long after the engine was last heard
SUBSCRIBE_WAIT_S = 5.0  # how long the first engine calls wait for the first subscription

_decode = msgspec.msgpack.Decoder(tuple[str, str, list[str]]).decode


class Invalidated(Protocol):
    """What the listener needs of a cache."""

    def invalidate(self, keys: list[str], seq: int, *, ours: bool) -> None: ...

    def drop_local(self) -> None: ...


class Listener:
    """The invalidation subscription of one client (see the module's docstring)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self.writer = client.client_id  # names our writes in their messages
        self.epoch = 0  # grows whenever the local levels were dropped
        self.live_until = 0.0  # monotonic time up to which local copies may be served
        self.reconnects = 0
        self._caches: dict[str, Invalidated] = {}
        self._confirmed = False  # the engine confirmed the current subscription
        # Set once the first subscription attempt had an outcome (confirmed or
        # failed), or the first wait for it gave up: later calls never wait.
        self._settled = asyncio.Event()
        self._attempts = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def add(self, name: str, cache: Invalidated) -> None:
        self._caches[name] = cache
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="shoal-cache-invalidation")

    async def wait_subscribed(self) -> None:
        """Wait for the outcome of the first subscription attempt, at most
        ``SUBSCRIBE_WAIT_S`` and only while no attempt has had one: a cache's
        first calls would otherwise run engine-only for no reason. Nothing is kept
        locally while unsubscribed (``fresh`` says no), so if the attempt failed
        (the engine is away, or the user may not subscribe to the channel) the
        cache works engine-only, without waiting, until a later attempt succeeds."""
        if self._settled.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), SUBSCRIBE_WAIT_S)
        self._settled.set()  # waited once: no call waits again

    def fresh(self, now: float) -> bool:
        return now < self.live_until

    async def close(self) -> None:
        # The flag as well as cancel(): redis-py's pub/sub read can swallow a
        # cancellation (see node._cancel_listener), so the loops look at it too.
        self._closing = True
        self._settled.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task], timeout=PING_EVERY_S + 1)
        self._drop("the client closed")
        self._caches.clear()

    # --- the loop ------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(cap=1.0)
        while not self._closing:
            owner, connection = None, None
            try:
                owner, pubsub = await self._subscribe()
                connection = pubsub.connection
                # Called on every reconnection redis-py makes by itself (it
                # resubscribes): what was published meanwhile is lost.
                connection.register_connect_callback(self._reconnected)
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the engine is away: engine-only until back
                self._settled.set()  # the attempt had its outcome: nobody waits for it
                # Said once per outage: a refused subscription (no channel permission)
                # fails on every attempt, each a second apart.
                level = (
                    logging.WARNING if self._confirmed or not backoff.failures else logging.DEBUG
                )
                log.log(level, "cache invalidation subscription lost (%s); resubscribing", exc)
            finally:
                if self._confirmed:  # it worked for a while: the next failure is a new one
                    backoff.reset()
                self._drop("the invalidation subscription ended")
                # The connection goes back to the client's blocking pool: its next
                # user (a lock wait, an inbox read) must not drop our levels.
                if connection is not None:
                    connection.deregister_connect_callback(self._reconnected)
                if owner is not None:
                    with contextlib.suppress(Exception):
                        await owner.aclose()
            await asyncio.sleep(backoff.next_delay())  # back off before resubscribing

    async def _subscribe(self) -> tuple[Any, Any]:
        """Subscribe; return the pub/sub object to close and the plain one that
        reads. On a Cluster the channel lives on one shard: its node's PubSub. A
        resubscription first reloads the slot map: the channel's slot may have
        moved (which is why the last subscription ended)."""
        conn, channel = self._client.blocking, self._client.keys.cache_channel
        self._attempts += 1
        owner = conn.pubsub()
        try:
            if isinstance(conn, RedisCluster):
                await conn.initialize()
                if self._attempts > 1:
                    await conn.nodes_manager.initialize()
                await owner.ssubscribe(channel)
                pubsub = next(iter(owner.node_pubsub_mapping.values()))
            else:
                await owner.ssubscribe(channel)
                pubsub = owner
        except BaseException:
            with contextlib.suppress(Exception):
                await owner.aclose()
            raise
        return owner, pubsub

    async def _reconnected(self, connection: Any) -> None:
        self.reconnects += 1
        self._drop("the invalidation connection was re-established")

    async def _read(self, pubsub: Any) -> None:
        heard = time.monotonic()
        while not self._closing:
            message = await pubsub.get_message(timeout=PING_EVERY_S)
            now = time.monotonic()
            if message is None:
                if now - heard > LIVE_FOR_S * 4:
                    raise ConnectionError(f"the engine was silent for {now - heard:.1f}s")
                await pubsub.ping()
                continue
            heard = now
            self._heard(message, now)
            if not pubsub.subscribed:  # e.g. redis-py moved it elsewhere: not ours to read
                raise ConnectionError("the pub/sub object no longer holds the subscription")

    def _heard(self, message: dict[str, Any], now: float) -> None:
        kind = message["type"]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind in ("sunsubscribe", "unsubscribe"):  # the engine ended it (a slot moved)
            raise ConnectionError("the engine ended the invalidation subscription")
        if kind == "ssubscribe" and not self._confirmed:  # local copies are safe again
            # Reads sent before this point may have been answered before a write
            # whose message we never got: they must not keep what they read.
            self.epoch += 1
            self._confirmed = True
            self._settled.set()
        if not self._confirmed:
            return
        self.live_until = now + LIVE_FOR_S
        if kind == "smessage":
            self._dispatch(message["data"])

    def _dispatch(self, data: bytes) -> None:
        seq, _, payload = data.partition(b" ")
        try:
            writer, name, keys = _decode(payload)
            number = int(seq)
        except (msgspec.DecodeError, ValueError):
            log.warning("cache invalidation: an unreadable message %r", data[:80])
            return
        cache = self._caches.get(name)
        if cache is not None:
            cache.invalidate(keys, number, ours=writer == self.writer)

    def _drop(self, why: str) -> None:
        self._confirmed = False
        self.live_until = 0.0
        self.epoch += 1
        for name, cache in list(self._caches.items()):
            log.debug("cache %r: local level dropped: %s", name, why)
            cache.drop_local()
