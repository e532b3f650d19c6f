"""Active probes against real replicas: fall/rise, a killed replica, one elected
prober per service, takeover when the prober stops, probes inside a node."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from shoal import Client, Settings
from shoal.coordination import LockHolder
from shoal.probes import Probe, Prober, configure_probe, probe_configs
from shoal.registry import ServiceView
from shoal.testing.replica import ReplicaProcess, replicas
from tests.conftest import eventually, running_node
from tests.stateful import Counter

INTERVAL = 0.2


@contextlib.asynccontextmanager
async def prober(client: Client, name: str) -> AsyncIterator[Prober]:
    closing = asyncio.Event()
    running = Prober(client, name, scan=0.1)
    task = asyncio.create_task(running.run(closing))
    try:
        yield running
    finally:
        closing.set()
        await asyncio.wait_for(task, timeout=5)


async def status_of(view: ServiceView, instance: str, wanted: str, timeout: float) -> float:
    """Seconds until the view shows ``instance`` with ``wanted`` status."""
    started = time.monotonic()
    while view.by_id[instance].status != wanted:
        left = timeout - (time.monotonic() - started)
        assert left > 0 and await view.changed(timeout=left), (
            f"{instance} not {wanted} within {timeout}s (is {view.by_id[instance].status})"
        )
    return time.monotonic() - started


def probes_by(replica: ReplicaProcess) -> dict[str, int]:
    agents: dict[str, int] = replica.stats()["probe_agents"]
    return agents


async def test_probe_marks_down_after_fall_and_up_after_rise(client: Client) -> None:
    probe = Probe(path="/health", interval=INTERVAL, timeout=0.15, fall=3, rise=2)
    with replicas(2, names=["a", "b"]) as (a, b):
        for replica in (a, b):
            await client.registry.register("llm", replica.url, id=replica.name)
        await configure_probe(client, "llm", probe)
        assert await probe_configs(client) == {"llm": probe}
        view = await client.registry.watch("llm")
        async with prober(client, "p1"):
            await eventually(lambda: asyncio.sleep(0, a.stats()["probes"] > 0), "a probed")
            await eventually(lambda: asyncio.sleep(0, view.by_id["a"].health.p == "up"),
                             "a's first probe recorded")  # fmt: skip
            a.control(health_status=503)
            took = await status_of(view, "a", "down", timeout=probe.fall * INTERVAL + 1.5)
            assert took >= (probe.fall - 1) * INTERVAL  # not before `fall` probes failed
            assert view.by_id["b"].status == "up"
            pool = await client.services("llm").start()
            assert [r.id for r in pool.candidates()] == ["b"]  # out of rotation
            a.control(health_status=200)
            took = await status_of(view, "a", "up", timeout=probe.rise * INTERVAL + 1.5)
            assert took >= (probe.rise - 1) * INTERVAL

            b.kill()  # a dead replica: connection refused
            await status_of(view, "b", "down", timeout=probe.fall * INTERVAL + 1.5)
        await configure_probe(client, "llm", None)
        assert await probe_configs(client) == {}
        # no prober says so any more: the last verdict goes (a 'down' would stay for good)
        await status_of(view, "b", "up", timeout=1.5)


async def test_one_prober_at_a_time_and_takeover(client: Client, settings: Settings) -> None:
    probe = Probe(interval=INTERVAL, timeout=0.15)
    with replicas(1, names=["a"]) as (a,):
        await client.registry.register("llm", a.url, id="a")
        await configure_probe(client, "llm", probe)
        async with Client(settings=settings) as other:
            async with prober(client, "p1") as first, prober(other, "p2") as second:
                await eventually(lambda: asyncio.sleep(0, first.leading or second.leading),
                                 "a prober leads")  # fmt: skip
                leader, follower = (first, second) if first.leading else (second, first)
                a.control(reset_stats=True)
                await eventually(lambda: asyncio.sleep(0, a.stats()["probes"] >= 6),
                                 "six probes", timeout=5)  # fmt: skip
                agents = probes_by(a)
                assert list(agents) == [f"shoal-prober/{leader.prober_id}"], agents
                assert not follower.leading
            # both stopped: the leader resigned; a new prober takes over at once
            a.control(reset_stats=True)
            async with prober(other, "p3") as third:
                await eventually(lambda: asyncio.sleep(0, third.leading), "p3 leads", timeout=3)
                await eventually(lambda: asyncio.sleep(0, probes_by(a).get("shoal-prober/p3")),
                                 "p3's probes")  # fmt: skip


async def test_a_dead_probers_lease_lapses(client: Client, settings: Settings) -> None:
    """A prober that stops without resigning (its node was killed): another takes
    over after the lease (3 intervals, at least 1 s)."""
    probe = Probe(interval=INTERVAL, timeout=0.15)
    with replicas(1, names=["a"]) as (a,):
        await client.registry.register("llm", a.url, id="a")
        await configure_probe(client, "llm", probe)
        ghost = client.lock("leader:prober:llm", ttl=1.0, holder="ghost")
        taken, _ = await ghost._call("acquire", "ghost 0", 1000)  # no watchdog: never renewed
        assert taken
        assert await client.leader_of("prober:llm") == LockHolder("ghost", 1)
        async with prober(client, "heir") as heir:
            started = time.monotonic()
            await eventually(lambda: asyncio.sleep(0, heir.leading), "the heir leads", timeout=3)
            assert 0.5 <= time.monotonic() - started <= 2.0


async def test_nodes_probe_the_services(client: Client) -> None:
    """A node runs a prober: probed services are probed with no extra process."""
    with replicas(1, names=["a"]) as (a,):
        await client.registry.register("llm", a.url, id="a")
        await configure_probe(client, "llm", Probe(interval=INTERVAL, timeout=0.15, fall=2))
        view = await client.registry.watch("llm")
        async with running_node([Counter], client.settings):
            a.control(health_status=500)
            await status_of(view, "a", "down", timeout=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "health"}, "start with '/'"),
        ({"interval": 0.01}, "interval"),
        ({"interval": 1, "timeout": 2}, "at most the interval"),
        ({"fall": 0}, "fall"),
        ({"rise": 1000}, "rise"),
        ({"fall": 2.5}, "fall must be a whole number"),
        ({"interval": "1"}, "interval must be a number"),
        ({"path": 123}, "path must be a string"),
    ],
)
def test_bad_probe_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Probe(**kwargs)  # type: ignore[arg-type]
