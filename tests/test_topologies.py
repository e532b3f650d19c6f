"""The local topology harness: clusters and Sentinel groups form, survive a killed
node, and leave no process behind."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.sentinel import Sentinel

from shoal.testing import topologies
from shoal.testing.topologies import (
    SLOTS,
    LocalCluster,
    LocalSentinelGroup,
    Server,
    ServerExited,
)

PASSWORD = "s3cret"


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def admin(server: Server, password: str | None = PASSWORD) -> redis.Redis:
    return redis.Redis(port=server.port, password=password, decode_responses=True)


def slots_served_by(server: Server) -> set[int]:
    with admin(server) as client:
        ranges = client.execute_command("CLUSTER", "SLOTS")
    own = [r for r in ranges if r[2][2] == server.node_id]
    return {slot for first, last, *_ in own for slot in range(first, last + 1)}


def key_in(slots: set[int], client: RedisCluster) -> str:
    return next(k for k in (f"key-{i}" for i in range(100_000)) if client.keyslot(k) in slots)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    harness = LocalCluster(n_primaries=3, password=PASSWORD, base_dir=tmp_path)
    with harness:
        yield harness
    assert all(gone(node.pid) for node in harness.nodes)


def test_a_three_primary_cluster_serves_every_slot(cluster: LocalCluster) -> None:
    primaries = cluster.primaries
    served = [slots_served_by(node) for node in primaries]

    assert len(primaries) == 3 and cluster.replicas == []
    assert set().union(*served) == set(range(SLOTS))
    assert sum(len(slots) for slots in served) == SLOTS  # no slot twice
    seeds = ",".join(f"127.0.0.1:{node.port}" for node in primaries)
    assert cluster.url == f"redis+cluster://:{PASSWORD}@{seeds}"
    assert cluster.node_url(primaries[0].port) == (
        f"redis://:{PASSWORD}@127.0.0.1:{primaries[0].port}/0"
    )


def test_a_key_set_through_the_cluster_reads_back(cluster: LocalCluster) -> None:
    seed = cluster.primaries[1]
    with RedisCluster(host="127.0.0.1", port=seed.port, password=PASSWORD) as client:
        keys = [f"key-{i}" for i in range(50)]  # spread over all three primaries
        for key in keys:
            client.set(key, key.upper())

        assert [client.get(key) for key in keys] == [key.upper().encode() for key in keys]


def test_a_killed_primary_restarted_on_its_port_rejoins_with_its_slots(
    cluster: LocalCluster,
) -> None:
    victim = cluster.primaries[0]
    node_id, slots, old_pid = victim.node_id, slots_served_by(victim), victim.pid

    cluster.kill(victim.port)
    assert gone(old_pid)
    cluster.restart(victim.port)

    assert victim.alive and victim.pid != old_pid
    assert victim.node_id == node_id and slots_served_by(victim) == slots
    with RedisCluster(host="127.0.0.1", port=victim.port, password=PASSWORD) as client:
        key = key_in(slots, client)
        client.set(key, "back")
        assert client.get(key) == b"back"


def test_a_cluster_with_replicas_has_each_replica_replicating(tmp_path: Path) -> None:
    with LocalCluster(3, replicas_per_primary=1, base_dir=tmp_path) as cluster:
        primaries, replicas = cluster.primaries, cluster.replicas
        links = []
        for replica in replicas:
            with admin(replica, password=None) as client:
                info = client.info("replication")
            links.append((info["role"], info["master_link_status"], info["master_port"]))

        assert len(primaries) == 3 and len(replicas) == 3
        assert sorted(port for *_, port in links) == sorted(p.port for p in primaries)
        assert all(link[:2] == ("slave", "up") for link in links)
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
    assert all(gone(node.pid) for node in cluster.nodes)


def test_a_sentinel_group_fails_over_to_a_replica(tmp_path: Path) -> None:
    group = LocalSentinelGroup(replicas=2, sentinels=3, password=PASSWORD, base_dir=tmp_path)
    with group:
        hosts = [("127.0.0.1", s.port) for s in group.sentinels]
        assert group.url == (
            f"redis+sentinel://:{PASSWORD}@"
            + ",".join(f"{h}:{p}" for h, p in hosts)
            + f"/{group.service}"
        )
        write_through_sentinels(hosts, group.service, "before")

        old = group.kill_primary()
        started = time.monotonic()
        new = group.wait_failover(old, timeout=30)
        took = time.monotonic() - started

        assert new != old and new == group.primary_port()
        assert took < 30
        write_through_sentinels(hosts, group.service, "after")
        group.restart(old)  # comes back as a replica of the new primary
        with admin(group.data_nodes[0]) as client:
            assert client.info("replication")["master_port"] == new
    assert all(gone(server.pid) for server in group.data_nodes + group.sentinels)


def write_through_sentinels(hosts: list[tuple[str, int]], service: str, value: str) -> None:
    sentinel = Sentinel(hosts, socket_timeout=2, password=PASSWORD)
    primary = sentinel.master_for(service)
    try:
        primary.set("k", value)
        assert primary.get("k") == value.encode()
    finally:
        primary.close()
        for client in sentinel.sentinels:
            client.close()


def test_a_server_whose_port_was_taken_starts_on_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        handed_out: list[int] = []
        real_free_port = topologies._free_port

        def first_a_taken_port(claimed: set[int]) -> int:
            port = int(taken) if not handed_out else real_free_port(claimed)
            handed_out.append(port)
            return port

        monkeypatch.setattr(topologies, "_free_port", first_a_taken_port)
        with LocalSentinelGroup(replicas=0, sentinels=1, base_dir=tmp_path) as group:
            assert group.data_nodes[0].port not in (taken, 0)
            assert handed_out[0] == taken


def test_a_start_failing_half_way_stops_what_it_started_and_quotes_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_plan = LocalCluster._plan

    def third_is_broken(self: LocalCluster, port: int) -> Server:
        server = real_plan(self, port)
        if len(self._spawned) == 2:
            server.args += ["--no-such-option", "yes"]
        return server

    monkeypatch.setattr(LocalCluster, "_plan", third_is_broken)
    cluster = LocalCluster(3, base_dir=tmp_path)

    with pytest.raises(ServerExited, match="no-such-option"):
        cluster.start()
    assert len(cluster._spawned) == 3
    assert all(gone(server.pid) for server in cluster._spawned)
