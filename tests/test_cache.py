"""The two-level cache against the real engine: invalidation across processes, single
flight under a stampede from three processes, a filler killed mid-computation, the
local level dropped when the invalidation connection is lost or the engine ends the
subscription (a slot moved to another Cluster shard), reads racing a resubscription,
a write whose reply never came, users without channel permission, expiry, the byte
bound, compression, metrics and bad input (helper processes: tests/cache_procs.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from redis.crc import key_slot

from shoal import Agent, Client, ConfigurationError, Settings, capability
from shoal.coordination.cache import COMPRESS_OVER, ENTRY_OVERHEAD, MAX_BATCH
from shoal.engine import EmbeddedEngine
from shoal.errors import EngineError, EngineUnavailable, SerializationError
from shoal.observability import metrics
from shoal.testing.topologies import HOST, LocalCluster
from tests.cache_procs import computed_key
from tests.conftest import eventually, helper_process, read_line, running_node


def cache_process(settings: Settings, *args: str) -> Any:
    return helper_process(settings, "tests.cache_procs", *args)


async def ask(proc: subprocess.Popen[str], command: str) -> Any:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(await read_line(proc))


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


# --- across processes ---------------------------------------------------------------


async def test_a_write_in_one_process_drops_the_local_copies_of_another_within_milliseconds(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("shared", ttl=60)  # a long ttl: only invalidation can refresh
    await cache.set("user:1", {"name": "ada"})
    with cache_process(settings, "follow") as other:
        assert await read_line(other) == "ready"
        assert await ask(other, "get user:1") == [{"name": "ada"}, "remote"]
        assert await ask(other, "get user:1") == [{"name": "ada"}, "local"]

        await cache.set("user:1", {"name": "grace"})
        loop = asyncio.get_running_loop()
        written = loop.time()
        await eventually(
            lambda: _shows(other, "user:1", {"name": "grace"}),
            "the other process sees the new value",
            timeout=2,
            interval=0.001,
        )
        assert loop.time() - written < 0.5

        await cache.delete("user:1")
        await eventually(lambda: _shows(other, "user:1", None), "the other process sees none")

        # The other way: a write there drops this process's local copy.
        await cache.set("user:2", 1)
        assert cache.peek("user:2") == 1  # the writer keeps its own fresh copy
        assert await ask(other, "set user:2 2") == "ok"
        await eventually(lambda: _gone(cache, "user:2"), "the local copy dropped", timeout=2)
        assert await cache.get("user:2") == 2


async def _shows(proc: subprocess.Popen[str], key: str, want: Any) -> bool:
    value, _level = await ask(proc, f"get {key}")
    return bool(value == want)


async def _gone(cache: Any, key: str) -> bool:
    return cache.peek(key) is None


async def test_a_stampede_of_100_misses_over_3_processes_computes_the_value_once(
    client: Client, settings: Settings
) -> None:
    with (
        cache_process(settings, "stampede", "34") as a,
        cache_process(settings, "stampede", "33") as b,
        cache_process(settings, "stampede", "33") as c,
    ):
        procs = (a, b, c)
        assert [await read_line(p) for p in procs] == ["ready"] * 3
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        assert [json.loads(await read_line(p)) for p in procs] == [["computed"]] * 3
    assert int(await client.redis.get(computed_key(client))) == 1
    assert await client.cache("stampede", ttl=60).get("report") == "computed"


async def test_when_the_process_computing_a_value_dies_another_takes_over_after_its_lease(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("takeover", fill_lease=1)
    with cache_process(settings, "hang") as filler:
        assert await read_line(filler) == "computing"  # it holds the fill lease
        waiting = asyncio.create_task(cache.get_or_set("slow", lambda: "taken over"))
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done, "computed while another process held the fill lease"
        filler.kill()
        assert await asyncio.wait_for(waiting, timeout=3) == "taken over"  # lease 1 s + slack


async def test_a_failing_computation_hands_the_fill_to_a_waiter_at_once(settings: Settings) -> None:
    release = asyncio.Event()

    async def fail() -> str:
        await release.wait()
        raise RuntimeError("backend down")

    async with Client(settings=settings) as a, Client(settings=settings) as b:
        first = a.cache("handover", fill_lease=30)  # a lapse would take 30 s: not it
        second = b.cache("handover", fill_lease=30)
        failing = asyncio.create_task(first.get_or_set("k", fail))
        lease = a.keys.cache("handover", "k")[1]
        await eventually(lambda: a.redis.exists(lease), "the first caller holds the lease")
        waiting = asyncio.create_task(second.get_or_set("k", lambda: "second"))
        release.set()
        with pytest.raises(RuntimeError, match="backend down"):
            await failing
        assert await asyncio.wait_for(waiting, timeout=2) == "second"


async def test_a_computation_past_fill_timeout_is_cancelled_and_its_lease_released(
    client: Client,
) -> None:
    cache = client.cache("bounded-fill", fill_lease=30, fill_timeout=0.2)
    cancelled = asyncio.Event()

    async def hang() -> str:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    with pytest.raises(TimeoutError, match=r"took more than fill_timeout=0\.2s"):
        await asyncio.wait_for(cache.get_or_set("k", hang), 3)
    assert cancelled.is_set()
    assert not await client.redis.exists(client.keys.cache("bounded-fill", "k")[1])
    assert await cache.get_or_set("k", lambda: "next") == "next"


async def test_a_fill_whose_callers_all_gave_up_is_cancelled_and_releases_its_lease(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("abandoned", fill_lease=30)  # a lapse would take 30 s
    lease = client.keys.cache("abandoned", "k")[1]
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return "never"

    callers = [asyncio.create_task(cache.get_or_set("k", slow)) for _ in range(2)]
    await asyncio.wait_for(started.wait(), 3)
    callers[0].cancel()
    await asyncio.sleep(0.05)  # one caller left: the fill goes on
    assert not cancelled.is_set() and await client.redis.exists(lease)
    callers[1].cancel()
    await asyncio.wait_for(cancelled.wait(), 2)
    await eventually(lambda: _absent(client, lease), "the lease released", timeout=2)
    async with Client(settings=settings) as other:
        computed = other.cache("abandoned", fill_lease=30).get_or_set("k", lambda: "other")
        assert await asyncio.wait_for(computed, 2) == "other"
    assert all(c.cancelled() for c in callers) and not cache._flights


async def test_a_get_or_set_cancelled_as_the_lease_is_granted_releases_it(client: Client) -> None:
    cache = client.cache("granted", fill_lease=30)
    real = cache._call

    async def granted_then_cancelled(op: str, keys: list[str], *args: Any) -> Any:
        reply = await real(op, keys, *args)
        if op == "load":
            assert reply[2] == 1  # the lease is ours
            raise asyncio.CancelledError
        return reply

    cache._call = granted_then_cancelled  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await cache.get_or_set("k", lambda: "never")
    del cache._call
    assert not await client.redis.exists(client.keys.cache("granted", "k")[1])


async def test_a_new_caller_never_gets_a_landed_flight_s_old_error(client: Client) -> None:
    cache = client.cache("relanded")

    def fail() -> str:
        raise RuntimeError("backend down")

    caller = asyncio.ensure_future(cache.get_or_set("k", fail))
    await asyncio.sleep(0)  # the flight is registered
    flight = cache._flights["k"]
    with pytest.raises(RuntimeError):
        await caller
    cache._flights["k"] = flight  # as between its end and its done-callback
    assert await cache.get_or_set("k", lambda: "fresh") == "fresh"


@pytest.mark.topology
async def test_writes_invalidate_other_clients_on_every_topology(settings: Settings) -> None:
    async with Client(settings=settings) as a, Client(settings=settings) as b:
        writer, reader = a.cache("everywhere"), b.cache("everywhere")
        await writer.set_many({"k": 1, "j": 2})
        assert await reader.get_many(["k", "j"]) == {"k": 1, "j": 2}
        assert reader.peek("k") == 1
        await writer.set("k", 3)
        await eventually(lambda: _gone(reader, "k"), "the reader's copy dropped", timeout=2)
        assert await reader.get("k") == 3 and reader.peek("j") == 2
        assert await reader.get_or_set("new", lambda: "computed") == "computed"
        assert await writer.get("new") == "computed"
        assert not writer._waiters and not reader._waiters and not reader._flights


# --- connection loss ------------------------------------------------------------------


@pytest.fixture
def own_engine(tmp_path: Path) -> Iterator[Settings]:
    engine = EmbeddedEngine(tmp_path / "engine")
    record = engine.ensure()
    yield Settings(url=record.url, namespace="cache")
    engine.stop()


async def test_a_process_whose_invalidation_connection_broke_drops_its_local_level(
    own_engine: Settings,
) -> None:
    async with Client(settings=own_engine) as client:
        cache = client.cache("profiles", ttl=60)
        await cache.set("p", "old")
        assert cache.peek("p") == "old"
        # A write whose message this process never gets (as when its connection is down):
        entry = client.keys.cache_entry("profiles", "p")
        stored = await client.redis.get(entry)
        await client.redis.set(entry, stored.replace(b"old", b"new"))
        assert await cache.get("p") == "old"  # served locally: nothing said otherwise
        killed = await client.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 1  # (this test's own engine: only its listener subscribes)
        assert await eventually(lambda: _fetched(cache, "p", "new"), "the stale copy dropped")
        assert cache.stats.dropped >= 1
        # Once subscribed again, the local level fills again.
        await eventually(lambda: _local(cache, "p", "new"), "local copies kept again", timeout=5)


async def _fetched(cache: Any, key: str, want: Any) -> bool:
    return bool(await cache.get(key) == want)


async def _local(cache: Any, key: str, want: Any) -> bool:
    await cache.get(key)
    return bool(cache.peek(key) == want)


async def test_a_silent_invalidation_connection_stops_local_hits_until_the_engine_answers(
    own_engine: Settings,
) -> None:
    async with Client(settings=own_engine) as client:
        cache = client.cache("quiet", ttl=60)
        await cache.set("k", 1)
        dropped = cache.stats.dropped
        await client.redis.execute_command("CLIENT", "PAUSE", "2000", "ALL")
        # The listener's pings go unanswered: past its bound the copy is not served.
        await eventually(lambda: _gone(cache, "k"), "local hits stopped", timeout=1.9)
        # The pause ends; a pong proves nothing was missed: the same copy serves again.
        assert await eventually(lambda: _peeked(cache, "k"), "served again", timeout=5) == 1
        assert cache.stats.dropped == dropped


async def _peeked(cache: Any, key: str) -> Any:
    return cache.peek(key)


async def _attempt_failed(listener: Any, epoch: int) -> bool:
    return bool(listener.epoch > epoch and not listener._confirmed)


async def _confirmed(listener: Any) -> bool:
    return bool(listener._confirmed)


def as_user(settings: Settings, user: str) -> Settings:
    assert settings.url
    parts = urlsplit(settings.url)
    netloc = f"{user}:{ACL_PASSWORD}@{parts.hostname}:{parts.port}"
    return Settings(url=urlunsplit(parts._replace(netloc=netloc)), namespace=settings.namespace)


ACL_PASSWORD = "cache-test"


async def acl(admin: Client, user: str, *rules: str) -> None:
    await admin.redis.execute_command("ACL", "SETUSER", user, *rules)


async def may_subscribe(admin: Client, user: str, allowed: bool) -> None:
    """Changing a user's channel permissions ends its subscriptions (the engine
    closes their connections); without them every resubscription is refused."""
    await acl(admin, user, "&*" if allowed else "resetchannels")


async def refused_for_a_while(admin: Client, user: str, listener: Any) -> None:
    """Refuse ``user``'s subscriptions until its listener backs off for >= 0.4 s
    between attempts (Backoff: 50 ms doubling, capped at 1 s, x0.5..1), and return
    just after an attempt failed: the next one is at least 0.4 s away."""
    await may_subscribe(admin, user, allowed=False)
    await eventually(lambda: _attempts_at_least(listener, 6), "six refused attempts")
    epoch = listener.epoch
    await eventually(lambda: _attempt_failed(listener, epoch), "an attempt failed", interval=0.001)


async def _attempts_at_least(listener: Any, n: int) -> bool:
    return bool(listener._attempts >= n)


async def test_a_read_answered_before_the_resubscription_is_confirmed_is_not_kept(
    own_engine: Settings,
) -> None:
    """A read sent while unsubscribed, answered before a write whose message is lost
    (nobody listened), must not keep its value when its reply is handled after the
    new subscription was confirmed: the confirmation advances the epoch."""
    async with Client(settings=own_engine) as admin:
        await acl(admin, "gap", "reset", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all")
        async with Client(settings=as_user(own_engine, "gap")) as client:
            cache, writer = client.cache("gap", ttl=None), admin.cache("gap", ttl=None)
            listener = client._cache_listener
            await writer.set("k", "old")
            assert await cache.get("k") == "old" and cache.peek("k") == "old"
            await refused_for_a_while(admin, "gap", listener)
            real = cache._call

            async def read_across_the_resubscription(op: str, keys: list[str], *args: Any) -> Any:
                assert op == "get" and not listener._confirmed
                reply = await real(op, keys, *args)  # answered while unsubscribed: "old"
                await writer.set("k", "new")  # its message reaches no one here
                await may_subscribe(admin, "gap", allowed=True)
                await eventually(lambda: _confirmed(listener), "subscribed again", timeout=3)
                return reply  # handled after the confirmation

            cache._call = read_across_the_resubscription  # type: ignore[method-assign]
            assert await cache.get("k") == "old"  # what the engine said when asked
            del cache._call
            assert cache.peek("k") is None, "a read older than the subscription was kept"
            assert await cache.get("k") == "new"


async def test_the_listener_leaves_no_reconnect_callback_on_connections_it_gave_back(
    own_engine: Settings,
) -> None:
    """A subscription attempt that ended returns its connection to the client's
    blocking pool; the next user of that connection (a lock wait, an inbox read)
    must not drop the local levels when it connects."""
    async with Client(settings=own_engine) as admin:
        await acl(admin, "pool", "reset", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all")
        async with Client(settings=as_user(own_engine, "pool")) as client:
            cache = client.cache("pooled", ttl=None)
            listener = client._cache_listener
            await refused_for_a_while(admin, "pool", listener)  # it gave its connection back
            reconnects = listener.reconnects
            # The most recently released connection (redis-py's pools are LIFO) is the
            # listener's; a blocking pop takes it and connects it again.
            await client.blocking.blpop([client.keys.prefix + "nothing"], timeout=0.05)
            assert listener.reconnects == reconnects
            await may_subscribe(admin, "pool", allowed=True)
            await eventually(lambda: _confirmed(listener), "subscribed again", timeout=3)
            await cache.set("k", 1)
            dropped, reconnects = cache.stats.dropped, listener.reconnects
            await admin.redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            for _ in range(3):  # the blocking pool's connections reconnect: not the listener
                await client.blocking.blpop([client.keys.prefix + "nothing"], timeout=0.05)
            assert (listener.reconnects, cache.stats.dropped) == (reconnects, dropped)
            assert cache.peek("k") == 1


async def test_a_user_who_may_not_subscribe_reads_engine_only_without_waiting(
    own_engine: Settings,
) -> None:
    """Without channel permission the subscription is refused on every attempt:
    reads go to the engine at once (no wait for a subscription that will not come)
    and nothing is kept locally; writes (which publish) are refused by the engine."""
    async with Client(settings=own_engine) as admin:
        await acl(admin, "reader", "reset", "on", f">{ACL_PASSWORD}", "~*", "resetchannels")
        await acl(admin, "reader", "+@all")
        await admin.cache("readonly").set_many({"a": 1, "b": 2})
        async with Client(settings=as_user(own_engine, "reader")) as client:
            cache = client.cache("readonly")
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(5):
                assert await cache.get("a") == 1
                assert await cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
                assert await cache.get_or_set("b", lambda: 0) == 2
            assert loop.time() - started < 2.0  # each call waited 5 s before the fix
            assert cache.peek("a") is None and cache.stats.local_hits == 0
            with pytest.raises(EngineError, match="No permissions to access a channel"):
                await cache.set("a", 3)


def move_slot(cluster: LocalCluster, slot: int) -> tuple[int, int]:
    """Migrate ``slot`` to another primary the way an operator does (IMPORTING and
    MIGRATING, MIGRATE its keys, then SETSLOT NODE everywhere); the old primary
    stays up. Returns the old and the new owner's ports."""
    nodes = {n.port: redis.Redis(host=HOST, port=n.port, decode_responses=True)
             for n in cluster.primaries}  # fmt: skip
    try:
        owners = {p: r.execute_command("CLUSTER", "MYID") for p, r in nodes.items()}
        slots = next(iter(nodes.values())).execute_command("CLUSTER", "SLOTS")
        source = next(int(r[2][1]) for r in slots if r[0] <= slot <= r[1])
        target = next(p for p in nodes if p != source)
        src, dst = nodes[source], nodes[target]
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", owners[source])
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", owners[target])
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", HOST, target, "", 0, 5000, "KEYS", *keys)
        for port in (target, source, *(p for p in nodes if p not in (source, target))):
            nodes[port].execute_command("CLUSTER", "SETSLOT", slot, "NODE", owners[target])
        return source, target
    finally:
        for node in nodes.values():
            node.close()


def shard_subscribers(port: int, channel: str) -> int:
    with redis.Redis(host=HOST, port=port) as node:
        return int(node.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


@pytest.mark.slow
async def test_when_the_cache_slot_moves_to_another_shard_the_listener_follows_it(
    tmp_path: Path,
) -> None:
    """On a Cluster, moving the namespace's control slot to another primary (the old
    one stays up) makes the old owner end the shard subscription (sunsubscribe): the
    connection still answers pings, but no invalidation reaches it any more. The
    listener drops the local level and subscribes on the new owner; no stale copy
    survives (ttl=None: only an invalidation could end it)."""
    with LocalCluster(3, 0, base_dir=tmp_path) as cluster:
        settings = Settings(url=cluster.url, namespace="moving")
        async with Client(settings=settings) as a, Client(settings=settings) as b:
            reader, writer = a.cache("moving", ttl=None), b.cache("moving", ttl=None)
            await writer.set("k", 1)
            assert await reader.get("k") == 1 and reader.peek("k") == 1
            channel = a.keys.cache_channel
            slot = key_slot(channel.encode())
            source, target = await asyncio.to_thread(move_slot, cluster, slot)
            await writer.set("k", 2)  # on the new owner (b follows the MOVED)
            await eventually(lambda: _fetched(reader, "k", 2), "no stale copy", timeout=3)
            await eventually(  # both clients' listeners
                lambda: asyncio.to_thread(lambda: shard_subscribers(target, channel) == 2),
                "subscribed on the new owner",
                timeout=5,
            )
            assert shard_subscribers(source, channel) == 0
            await eventually(lambda: _local(reader, "k", 2), "local copies kept again", timeout=5)
            await writer.set("k", 3)
            await eventually(lambda: _gone(reader, "k"), "invalidated again", timeout=2)
            assert await reader.get("k") == 3


@pytest.mark.parametrize("outcome", [asyncio.CancelledError, EngineUnavailable])
async def test_a_write_that_ran_but_whose_reply_was_lost_leaves_no_old_copy(
    client: Client, outcome: type[BaseException]
) -> None:
    """The engine ran the write, but the writer never saw its reply (cancelled, or
    the connection broke, just then): it must not go on serving its old copy."""
    cache = client.cache("unsure", ttl=None)
    await cache.set("k", 1)
    assert cache.peek("k") == 1
    real = cache._call

    async def ran_then_lost(op: str, keys: list[str], *args: Any) -> Any:
        await real(op, keys, *args)
        raise outcome("the reply was lost")

    cache._call = ran_then_lost  # type: ignore[method-assign]
    with pytest.raises(outcome):
        await cache.set("k", 2)
    with pytest.raises(outcome):
        await cache.delete("j")
    del cache._call
    assert cache.peek("k") is None
    assert await cache.get("k") == 2


async def test_a_cancelled_write_that_runs_later_still_invalidates_the_writer(
    client: Client,
) -> None:
    """A cancelled command can still run in the engine afterwards (it was sent):
    its message, applied by the writer too, drops what the writer read meanwhile."""
    cache = client.cache("late", ttl=None)
    await cache.set("k", 1)
    real, go = cache._call, asyncio.Event()
    later: list[asyncio.Task[Any]] = []

    async def runs_after_the_cancel(op: str, keys: list[str], *args: Any) -> Any:
        async def run() -> Any:
            await go.wait()
            return await real(op, keys, *args)

        later.append(asyncio.create_task(run()))
        raise asyncio.CancelledError

    cache._call = runs_after_the_cancel  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await cache.set("k", 2)
    del cache._call
    assert await cache.get("k") == 1 and cache.peek("k") == 1  # it has not run yet
    go.set()
    await later[0]
    await eventually(lambda: _fetched(cache, "k", 2), "the late write seen", timeout=2)


async def test_the_writer_applies_its_own_messages_and_keeps_its_fresh_copy(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("own", ttl=None)
    async with Client(settings=settings) as other:
        await cache.set("mine", 1)
        await cache.get("theirs")
        await other.cache("own", ttl=None).set("theirs", 2)  # published after ours
        assert await cache.get("theirs") == 2 and cache.peek("theirs") == 2
        await other.cache("own", ttl=None).set("theirs", 3)
        await eventually(lambda: _gone(cache, "theirs"), "their write's message applied")
    assert cache.peek("mine") == 1  # our own message, applied before theirs, kept it
    assert sample("shoal_cache_invalidations_total", cache="own") == 1  # theirs only


# --- expiry, bound, encoding ----------------------------------------------------------


async def test_a_local_copy_never_outlives_its_engine_entry(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("short", ttl=0.3)
    async with Client(settings=settings) as other:
        reader = other.cache("short", ttl=0.3)
        await cache.set("k", "v")
        assert await reader.get("k") == "v" and reader.peek("k") == "v"
        entry = client.keys.cache_entry("short", "k")
        await eventually(lambda: _absent(client, entry), "the engine entry expired", interval=0.005)
        assert reader.peek("k") is None and cache.peek("k") is None
        assert await reader.get("k") is None
    await cache.set("forever", 1, ttl=None)
    assert await client.redis.pttl(client.keys.cache_entry("short", "forever")) == -1


async def _absent(client: Client, key: str) -> bool:
    return not await client.redis.exists(key)


async def test_the_local_level_keeps_within_its_byte_bound(client: Client) -> None:
    cache = client.cache("bounded", max_local_bytes=20_000)
    value = "x" * 1000
    for i in range(100):
        await cache.set(f"k{i}", f"{i}{value}")
    held = sample("shoal_cache_local_bytes", cache="bounded")
    assert 15_000 < held <= 20_000
    assert cache.peek("k99") is not None and cache.peek("k0") is None  # least recent went
    await cache.set("huge", "y" * 30_000)  # bigger than the whole bound: engine only
    assert cache.peek("huge") is None and await cache.get("huge") == "y" * 30_000
    assert sample("shoal_cache_local_bytes", cache="bounded") <= 20_000
    wide = client.cache("wide-keys")
    await wide.set("é" * 100, b"")  # 200 bytes of UTF-8 in 100 characters
    assert wide.local_bytes() == 2 + 200 + ENTRY_OVERHEAD  # msgpack b"" is 2 bytes
    engine_only = client.cache("engine-only", max_local_bytes=0)
    await engine_only.set("k", 1)
    assert engine_only.peek("k") is None and await engine_only.get("k") == 1


async def test_large_values_are_compressed_in_the_engine_and_read_back_whole(
    client: Client, settings: Settings
) -> None:
    cache = client.cache("blobs")
    document = {"text": "the tide comes in " * 1000, "n": [1, 2, 3]}
    noise = os.urandom(COMPRESS_OVER * 2)  # incompressible: stored as it is
    await cache.set_many({"doc": document, "noise": noise, "small": "s" * 100})
    stored = {
        k: await client.redis.get(client.keys.cache_entry("blobs", k))
        for k in ("doc", "noise", "small")
    }
    assert stored["doc"][:1] == b"\x01" and len(stored["doc"]) < 2000
    assert stored["noise"][:1] == b"\x00" and stored["small"][:1] == b"\x00"
    async with Client(settings=settings) as other:
        found = await other.cache("blobs").get_many(["doc", "noise", "small", "none"])
    assert found == {"doc": document, "noise": noise, "small": "s" * 100}


async def test_a_caller_mutating_a_returned_value_does_not_change_the_cache(client: Client) -> None:
    cache = client.cache("immutable")
    await cache.set("k", {"items": [1]})
    (await cache.get("k"))["items"].append(2)
    assert await cache.get("k") == {"items": [1]}


# --- metrics, the handler context, closing -------------------------------------------


async def test_hits_and_misses_are_counted_per_level(client: Client) -> None:
    cache = client.cache("counted")

    def figures() -> list[float]:
        return [
            sample(f"shoal_cache_{what}_total", cache="counted", level=level)
            for what in ("hits", "misses")
            for level in ("local", "remote")
        ]

    assert await cache.get("a") is None  # local miss, remote miss
    await cache.set("a", 1)
    assert await cache.get("a") == 1  # local hit (the writer's own copy)
    assert await cache.get_many(["a", "b"]) == {"a": 1}  # local hit; local + remote miss
    assert figures() == [2, 0, 2, 2]  # local hits, remote hits, local misses, remote misses
    cache.drop_local()
    assert await cache.get("a") == 1  # local miss, remote hit
    assert figures() == [2, 1, 3, 2]
    with pytest.raises(ConfigurationError):
        await cache.get("")  # not a key: not a miss either
    assert figures() == [2, 1, 3, 2]


async def test_get_or_set_counts_one_remote_hit_or_miss_per_caller(
    client: Client, settings: Settings
) -> None:
    """A caller counts a remote miss when the value had to be computed (here or by
    another process it waited for), a remote hit when the engine had it."""
    cache = client.cache("counted-fill")
    release = asyncio.Event()

    async def slow() -> str:
        await release.wait()
        return "v"

    def figures() -> list[float]:
        return [
            sample(f"shoal_cache_{what}_total", cache="counted-fill", level="remote")
            for what in ("hits", "misses")
        ]

    async with Client(settings=settings) as other:
        filling = asyncio.create_task(cache.get_or_set("k", slow))
        lease = client.keys.cache("counted-fill", "k")[1]
        await eventually(lambda: client.redis.exists(lease), "the first process fills")
        waiting = [other.cache("counted-fill").get_or_set("k", slow) for _ in range(3)]
        waiters = asyncio.gather(*waiting)  # they wait for the fill, then read it
        await asyncio.sleep(0.05)
        release.set()
        assert [await filling, *await waiters] == ["v"] * 4
        assert figures() == [0, 4]  # four callers, all of a value that was computed
        other.cache("counted-fill").drop_local()
        assert await asyncio.gather(*(other.cache("counted-fill").get_or_set("k", slow)
                                      for _ in range(2))) == ["v", "v"]  # fmt: skip
        assert figures() == [2, 4]


class Profiles(Agent):
    @capability("profile")
    async def profile(self, user: str) -> Any:
        async def load() -> dict[str, str]:
            return {"user": user, "by": self.ctx.node_id}

        return await self.ctx.cache("profiles", ttl=30).get_or_set(user, load)


async def test_a_handler_caches_through_its_context(client: Client, settings: Settings) -> None:
    async with running_node([Profiles], settings) as node:
        first = await client.call("profile", user="ada")
        assert first == {"user": "ada", "by": node.node_id}
        assert await client.call("profile", user="ada") == first
        assert await client.cache("profiles", ttl=30).get("ada") == first


async def test_a_closing_client_stops_its_invalidation_listener(settings: Settings) -> None:
    async with Client(settings=settings) as client:
        cache = client.cache("closing")
        await cache.set("k", 1)
        listener = client._cache_listener
        assert listener is not None and listener._task is not None
        task = listener._task
    assert task.done() and cache.peek("k") is None
    assert client._cache_listener is None


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "bad name"}, "cache name 'bad name' is invalid"),
        ({"name": "a:b"}, "cache name 'a:b' is invalid"),
        ({"ttl": 0}, "ttl must be None"),
        ({"ttl": True}, "ttl must be None"),
        ({"ttl": "60"}, "ttl must be None"),
        ({"max_local_bytes": -1}, "max_local_bytes must be a whole number"),
        ({"max_local_bytes": 1.5}, "max_local_bytes must be a whole number"),
        ({"fill_lease": 0.01}, "fill_lease must be a number of seconds within 0.1..300"),
        ({"fill_timeout": 0}, "fill_timeout must be a number of seconds within 0.1..86400"),
        ({"fill_timeout": None}, "fill_timeout must be a number of seconds"),
    ],
)
async def test_bad_cache_options_are_refused_saying_what_is_allowed(
    client: Client, options: dict[str, Any], message: str
) -> None:
    name = options.pop("name", "fine")
    with pytest.raises(ConfigurationError, match=message):
        client.cache(name, **options)


async def test_bad_keys_values_and_calls_are_refused(client: Client) -> None:
    cache = client.cache("strict", ttl=10)
    with pytest.raises(ConfigurationError, match="already open in this client"):
        client.cache("strict", ttl=20)
    assert client.cache("strict", ttl=10) is cache
    for key in ("", 42, "k" * 1025):
        with pytest.raises(ConfigurationError, match=r"cache key .* is invalid"):
            await cache.get(key)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache key"):
        await cache.get(["unhashable"])  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match="cannot be cached"):
        await cache.set("k", object())
    with pytest.raises(ConfigurationError, match="ttl must be None"):
        await cache.set("k", 1, ttl=-5)
    with pytest.raises(ConfigurationError, match="needs a function"):
        await cache.get_or_set("k", 42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=f"at most {MAX_BATCH} keys"):
        await cache.get_many(f"k{i}" for i in range(MAX_BATCH + 1))
    assert await cache.delete() == 0 and await cache.get_many([]) == {}
