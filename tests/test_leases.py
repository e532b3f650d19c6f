"""Partition leases against the real engine: keepers of several (simulated) nodes
converge on the rendezvous assignment without ever sharing a partition, take over
a silent keeper's partitions when its leases expire, and stop a partition before
its lease can have expired when renewals fail."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from shoal.keys import Keys
from shoal.leases import Change, LeaseKeeper, Partition
from shoal.routing import assignment
from shoal.settings import Settings

PARTS = 32
TYPE = "counter"


class Recorder:
    """Collects what a keeper reports, from its thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[float, Change]] = []

    def __call__(self, change: Change) -> None:
        with self.lock:
            self.changes.append((time.monotonic(), change))

    def lost_at(self) -> float | None:
        with self.lock:
            return next((t for t, c in self.changes if c.lost), None)


@pytest.fixture
def engine(settings: Settings) -> Iterator[redis.Redis]:
    assert settings.url
    conn = redis.Redis.from_url(settings.url)
    yield conn
    conn.close()


def register(engine: redis.Redis, keys: Keys, node_id: str, weight: float = 1.0) -> None:
    """A live host of TYPE, as a node's heartbeat would record it (kept fresh for the
    test's length by a heartbeat far in the future)."""
    engine.zadd(keys.agent_hosts(TYPE), {node_id: int(time.time() * 1000) + 3_600_000})
    engine.hset(keys.node(node_id), "weight", weight)


def keeper(settings: Settings, node_id: str, lease: float = 0.6) -> tuple[LeaseKeeper, Recorder]:
    assert settings.url
    recorder = Recorder()
    k = LeaseKeeper(
        settings.url, Keys(settings.namespace), node_id, [TYPE], PARTS,
        lease_time=lease, interval=0.1, dead_after=3.0, notify=recorder,
    )  # fmt: skip
    return k, recorder


def wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)  # keepers run in their own threads: look again


def holders(engine: redis.Redis, keys: Keys) -> dict[int, tuple[str, int]]:
    values = engine.mget([keys.lease(TYPE, p) for p in range(PARTS)])
    out = {}
    for p, value in enumerate(values):
        if value:
            node, token = value.decode().split()
            out[p] = (node, int(token))
    return out


def test_keepers_converge_on_the_rendezvous_assignment(
    settings: Settings, engine: redis.Redis
) -> None:
    keys = Keys(settings.namespace)
    weights = {"a": 1.0, "b": 1.0, "c": 2.0}
    for node_id, weight in weights.items():
        register(engine, keys, node_id, weight)
    keepers = {n: keeper(settings, n)[0] for n in weights}
    for k in keepers.values():
        k.start()
    try:
        expected = assignment(PARTS, weights)
        wait_until(lambda: {p: n for p, (n, _) in holders(engine, keys).items()} == expected)
        owned: dict[Partition, str] = {}
        for node_id, k in keepers.items():
            for part in k.owned():
                assert part not in owned, f"{part} owned by {owned.get(part)} and {node_id}"
                owned[part] = node_id
        assert {p: n for (_, p), n in owned.items()} == expected
        counts = {n: list(expected.values()).count(n) for n in weights}
        assert counts["c"] > counts["a"] and counts["c"] > counts["b"], "weight 2 owns more"
    finally:
        for k in keepers.values():
            k.stop()


def test_a_silent_keepers_partitions_are_taken_after_its_leases_expire(
    settings: Settings, engine: redis.Redis
) -> None:
    keys = Keys(settings.namespace)
    register(engine, keys, "a")
    first, _ = keeper(settings, "a")
    first.start()
    wait_until(lambda: len(first.owned()) == PARTS)
    before = holders(engine, keys)
    first.stop()  # silent from now on: no renewals, no release
    engine.zrem(keys.agent_hosts(TYPE), "a")  # as the reaper does for a dead node
    register(engine, keys, "b")
    second, _ = keeper(settings, "b")
    second.start()
    try:
        wait_until(lambda: len(second.owned()) == PARTS)
        after = holders(engine, keys)
        for p in range(PARTS):
            assert after[p][0] == "b"
            assert after[p][1] > before[p][1], "a new owner gets a larger fencing token"
    finally:
        second.stop()


def test_a_keeper_that_cannot_renew_stops_before_its_leases_expire(
    settings: Settings, engine: redis.Redis
) -> None:
    """Writes are paused in the engine (CLIENT PAUSE), so renewals cannot get through:
    the keeper stops vouching for its partitions (``valid()``, checked before every
    turn) and reports them lost before the last renewal's lease ran out."""
    keys = Keys(settings.namespace)
    register(engine, keys, "a")
    lease_time = 2.0  # long enough that scheduling delays on a busy CI machine do not matter
    k, recorder = keeper(settings, "a", lease=lease_time)
    k.start()
    try:
        wait_until(lambda: len(k.owned()) == PARTS)
        part = (TYPE, 0)
        lease = k.valid(part)
        assert lease is not None
        engine.execute_command("CLIENT", "PAUSE", int(lease_time * 1000) + 1000, "WRITE")
        paused_at = time.monotonic()
        wait_until(lambda: k.valid(part) is None, timeout=5)
        invalid_at = time.monotonic()
        wait_until(lambda: recorder.lost_at() is not None, timeout=5)
        lost_at = recorder.lost_at()
        assert lost_at is not None
        # The last renewal that got through was sent before the pause, so every lease
        # lives until at least paused_at + lease_time in the engine.
        expires = paused_at + lease_time
        assert invalid_at < expires, "valid() must turn None before the lease expires"
        assert lost_at < expires, "the loss must be reported before the lease expires"
        assert k.owned() == {}
    finally:
        engine.execute_command("CLIENT", "UNPAUSE")
        k.stop()
