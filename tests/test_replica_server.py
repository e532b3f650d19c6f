"""The replica server that stands in for an external service, through its harness."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import asdict

import httpx
import pytest

from shoal.errors import ConfigurationError
from shoal.testing.replica import ReplicaError, ReplicaProcess, ReplicaSettings, replicas

from .conftest import eventually

DEFAULTS = asdict(ReplicaSettings())


@pytest.fixture(scope="module")
def group() -> Iterator[list[ReplicaProcess]]:
    """Three replicas, started together; the third is the one killed."""
    with replicas(3) as started:
        yield started


@pytest.fixture
def r1(group: list[ReplicaProcess]) -> ReplicaProcess:
    """The first replica, with default settings and zeroed counters (the second too)."""
    for replica in group[:2]:
        replica.control(**DEFAULTS, reset_stats=True)
    return group[0]


def http(timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, trust_env=False)


def test_replicas_started_together_run_on_their_own_ports(group: list[ReplicaProcess]) -> None:
    assert [replica.name for replica in group] == ["r1", "r2", "r3"]
    assert len({replica.port for replica in group}) == 3
    assert all(replica.alive for replica in group)
    assert group[1].url == f"http://127.0.0.1:{group[1].port}"


def test_a_request_is_echoed_with_the_replica_name(
    r1: ReplicaProcess, group: list[ReplicaProcess]
) -> None:
    with http() as client:
        answer = client.post(f"{r1.url}/v1/chat", json={"prompt": "hi"})
        plain = client.get(f"{group[1].url}/tools/search")
    assert answer.status_code == 200
    assert answer.json() == {
        "replica": "r1",
        "method": "POST",
        "path": "/v1/chat",
        "body": {"prompt": "hi"},
        "n": 1,
    }
    assert plain.json()["replica"] == "r2" and plain.json()["body"] is None


def test_fail_next_fails_that_many_requests_then_recovers(r1: ReplicaProcess) -> None:
    r1.control(fail_next=2)
    with http() as client:
        statuses = [client.get(f"{r1.url}/work").status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert r1.stats()["failures"] == 2
    assert r1.control()["fail_next"] == 0


def test_failures_carry_their_status_and_retry_after(r1: ReplicaProcess) -> None:
    r1.control(fail_next=1, fail_status=429, retry_after=2)
    with http() as client:
        answer = client.get(f"{r1.url}/work")
    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "2"


def test_a_fail_rate_fails_some_requests_and_counts_them(r1: ReplicaProcess) -> None:
    r1.control(fail_rate=0.5, fail_status=503)
    with http() as client:
        statuses = [client.get(f"{r1.url}/work").status_code for _ in range(40)]
    assert set(statuses) == {200, 503}
    assert r1.stats()["failures"] == statuses.count(503)


def test_latency_slows_each_answer(r1: ReplicaProcess) -> None:
    r1.control(latency=0.2)
    with http() as client:
        began = time.monotonic()
        answer = client.get(f"{r1.url}/slow")
        elapsed = time.monotonic() - began
    assert answer.status_code == 200
    assert elapsed >= 0.2


def test_a_hanging_replica_times_the_client_out(r1: ReplicaProcess) -> None:
    r1.control(hang=True)
    with http(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
        client.get(f"{r1.url}/stuck")
    r1.control(hang=False)
    with http() as client:
        assert client.get(f"{r1.url}/free").status_code == 200


async def test_a_hung_request_answers_once_hang_is_turned_off(r1: ReplicaProcess) -> None:
    await r1.acontrol(hang=True)
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        pending = asyncio.create_task(client.get(f"{r1.url}/stuck"))

        async def in_flight() -> bool:
            return bool((await r1.astats())["in_flight"] == 1)

        await eventually(in_flight, "the request to be in flight")
        assert not pending.done()
        await r1.acontrol(hang=False)
        assert (await pending).json()["path"] == "/stuck"


async def test_stats_count_concurrent_requests_in_flight(r1: ReplicaProcess) -> None:
    await r1.acontrol(hang=True)  # held until released: the slowest of requests
    async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
        pending = [asyncio.create_task(client.get(f"{r1.url}/slow/{i}")) for i in range(5)]

        async def all_in_flight() -> bool:
            return bool((await r1.astats())["in_flight"] == 5)

        await eventually(all_in_flight, "five requests in flight")
        await r1.acontrol(hang=False)
        answers = await asyncio.gather(*pending)
    assert sorted(answer.json()["n"] for answer in answers) == [1, 2, 3, 4, 5]
    stats = await r1.astats()
    assert (stats["requests"], stats["in_flight"], stats["max_in_flight"]) == (5, 0, 5)


def test_the_health_status_is_set_apart_from_the_traffic(r1: ReplicaProcess) -> None:
    r1.control(health_status=503, fail_rate=1.0)
    with http() as client:
        probe = client.get(f"{r1.url}/health")
        r1.control(health_status=200)
        healthy = client.get(f"{r1.url}/health")
    assert (probe.status_code, probe.json()) == (503, {"replica": "r1"})
    assert healthy.status_code == 200


def test_probes_are_counted_by_user_agent(r1: ReplicaProcess) -> None:
    with http() as client:
        for agent in ["prober-a", "prober-a", "prober-b"]:
            client.get(f"{r1.url}/health", headers={"User-Agent": agent})
        client.get(f"{r1.url}/work")
    stats = r1.stats()
    assert stats["probes"] == 3 and stats["requests"] == 1
    assert stats["probe_agents"] == {"prober-a": 2, "prober-b": 1}


def test_an_unknown_or_ill_typed_setting_is_refused_saying_why(r1: ReplicaProcess) -> None:
    with http() as client:
        unknown = client.post(f"{r1.url}/_control", json={"latncy": 1})
        ill_typed = client.post(f"{r1.url}/_control", json={"hang": "yes"})
    assert unknown.status_code == 400 and "unknown control key 'latncy'" in unknown.text
    assert ill_typed.status_code == 400 and "'hang' must be true or false" in ill_typed.text
    with pytest.raises(ConfigurationError, match="fail_rate"):
        r1.control(fail_rate=2)


def test_reset_stats_zeroes_the_counters(r1: ReplicaProcess) -> None:
    with http() as client:
        client.get(f"{r1.url}/work")
        client.get(f"{r1.url}/health")
    r1.control(reset_stats=True)
    stats = r1.stats()
    assert (stats["requests"], stats["probes"], stats["probe_agents"]) == (0, 0, {})


def test_a_killed_replica_refuses_connections_and_restarts_on_its_port(
    group: list[ReplicaProcess],
) -> None:
    r3 = group[2]
    port, pid = r3.port, r3.pid
    r3.kill()
    assert not r3.alive
    with http() as client, pytest.raises(httpx.ConnectError):
        client.get(f"{r3.url}/work")
    with pytest.raises(ReplicaError, match="not running"):
        r3.stats()
    r3.start()
    assert (r3.port, r3.stats()["requests"]) == (port, 0)
    assert r3.pid != pid


def test_a_paused_replica_accepts_connections_but_answers_nothing(
    group: list[ReplicaProcess],
) -> None:
    r2 = group[1]
    r2.pause()
    try:
        with http(timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            client.get(f"{r2.url}/health")
    finally:
        r2.resume()
    assert r2.stats()["probes"] >= 1  # answered once resumed


def test_a_replica_that_cannot_start_says_why(group: list[ReplicaProcess]) -> None:
    clash = ReplicaProcess("clash", port=group[0].port)
    with pytest.raises(ReplicaError, match=r"did not say READY(.|\n)*Address already in use"):
        clash.start()
    assert not clash.alive
