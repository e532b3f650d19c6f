"""A node cut off by the network — not killed, not paused: the engine and two nodes
in network namespaces of their own (tests/netns.py), and one node's link cut and
restored while capability tasks and agent messages keep coming.

The cut node keeps running with its connections open; nothing resets them. It must
find out by its own timeouts, while the engine's side declares it dead and the other
node takes its tasks and partitions. When the link returns, its hanging connections
resume, late, and whatever it finished meanwhile arrives late too: fencing must
refuse it. Every wait polls the engine for its condition, with a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shoal import Client, Settings, TaskHandle
from shoal.routing import assignment, partition_of
from tests import netns
from tests.conftest import eventually
from tests.netns import NetnsLab

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="network namespaces (ip netns) are Linux only"
)

REPO = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 3.0  # also the lease time (its default)
TAKEOVER_S = DEAD_AFTER_S + 2 * HEARTBEAT_S + 3.0  # + a reaper/keeper round each + slack
WORK_S = 1.5  # a work task: long enough to be cut mid-run
ROUND_S = 0.2  # pacing of the traffic: one round of tasks and messages
WORK_PER_ROUND = 2
AGENTS_PER_HOST = 12  # counter agents whose partitions rendezvous hashing gives each node


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[NetnsLab]:
    if reason := netns.unavailable():
        pytest.skip(reason)
    with NetnsLab(tmp_path, ["a", "b"]) as built:
        yield built


def start_node(lab: NetnsLab, host: str, namespace: str, logs: Path) -> subprocess.Popen[bytes]:
    """``shoal node`` inside ``host``'s namespace, named after it, logging to
    ``logs/<host>.log``; SIGTERM drains it within 2 s."""
    env = {**os.environ, "SHOAL_NAMESPACE": namespace, "SHOAL_REDIS_URL": lab.url_for(host)}
    args = [
        sys.executable, "-m", "shoal.cli", "node", "--app", "tests.hosts_app", "--name", host,
        "--heartbeat-interval", str(HEARTBEAT_S), "--dead-after", str(DEAD_AFTER_S),
        "--grace", "2", "--log-level", "info",
    ]  # fmt: skip
    with (logs / f"{host}.log").open("wb") as log:
        return lab.run_in(host, args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


# --- what the test sent ---------------------------------------------------------------


@dataclass
class Sent:
    """Every task and message the traffic sent, in order."""

    work: list[TaskHandle] = field(default_factory=list)
    increments: dict[str, list[TaskHandle]] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)  # agent -> messages sent


async def send_traffic(
    client: Client, runs: str, agents: list[str], sent: Sent, stop: asyncio.Event
) -> None:
    """Rounds until ``stop``: a few work tasks, and to every agent one increment (an
    addressed task) and one message — so each agent's messages go in sequence."""
    for agent in agents:
        sent.increments[agent], sent.messages[agent] = [], 0
    while not stop.is_set():
        base = len(sent.work)
        work = client.submit_many(
            "work",
            [{"runs": runs, "i": base + j, "seconds": WORK_S} for j in range(WORK_PER_ROUND)],
        )
        increments = asyncio.gather(*(client.submit("increment", agent=a, by=1) for a in agents))
        messages = asyncio.gather(*(client.send(a, {"seq": sent.messages[a]}) for a in agents))
        handles, added, _ = await asyncio.gather(work, increments, messages)
        sent.work += handles
        for agent, handle in zip(agents, added, strict=True):
            sent.increments[agent].append(handle)
            sent.messages[agent] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ROUND_S)


# --- what the engine says ---------------------------------------------------------------


async def lease_holders(client: Client, agent_type: str, count: int) -> dict[int, str | None]:
    """The node holding each partition's lease (``'<node> <token>'``), None if free."""
    raw = await client.redis.mget([client.keys.lease(agent_type, p) for p in range(count)])
    return {p: v.decode().rsplit(" ", 1)[0] if v else None for p, v in enumerate(raw)}


async def node_state(client: Client, node_id: str) -> tuple[str, bool]:
    """(state shown by ``cluster()``, whether the node is in the declared-dead set)."""
    nodes = {n.id: n.state for n in (await client.cluster()).nodes}
    declared = await client.redis.zscore(client.keys.dead_nodes, node_id) is not None
    return nodes.get(node_id, "absent"), declared


async def stale_turns(client: Client, agent_type: str) -> int:
    """Turns the engine refused because their node no longer held the lease. (With
    the key layout for Redis Cluster, ``keys.stats`` is a hash per key group; before
    it, one hash: this reads either.)"""
    keys: Any = client.keys
    hashes = [keys.stats(g) for g in range(keys.groups)] if callable(keys.stats) else [keys.stats]
    raws = [await client.redis.hget(key, f"stale_turns:{agent_type}") for key in hashes]
    return sum(int(raw or 0) for raw in raws)


async def records(client: Client, handles: list[TaskHandle]) -> list[dict[bytes, bytes]]:
    """Status, node and start time (ms) of each task, in one round trip."""
    pipe = client.redis.pipeline(transaction=False)
    for handle in handles:
        pipe.hmget(client.keys.task(handle.id), "status", "node", "started")
    return [
        dict(zip((b"status", b"node", b"started"), r, strict=True)) for r in await pipe.execute()
    ]


async def running_on(
    client: Client, handles: list[TaskHandle], node_id: str, left: float
) -> list[TaskHandle]:
    """Those of ``handles`` running on ``node_id`` with at least ``left`` seconds of
    their WORK_S still to go (so they are surely mid-run a moment later)."""
    now_ms = time.time() * 1000
    return [
        h for h, r in zip(handles, await records(client, handles), strict=True)
        if r[b"status"] == b"running" and r[b"node"] == node_id.encode()
        and now_ms - int(r[b"started"] or 0) < (WORK_S - left) * 1000
    ]  # fmt: skip


async def finished_on(client: Client, handles: list[TaskHandle], node_id: str) -> int:
    rows = await records(client, handles)
    return sum(r[b"status"] == b"succeeded" and r[b"node"] == node_id.encode() for r in rows)


def agents_owned(count: int, owners: dict[int, str], per_node: int) -> dict[str, list[str]]:
    """``per_node`` counter agent ids for each node, by the partition owner plan."""
    chosen: dict[str, list[str]] = {node: [] for node in set(owners.values())}
    for i in range(100_000):
        agent = f"counter/c{i}"
        mine = chosen[owners[partition_of(agent, count)]]
        if len(mine) < per_node:
            mine.append(agent)
        if all(len(ids) == per_node for ids in chosen.values()):
            return chosen
    raise AssertionError("could not place the agents")  # 2 nodes, 256 partitions: never


# --- the test -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_node_cut_off_by_the_network_is_replaced_and_rejoins_with_nothing_lost_or_repeated(
    lab: NetnsLab, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = Settings(url=lab.engine_url, namespace="hosts")
    runs = "probe:runs"  # the work capability's run log (outside Shoal's keys)
    procs = {host: start_node(lab, host, settings.namespace, tmp_path) for host in ("a", "b")}
    stop = asyncio.Event()
    sent = Sent()
    try:
        async with Client(settings=settings) as client:
            await client.wait_for_hosts("work", count=2, timeout=30)
            count = await client.partitions()
            plan = assignment(count, {"a": 1.0, "b": 1.0})

            async def settled() -> bool:
                return await lease_holders(client, "counter", count) == plan

            await eventually(settled, "counter partitions leased as planned to a and b", 20)
            agents = agents_owned(count, plan, AGENTS_PER_HOST)
            everyone = agents["a"] + agents["b"]
            before = await client.call("whereami", agent=agents["a"][0], result_timeout=10)
            assert before["node"] == "a"
            traffic = asyncio.create_task(send_traffic(client, runs, everyone, sent, stop))
            try:
                cut = await cut_and_take_over(lab, client, sent, count)
                restored_at = time.time()
                await asyncio.to_thread(lab.restore, "a")
                rejoined = time.monotonic()
                await rejoin(client, sent, settled)
                rejoin_s = time.monotonic() - rejoined
                after = await client.call("whereami", agent=agents["a"][0], result_timeout=10)
            finally:
                stop.set()
                await traffic
            refused = await check_outcomes(client, sent, runs, cut, restored_at)
            refused_turns = await stale_turns(client, "counter")
        exits = {h: await asyncio.to_thread(lab.stop, p) for h, p in procs.items()}
    except BaseException:
        for host in procs:
            print(f"--- node {host} ---\n{(tmp_path / f'{host}.log').read_text()[-6000:]}")
        raise
    log_a = (tmp_path / "a.log").read_text()
    print(
        f"cut: {len(sent.work)} work tasks ({len(cut)} running on a at the cut), "
        f"{sum(sent.messages.values())} messages and as many increments to {len(everyone)} "
        f"agents; a rejoined and settled {rejoin_s:.1f}s after the link returned; "
        f"late outcomes of a refused: {refused}, stale turns refused: {refused_turns}; "
        f"total {time.monotonic() - started:.1f}s"
    )
    assert after["node"] == "a", "a serves its agents again"
    assert after["token"] > before["token"], "under a newer lease"
    assert re.search(r"partition counter/\d+ lost", log_a), "a noticed it lost its leases"
    assert "a survivor declared this node dead" in log_a and "registered again" in log_a
    assert exits == {"a": 0, "b": 0}, "both drain and leave cleanly"


async def cut_and_take_over(
    lab: NetnsLab, client: Client, sent: Sent, count: int
) -> list[TaskHandle]:
    """Wait until a runs work (and finished some), cut its link, and wait until it is
    declared dead, b holds all its partitions and has finished the work a was
    running: return that work."""

    async def a_is_busy() -> list[TaskHandle]:
        if await finished_on(client, sent.work, "a") < 2:
            return []
        return await running_on(client, sent.work[-40:], "a", left=0.5)

    on_a = await eventually(a_is_busy, "a finished work and runs more", 20)
    await asyncio.to_thread(lab.cut, "a")

    async def a_declared_dead() -> bool:
        return await node_state(client, "a") == ("dead", True)

    async def b_holds_all() -> bool:
        holders = await lease_holders(client, "counter", count)
        return set(holders.values()) == {"b"}

    await eventually(a_declared_dead, "a declared dead", TAKEOVER_S)
    await eventually(b_holds_all, "b holds every counter partition", TAKEOVER_S)
    results = [await h.result(timeout=TAKEOVER_S + WORK_S) for h in on_a]
    infos = [await h.status() for h in on_a]
    assert {r["node"] for r in results} == {"b"}, "a's running work completed on b"
    assert [i.attempts for i in infos] == [2] * len(on_a)
    assert all([e.message for e in i.errors] == ["node died while running"] for i in infos)
    return on_a


async def rejoin(client: Client, sent: Sent, settled: Callable[[], Awaitable[bool]]) -> None:
    """After the link returns: a learns it was declared dead, registers again, gets
    its partitions back and runs work again."""

    async def a_alive() -> bool:
        return await node_state(client, "a") == ("alive", False)

    await eventually(a_alive, "a registered again", 20)
    await eventually(settled, "a holds its counter partitions again", 20)
    since = len(sent.work)

    async def a_works() -> int:
        return await finished_on(client, sent.work[since:], "a")

    await eventually(a_works, "a runs new work", 20)


async def check_outcomes(
    client: Client, sent: Sent, runs: str, cut: list[TaskHandle], restored_at: float
) -> int:
    """Every task succeeded, recorded once; every agent got each message exactly once,
    in order; no superseded run of a started after its link returned. Returns how
    many late outcomes were refused."""
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in sent.work)), 30)
    infos = [await h.status() for h in sent.work]
    assert [r["i"] for r in results] == list(range(len(sent.work)))
    assert {i.status for i in infos} == {"succeeded"}
    assert all(
        r["node"] == i.node and r["token"] == i.attempts
        for r, i in zip(results, infos, strict=True)
    ), "the recorded outcome is the last delivery's"
    rerun = {h.id for h, i in zip(sent.work, infos, strict=True) if i.attempts > 1}
    assert {h.id for h in cut} <= rerun and max(i.attempts for i in infos) == 2
    assert all(
        i.duplicates == 0 for h, i in zip(sent.work, infos, strict=True) if h.id not in rerun
    ), "only a superseded run's outcome can be refused as a duplicate"
    winners: list[int] = [0] * len(results)
    superseded = []
    for entry in await client.redis.lrange(runs, 0, -1):
        i, node, token, at = entry.decode().split()
        if (node, int(token)) == (results[int(i)]["node"], results[int(i)]["token"]):
            winners[int(i)] += 1
        else:
            superseded.append((int(i), node, int(token), float(at)))
    assert winners == [1] * len(results), "the run whose outcome counts ran once"
    assert all(node == "a" and token == 1 for _, node, token, _ in superseded), superseded
    late = [s for s in superseded if s[3] >= restored_at]
    assert late == [], "a started work it no longer owned after its link returned"

    for agent, handles in sent.increments.items():
        counts = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
        assert counts == list(range(1, len(handles) + 1)), f"{agent}: each increment once"

    async def all_messages_in() -> bool:
        states = [await client.agent_state(a) or {} for a in sent.messages]
        return all(
            len(s.get("seen", ())) >= sent.messages[a]
            for a, s in zip(sent.messages, states, strict=True)
        )

    await eventually(all_messages_in, "every message processed", 30, interval=0.1)
    for agent, n in sent.messages.items():
        state = await client.agent_state(agent)
        assert state == {
            "n": len(sent.increments[agent]),
            "seen": [{"seq": k} for k in range(n)],
        }, f"{agent}: each increment and message applied exactly once, in order"
    return sum(i.duplicates for i in infos)


# --- the lab itself -------------------------------------------------------------------


def listed_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def reaches(lab: NetnsLab, host: str, timeout: float = 0.5) -> bool:
    """Whether a TCP connection from ``host`` to the engine opens within ``timeout``."""
    address = lab.hosts[host].engine_address
    code = f"import socket; socket.create_connection(({address!r}, {netns.ENGINE_PORT}), {timeout})"
    return lab.run_in(host, [sys.executable, "-c", code], stderr=subprocess.DEVNULL).wait(10) == 0


def test_a_cut_silences_one_host_until_restored_and_the_lab_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    if reason := netns.unavailable():
        pytest.skip(reason)
    lab = NetnsLab(tmp_path, ["a", "b"])
    names = {lab.engine_netns, *(h.netns for h in lab.hosts.values())}
    started: list[subprocess.Popen[bytes]] = []

    def a_failing_test() -> None:
        with lab:
            assert names <= listed_namespaces()
            assert reaches(lab, "a") and reaches(lab, "b")
            lab.cut("a")
            assert not reaches(lab, "a") and reaches(lab, "b")
            lab.restore("a")
            assert reaches(lab, "a")
            started.extend([lab.run_in("a", ["sleep", "60"]), *filter(None, [lab.engine])])
            raise RuntimeError("a failing test")

    with pytest.raises(RuntimeError, match="a failing test"):
        a_failing_test()
    assert not names & listed_namespaces(), "the namespaces are deleted"
    assert [p.poll() is not None for p in started] == [True, True], "its processes ended"
    assert not lab.socket.parent.exists(), "the socket's directory is removed"
