"""Sharded pub/sub: a channel lives in a hash slot, like a key.

Cancellations are published from inside the cancel script, which runs in the
task's slot: a shard channel of that slot (SPUBLISH) is the kind a script may
publish to on a Cluster, and it reaches only the shard that owns the slot instead
of every node of the Cluster. Valkey and Redis >= 7 serve shard channels on a
standalone server too, so one code path serves every topology. redis-py reads
them with ``get_message`` from a plain connection but with
``get_sharded_message`` from a Cluster one (which keeps a connection per shard):
this class hides that difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

log = logging.getLogger("shoal.channels")


class ShardSubscription:
    """A subscription to some shard channels on any topology."""

    def __init__(self, conn: Any, channels: Sequence[str]) -> None:
        self._cluster = isinstance(conn, RedisCluster)
        self._conn = conn
        self._pubsub = conn.pubsub()
        self._channels = list(channels)

    async def open(self) -> None:
        if self._cluster:
            await self._conn.initialize()  # the slot map: which shard serves each channel
        await self._pubsub.ssubscribe(*self._channels)

    async def next(self, timeout: float) -> bytes | None:
        """The next message's data, or None if none came within ``timeout``."""
        if self._cluster:
            message = await self._pubsub.get_sharded_message(
                ignore_subscribe_messages=True, timeout=timeout
            )
        else:
            message = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=timeout
            )
        if message is None or message.get("type") not in ("smessage", b"smessage"):
            return None
        data: bytes = message["data"]
        return data

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()


async def follow(
    redis: Any,
    channel: str,
    *,
    on_subscribed: Callable[[], Awaitable[None]],
    on_message: Callable[[bytes], Awaitable[None] | None],
    wait: float,
    stopped: Callable[[], bool],
    what: str,
) -> None:
    """Listen to one shard channel until ``stopped()``, for a watcher that also polls.

    After each (re)subscription ``on_subscribed`` catches up on what changed while
    not subscribed (messages sent meanwhile are lost); then ``on_message`` gets each
    message. A lost subscription is retried after ``wait`` seconds — the caller's
    poll keeps its view current meanwhile, so it is logged at debug level only.
    ``stopped`` is checked as well as cancellation: redis-py's pub/sub read can
    swallow a cancel."""
    while not stopped():
        subscription = ShardSubscription(redis, [channel])
        try:
            await subscription.open()
            await on_subscribed()
            while not stopped():
                data = await subscription.next(timeout=wait)
                if data is not None:
                    handled = on_message(data)
                    if inspect.isawaitable(handled):
                        await handled
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("%s: change subscription lost (%s); resubscribing", what, exc)
            await asyncio.sleep(wait)
        finally:
            await subscription.close()
