"""Failover on real scaled-out engines: a Sentinel group losing its primary and a
Cluster losing a shard (with and without a replica to promote), while node
processes work through a steady stream of tasks and agent messages; and what
``ack_replicas`` (WAIT) promises when replicas are gone or paused. (Moving a slot
between shards while Shoal runs is not supported: see docs/scale-out.md.)

Each test starts a private topology under ``tmp_path`` (it kills servers), so the
session's engines are never touched. What "nothing acknowledged is lost" means is
spelled out by ``Load`` and ``assert_nothing_acknowledged_was_lost``: a submit that
returned (with ``ack_replicas=1``: after a replica has it) ends ``succeeded`` as
exactly one task; one that raised is submitted again with the same idempotency key
until it returns, which is safe by design; counters count each increment once.
What a user sees is printed as one line per test (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal import Client, Settings, TaskHandle
from shoal.errors import (
    EngineUnavailable,
    ReplicationTimeout,
    ResultTimeout,
    ShoalError,
    TaskNotFound,
)
from shoal.resilience import Backoff
from shoal.testing.topologies import LocalCluster, LocalSentinelGroup
from tests.conftest import REPO, eventually, node_env, node_process

T = TypeVar("T")

APP = "tests.scale_out_app"
PASSWORD = "scale-out-pw"
PERIOD_S = 0.02  # one operation of each kind every 20 ms: a steady stream
COUNTERS = [f"counter/inc-{i}" for i in range(4)]  # addressed `increment` tasks
MAILBOXES = [f"counter/msg-{i}" for i in range(4)]  # plain `send` messages
ACK_BOUND_S = 40.0  # an operation retried this long without an acknowledgement fails
# Retried here, with the same idempotency key: the errors of a failover window.
TRANSIENT = (EngineUnavailable, ReplicationTimeout)


@dataclass
class Failure:
    """One try of an operation that raised (and was tried again)."""

    at: float  # monotonic, when the try started
    took: float
    what: str
    error: str
    message: str = ""


@dataclass
class Load:
    """A steady stream from one client: capability tasks (``whoami``), ``increment``
    tasks addressed to counters, and messages sent to mailbox agents — each kind in
    its own loop, one operation per ``PERIOD_S``.

    Submits carry an idempotency key and are tried again after a transient error
    until one returns; what returned is the acknowledged work the assertions hold
    the engine to. Sends have no key: a send that raised may or may not have landed,
    so the sequence numbers tried and the ones acknowledged are kept apart.
    """

    client: Client
    prefix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    tasks: dict[str, TaskHandle] = field(default_factory=dict)  # idempotency key ->
    increments: dict[str, dict[str, TaskHandle]] = field(default_factory=dict)  # agent ->
    sent: dict[str, set[int]] = field(default_factory=dict)  # agent -> seqs acknowledged
    tried: dict[str, set[int]] = field(default_factory=dict)  # agent -> seqs attempted
    failures: list[Failure] = field(default_factory=list)
    acks: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, kind)
    retried_keys: set[str] = field(default_factory=set)
    tolerate: tuple[type[Exception], ...] = TRANSIENT  # the errors tried again

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._paced(stop, self._task))
            group.create_task(self._paced(stop, self._increment))
            group.create_task(self._paced(stop, self._send))

    async def _paced(
        self, stop: asyncio.Event, operation: Callable[[int], Awaitable[None]]
    ) -> None:
        i = 0
        while not stop.is_set():
            await operation(i)
            i += 1
            with contextlib.suppress(TimeoutError):  # the pace of the stream, or the stop
                await asyncio.wait_for(stop.wait(), PERIOD_S)

    async def _task(self, i: int) -> None:
        key = f"{self.prefix}-task-{i}"
        self.tasks[key] = await self.acknowledged(
            "task", key, lambda: self.client.submit("whoami", i=i, idempotency_key=key)
        )

    async def _increment(self, i: int) -> None:
        agent, key = COUNTERS[i % len(COUNTERS)], f"{self.prefix}-inc-{i}"
        self.increments.setdefault(agent, {})[key] = await self.acknowledged(
            "increment",
            key,
            lambda: self.client.submit("increment", agent=agent, idempotency_key=key),
        )

    async def _send(self, i: int) -> None:
        agent = MAILBOXES[i % len(MAILBOXES)]
        self.tried.setdefault(agent, set()).add(i)
        await self.acknowledged("send", f"send-{i}", lambda: self.client.send(agent, i))
        self.sent.setdefault(agent, set()).add(i)

    async def acknowledged(self, kind: str, key: str, operation: Callable[[], Awaitable[T]]) -> T:
        """``operation()``'s result, trying again after a transient error (bounded)."""
        backoff, deadline = Backoff(cap=0.5), time.monotonic() + ACK_BOUND_S
        while True:
            started = time.monotonic()
            try:
                result = await operation()
            except self.tolerate as exc:
                took = time.monotonic() - started
                self.failures.append(Failure(started, took, kind, type(exc).__name__, str(exc)))
                self.retried_keys.add(key)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(backoff.next_delay())  # back-off before trying again
                continue
            self.acks.append((time.monotonic(), kind))
            return result

    def longest_ack_gap(self, after: float) -> float:
        """The longest time without any acknowledgement, from ``after`` (the kill)."""
        times = [after, *sorted(t for t, _ in self.acks if t > after)]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# --- what the engine must hold afterwards ------------------------------------------------


@dataclass
class Outcome:
    """What became of a Load's work, read back from the engine."""

    infos: dict[str, Any]  # idempotency key -> TaskInfo of every submitted task
    results: dict[str, Any]  # idempotency key -> its result
    records: dict[str, int]  # capability -> task records in the namespace
    counters: dict[str, int]  # counter agent -> its saved n
    seen: dict[str, list[int]]  # mailbox agent -> the messages it saved, in order
    completed_at: list[int]  # finished_at (ms) of every task, sorted


async def finish(load: Load, timeout: float = 30.0) -> Outcome:
    """Wait (bounded) for every acknowledged task and message, then read it all back."""
    client = load.client
    handles = dict(load.tasks)
    for by_key in load.increments.values():
        handles.update(by_key)
    waits = {key: asyncio.ensure_future(h.result()) for key, h in handles.items()}
    await asyncio.wait(waits.values(), timeout=timeout)
    results: dict[str, Any] = {}
    for key, wait in waits.items():
        if not wait.done():
            wait.cancel()  # unfinished: its record's status tells why, below
        elif wait.exception() is None:
            results[key] = wait.result()
    await asyncio.gather(*waits.values(), return_exceptions=True)

    async def delivered() -> bool:
        states = await asyncio.gather(*(client.agent_state(a) for a in load.sent))
        seen = [set((s or {}).get("seen", ())) for s in states]
        return all(have >= load.sent[a] for a, have in zip(load.sent, seen, strict=True))

    with contextlib.suppress(AssertionError):  # a lost message is reported below
        await eventually(delivered, "every acknowledged message handled", timeout, 0.1)
    infos = {key: await h.status() for key, h in handles.items()}
    counters = {a: ((await client.agent_state(a)) or {}).get("n", 0) for a in load.increments}
    seen = {a: ((await client.agent_state(a)) or {}).get("seen", []) for a in load.tried}
    return Outcome(
        infos=infos,
        results=results,
        records=await task_records(client),
        counters=counters,
        seen=seen,
        completed_at=sorted(i.finished_at for i in infos.values() if i.finished_at),
    )


async def task_records(client: Client) -> dict[str, int]:
    """Task records in the namespace per capability (a scan of every shard): a task
    submitted twice under one idempotency key would show as one record too many."""
    counts: dict[str, int] = {}
    async with client.errors():
        keys = [k async for k in client.redis.scan_iter(match="shoal:{*}:task:*", count=1000)]
        pipe = client.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hget(key, "cap")
        for cap in await pipe.execute():
            counts[cap.decode()] = counts.get(cap.decode(), 0) + 1
    return counts


def assert_nothing_acknowledged_was_lost(
    load: Load, outcome: Outcome, others: dict[str, int] | None = None
) -> None:
    """Every acknowledged submit ended succeeded, as exactly one task; every counter
    counted each of its acknowledged increments once; every acknowledged message
    was handled, and nothing that was never sent was."""
    unfinished = {
        k: f"{i.status} on {i.node} (group {load.client.keys.task_group(i.id)})"
        for k, i in outcome.infos.items()
        if i.status != "succeeded"
    }
    assert unfinished == {}, "every acknowledged task succeeded"
    assert [outcome.results[k]["i"] for k in load.tasks] == list(range(len(load.tasks)))
    expected = {
        "whoami": len(load.tasks),
        "increment": sum(len(by_key) for by_key in load.increments.values()),
    }
    for capability, count in (others or {}).items():  # tasks submitted besides the stream
        expected[capability] = expected.get(capability, 0) + count
    assert outcome.records == expected, "one task record per submit: none lost, none doubled"
    for agent, by_key in load.increments.items():
        assert outcome.counters[agent] == len(by_key), f"{agent} counted each increment once"
        assert sorted(outcome.results[k] for k in by_key) == list(range(1, len(by_key) + 1)), (
            f"the increments of {agent} ran one at a time, each on the last saved count"
        )
    for agent, tried in load.tried.items():
        seen = set(outcome.seen[agent])
        assert load.sent.get(agent, set()) - seen == set(), (
            f"{agent} lost acknowledged messages (sends are not WAITed: docs/scale-out.md "
            "counts this among what a failover can lose; rare, as they replicate at once)"
        )
        assert seen <= tried, f"{agent} handled messages that were never sent"


def report(name: str, load: Load, outcome: Outcome, killed: float, **measured: float) -> None:
    """One line per test run with what a user would have seen (pytest -s shows it)."""
    kinds = collections.Counter(f"{f.what}:{f.error}" for f in load.failures)
    doubled = sum(len(s) - len(set(s)) for s in outcome.seen.values())
    reruns = sum(1 for i in outcome.infos.values() if i.attempts > 1)
    gaps = [b - a for a, b in itertools.pairwise(outcome.completed_at)]
    figures = ", ".join(f"{k} {v:.2f}s" for k, v in measured.items())
    print(
        f"\n{name}: {len(load.tasks)} tasks, "
        f"{sum(len(b) for b in load.increments.values())} increments, "
        f"{sum(len(s) for s in load.tried.values())} sends; "
        f"client: longest time without an acknowledgement after the kill "
        f"{load.longest_ack_gap(killed):.2f}s, transient errors {dict(kinds) or 'none'} "
        f"on {len(load.retried_keys)} operation(s); nodes: longest gap between two "
        f"completions {max(gaps, default=0) / 1000:.2f}s, {reruns} task(s) run again, "
        f"{sum(i.duplicates for i in outcome.infos.values())} late outcome(s) refused; "
        f"messages handled twice {doubled}; {figures}"
    )


LONG_S = 5.0  # running through the whole failover


async def start_long_tasks(client: Client, count: int) -> list[TaskHandle]:
    """``count`` tasks that run through the failover, started on the nodes."""
    handles = [await client.submit("nap", seconds=LONG_S, i=i) for i in range(count)]
    await eventually(lambda: _all_running(client, handles), "the long tasks running", 10)
    return handles


async def taken_over(handles: list[TaskHandle]) -> dict[str, str]:
    """Long tasks that did not run once on their first node: after the failover,
    a survivor took them from a live node (or they failed)."""
    waits = [asyncio.ensure_future(h.result()) for h in handles]
    await asyncio.wait(waits, timeout=LONG_S + 15)
    for wait in waits:
        wait.cancel()  # those still waiting: their status says why, below
    await asyncio.gather(*waits, return_exceptions=True)
    out = {}
    for handle in handles:
        info = await handle.status()
        if info.status != "succeeded" or info.attempts != 1:
            reasons = "; ".join(e.message for e in info.errors)
            out[handle.id] = f"{info.status}, attempt {info.attempts}: {reasons}"
    return out


# --- topologies and nodes ----------------------------------------------------------------


@contextlib.contextmanager
def nodes(settings: Settings, *names: str) -> Iterator[None]:
    """``shoal node`` processes of the app; each drains (SIGTERM) on exit."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(node_process(settings, APP, "--name", name))
        yield


async def ready(client: Client, count: int) -> None:
    """Until ``count`` nodes host the app and the counter type is registered."""
    await client.wait_for_hosts("whoami", count=count, timeout=20)
    await eventually(lambda: _has_counter(client), "the counter type registered", 20)


async def _has_counter(client: Client) -> bool:
    return "counter" in await client.agent_types()


async def alive_since(client: Client, names: set[str], since_wall: float) -> bool:
    """Whether every named node is alive and has heartbeated after ``since_wall``."""
    state = await client.cluster()
    fresh = {
        n.id
        for n in state.nodes
        if n.state == "alive" and time.time() - n.heartbeat_age_s > since_wall
    }
    return names <= fresh


# --- 1. Sentinel: the primary is killed under load ------------------------------------


@pytest.mark.slow
async def test_sentinel_failover_under_load_loses_nothing_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the primary mid-stream: clients and nodes follow the Sentinels to
    the promoted replica and carry on; every submit that returned (on a replica,
    by WAIT) ends succeeded once, counters count each increment once, every send
    that returned is handled (sends are not WAITed, but replicate as fast as the
    reply travels), and tasks running on the live nodes through the outage are not
    taken from them (docs/scale-out.md: "no node declares another dead in the first
    dead_after after the engine came back")."""
    monkeypatch.setenv("SHOAL_ACK_REPLICAS", "1")  # the nodes' results are WAITed too
    with LocalSentinelGroup(replicas=2, sentinels=3, password=PASSWORD, base_dir=tmp_path) as group:
        settings = Settings(url=group.url, namespace="scale-out", ack_replicas=1, engine_timeout=5)
        async with Client(settings=settings) as client:
            with nodes(settings, "n1", "n2"):
                await ready(client, 2)
                load, stop = Load(client), asyncio.Event()
                stream = asyncio.create_task(load.run(stop))
                try:
                    await eventually(lambda: _acked(load, 150), "the stream flows", 20)
                    long = await start_long_tasks(client, 4)
                    old = await asyncio.to_thread(group.kill_primary)
                    killed, killed_wall = time.monotonic(), time.time()
                    new = await asyncio.to_thread(group.wait_failover, old)
                    failed_over = time.monotonic() - killed
                    wanted = len(load.acks) + 150
                    await eventually(lambda: _acked(load, wanted), "acks after the failover", 30)
                    nodes_back = await eventually(
                        lambda: alive_since(client, {"n1", "n2"}, killed_wall + 1),
                        "both nodes heartbeat through the new primary",
                        30,
                    )
                    nodes_back_after = time.monotonic() - killed
                finally:
                    stop.set()
                    await stream
                after = await client.submit_many("whoami", [{"i": i} for i in range(20)])
                fresh = await asyncio.wait_for(asyncio.gather(*(h.result() for h in after)), 20)
                outcome = await finish(load)
                long_taken = await taken_over(long)
    report(
        "sentinel failover", load, outcome, killed,
        sentinels_failed_over=failed_over, nodes_heartbeating_again=nodes_back_after,
    )  # fmt: skip
    assert new != old and nodes_back
    assert [r["i"] for r in fresh] == list(range(20)), "new work after the failover runs"
    assert any(t > killed + failed_over for t, _ in load.acks), "the stream went on"
    assert_nothing_acknowledged_was_lost(load, outcome, {"whoami": len(after), "nap": len(long)})
    assert long_taken == {}, "tasks running on live nodes were not taken from them"


async def _acked(load: Load, count: int) -> bool:
    return len(load.acks) >= count


async def _refused(load: Load) -> bool:
    return any(f.error == "ReplicationTimeout" for f in load.failures)


# --- 2. WAIT when no replica answers -------------------------------------------------------


async def test_a_submit_no_replica_acknowledges_raises_but_stays_on_the_primary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ack_replicas=1 and every replica gone, submit raises ReplicationTimeout
    after ack_timeout, saying so; the task is on the primary nevertheless (a WAIT
    does not undo a write) and runs. ack_replicas=0 submits as usual."""
    monkeypatch.setenv("SHOAL_ACK_REPLICAS", "1")  # the node's results are WAITed too
    with LocalSentinelGroup(replicas=2, sentinels=1, password=PASSWORD, base_dir=tmp_path) as group:
        primary = group.primary_port()
        for replica in [s for s in group.data_nodes if s.port != primary]:
            group.kill(replica.port)
        acked = Settings(url=group.url, namespace="no-replica", ack_replicas=1, ack_timeout=0.5)
        async with (
            Client(settings=acked) as client,
            Client(settings=acked.with_(ack_replicas=0)) as unacked,
        ):
            started = time.monotonic()
            first = await submit_outcome(client, "k1", full=True)
            took = time.monotonic() - started
            again = await submit_outcome(client, "k1")  # sent again: still no replica has it
            found = await unacked.submit("echo", value="v", idempotency_key="k1")
            plain = await unacked.submit("echo", value="plain")
            queued = [(await h.status()).status for h in (found, plain)]
            with nodes(acked, "lonely"):
                results = [await h.result(timeout=20) for h in (found, plain)]
    print(f"\nno replica: submit raised after {took:.2f}s: {first}")
    assert first == (
        "ReplicationTimeout: the submitted task(s) reached 0 of 1 replica(s) in time: the "
        "primary has it, but a failover now could lose it (check the replicas' health, or "
        "lower ack_replicas / raise ack_timeout)"
    )
    assert again == "ReplicationTimeout: reached 0 of 1 replica(s)"
    assert 0.5 <= took < 0.5 + 2.0, "it waited for ack_timeout, not longer"
    assert not found.is_new, "the key names the task the failed submit stored"
    assert queued == ["queued", "queued"]
    assert results == ["v", "plain"], "a result whose WAIT fell short is recorded anyway"


def test_ack_replicas_0_from_the_environment_turns_the_wait_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0 is ack_replicas' default and documented meaning ("the primary's
    acknowledgement is enough"), so SHOAL_ACK_REPLICAS=0 must be accepted — it is
    how a deployment that set it switches the WAIT off again (``shoal node`` and
    every CLI command read it)."""
    monkeypatch.setenv("SHOAL_ACK_REPLICAS", "0")
    assert Settings.from_env().ack_replicas == 0


async def test_a_resubmit_with_the_same_key_is_acknowledged_only_once_a_replica_has_it(
    tmp_path: Path,
) -> None:
    """After a ReplicationTimeout the docs advise submitting again with the same
    idempotency key. That retry returning must mean what a first submit returning
    means: a replica has the task. Here the only replica is paused (SIGSTOP: still
    connected, acknowledging nothing), so every try must fail — also from another
    process (``shoal submit``), whose connection wrote nothing before (WAIT counts
    the writes of its own connection)."""
    with LocalSentinelGroup(replicas=1, sentinels=1, password=PASSWORD, base_dir=tmp_path) as group:
        (replica,) = [s for s in group.data_nodes if s.port != group.primary_port()]
        settings = Settings(url=group.url, namespace="retry-ack", ack_replicas=1, ack_timeout=0.5)
        async with Client(settings=settings) as client:
            await client.submit("echo", value="warm-up")  # acknowledged: the replica works
            group.kill(replica.port, signal.SIGSTOP)
            try:
                tries = [await submit_outcome(client, "k"), await submit_outcome(client, "k")]
                tries.append(await cli_submit_outcome(settings, "k"))
                primary_offset, replica_acked = await replication_offsets(client)
            finally:
                group.kill(replica.port, signal.SIGCONT)
    assert replica_acked < primary_offset, "the paused replica has not acknowledged the task"
    assert tries == ["ReplicationTimeout: reached 0 of 1 replica(s)"] * 3, (
        "a re-submit returned as acknowledged though no replica has the task"
    )


async def cli_submit_outcome(settings: Settings, key: str, exit_within: float = 15.0) -> str:
    """``shoal submit`` with the same settings (ack_replicas from the environment),
    in a process of its own; its outcome as ``submit_outcome`` puts it, and whether
    it failed to exit within ``exit_within`` seconds of answering."""
    env = {**node_env(settings), "SHOAL_ACK_REPLICAS": str(settings.ack_replicas)}
    env["SHOAL_ACK_TIMEOUT"] = str(settings.ack_timeout)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "submit", "echo", 'value="v"',
        "--idempotency-key", key,
        cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    printed = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()
    try:
        await asyncio.wait_for(proc.wait(), exit_within)
    except TimeoutError:  # the answer came, the exit did not: say so, and end it
        proc.kill()
        await proc.wait()
        return f"acknowledged {printed}, then hung on exit" if printed else "hung"
    if proc.returncode == 0:
        return f"acknowledged {printed}"
    err = (await proc.stderr.read()).decode()
    gist = err.split(" in time")[0].split("task(s) ")[-1]
    return f"ReplicationTimeout: {gist}" if "replica" in gist else err.strip()


@pytest.mark.slow  # ~5 s when it passes; each hang costs its 8 s bound
async def test_shoal_submit_exits_once_it_has_answered(tmp_path: Path) -> None:
    """A client closes its inbox readers when it closes. A submit that returns at
    once (here: an idempotency key that names a stored task) leaves its reader still
    connecting to a Sentinel-managed primary, and the close must not wait for it
    forever: ``shoal submit`` prints the id and exits, every time."""
    with LocalSentinelGroup(replicas=1, sentinels=1, password=PASSWORD, base_dir=tmp_path) as group:
        settings = Settings(url=group.url, namespace="exit", ack_replicas=1)
        outcomes = [await cli_submit_outcome(settings, "same", exit_within=8) for _ in range(6)]
    assert [o.endswith("hung on exit") for o in outcomes] == [False] * 6, outcomes
    assert len({o.split()[1] for o in outcomes}) == 1, "one task for the key"


@pytest.mark.parametrize("kind", ["sentinel", "cluster"])
async def test_many_concurrent_submits_wait_for_a_connection_rather_than_fail(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    """open_connection promises a bounded pool whose callers wait for a free
    connection (as on a standalone engine). Through a Sentinel group or a Cluster,
    600 concurrent submits must all be queued without an engine error on the way
    (not even one ridden out by a retry)."""
    topology = (
        LocalSentinelGroup(replicas=1, sentinels=1, password=PASSWORD, base_dir=tmp_path)
        if kind == "sentinel"
        else LocalCluster(3, 0, password=PASSWORD, base_dir=tmp_path)
    )
    with topology:
        async with Client(settings=Settings(url=topology.url, namespace="pool")) as client:
            handles = await asyncio.gather(*(client.submit("echo", value=i) for i in range(600)))
    complaints = sorted({r.getMessage() for r in caplog.records if r.levelname == "WARNING"})
    assert len({h.id for h in handles}) == 600
    assert complaints == [], "the pool made callers wait, not fail"


async def submit_outcome(client: Client, key: str, full: bool = False) -> str:
    """How a submit with idempotency key ``key`` ended, as text to compare (the
    error's gist, or with ``full`` its whole message)."""
    try:
        handle = await client.submit("echo", value="v", idempotency_key=key)
    except ReplicationTimeout as exc:
        gist = str(exc) if full else str(exc).split(" in time")[0].split("task(s) ")[-1]
        return f"ReplicationTimeout: {gist}"
    return f"acknowledged {handle.id}"


async def replication_offsets(client: Client) -> tuple[int, int]:
    """The primary's replication offset and the offset its (one) replica acknowledged."""
    async with client.errors():
        info = await client.redis.info("replication")
    return int(info["master_repl_offset"]), int(info["slave0"]["offset"])


# --- 3. Cluster: a primary is killed and its replica promoted --------------------------------


def shard_of_group(state: Any, group: int) -> int:
    """The port of the primary serving key group ``group``, as ``cluster()`` shows it."""
    (entry,) = [g for g in state.key_groups if g.group == group]
    return int(entry.shard.rsplit(":", 1)[1])


@pytest.mark.slow
async def test_cluster_primary_failover_under_load_loses_and_doubles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of the primary serving the namespace's control keys (heartbeats, node
    records) and some of its key groups: its replica takes over, clients and nodes
    follow the new slot map and carry on; nothing acknowledged is lost or doubled,
    and tasks running on the live nodes through the outage are not taken from them
    (docs/scale-out.md: nodes that could not heartbeat are judged fairly)."""
    monkeypatch.setenv("SHOAL_ACK_REPLICAS", "1")
    with LocalCluster(3, replicas_per_primary=1, password=PASSWORD, base_dir=tmp_path) as cluster:
        settings = Settings(
            url=cluster.url, namespace="scale-out", ack_replicas=1, engine_timeout=5
        )
        async with Client(settings=settings) as client:
            with nodes(settings, "n1", "n2"):
                await ready(client, 2)
                victim = shard_of_group(await client.cluster(), 0)
                load, stop = Load(client), asyncio.Event()
                stream = asyncio.create_task(load.run(stop))
                try:
                    await eventually(lambda: _acked(load, 150), "the stream flows", 20)
                    long = await start_long_tasks(client, 4)
                    await asyncio.to_thread(cluster.kill, victim)
                    killed, killed_wall = time.monotonic(), time.time()
                    await asyncio.to_thread(cluster.wait_ok, 30)
                    failed_over = time.monotonic() - killed
                    # The promoted replica has no replica of its own: with ack_replicas=1
                    # its shard acknowledges nothing (ReplicationTimeout, which the stream
                    # tries again with the same key) until the old primary is back, as
                    # its replica. Wait to see that happen, then bring it back.
                    await eventually(lambda: _refused(load), "a ReplicationTimeout", 15)
                    await asyncio.to_thread(cluster.restart, victim)
                    redundant_again = time.monotonic() - killed
                    wanted = len(load.acks) + 150
                    await eventually(lambda: _acked(load, wanted), "acks after the failover", 30)
                    await eventually(
                        lambda: alive_since(client, {"n1", "n2"}, killed_wall + 1),
                        "both nodes heartbeat through the promoted replica",
                        30,
                    )
                    nodes_back_after = time.monotonic() - killed
                finally:
                    stop.set()
                    await stream
                state = await client.cluster()
                after = await client.submit_many("whoami", [{"i": i} for i in range(48)])
                fresh = await asyncio.wait_for(asyncio.gather(*(h.result() for h in after)), 20)
                outcome = await finish(load)
                long_taken = await taken_over(long)
    report(
        "cluster failover", load, outcome, killed,
        replica_promoted=failed_over, replica_again=redundant_again,
        nodes_heartbeating_again=nodes_back_after,
    )  # fmt: skip
    assert victim not in {shard_of_group(state, g.group) for g in state.key_groups}
    assert load.retried_keys, "submits refused while the shard had no replica were sent again"
    assert [r["i"] for r in fresh] == list(range(48)), "new work on every shard runs"
    assert_nothing_acknowledged_was_lost(load, outcome, {"whoami": len(after), "nap": len(long)})
    assert long_taken == {}, "tasks running on live nodes were not taken from them"


# --- 4. Cluster: a shard without replicas restarts empty ----------------------------------


async def outcome_of(handle: TaskHandle, timeout: float) -> str:
    """How waiting for a task's result ended, as text to compare; a wait that timed
    out says what the record shows (stuck in a status, or gone)."""
    try:
        await handle.result(timeout=timeout)
    except TaskNotFound:
        return "TaskNotFound"
    except ResultTimeout:
        try:
            info = await handle.status()
        except TaskNotFound:
            return "ResultTimeout, though the task is gone"
        return f"ResultTimeout, still {info.status}"
    return "succeeded"


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["data", "control"])
async def test_a_shard_restarted_without_its_data_loses_its_tasks_and_the_rest_goes_on(
    tmp_path: Path, shard: str
) -> None:
    """A Cluster without replicas and without persistence: one primary is killed and
    restarted on its port with nothing (its slots, none of its keys). The tasks whose
    key group it served are gone — waiting for them ends in TaskNotFound, whether the
    wait began before the loss or after — while the other shards' tasks complete; the
    running nodes and clients, never restarted, then run new work on every shard.
    ``shard``: a shard with tasks only, or the one with the control keys too (node
    records, registered capabilities and agent types)."""
    with LocalCluster(3, 0, password=PASSWORD, base_dir=tmp_path) as cluster:
        settings = Settings(url=cluster.url, namespace="restart", engine_timeout=10)
        async with Client(settings=settings) as client:
            with nodes(settings, "n1", "n2"):
                await ready(client, 2)
                state = await client.cluster()
                control = shard_of_group(state, 0)
                others = [s.port for s in cluster.primaries if s.port != control]
                victim = control if shard == "control" else others[0]
                lost = {
                    g.group for g in state.key_groups if shard_of_group(state, g.group) == victim
                }
                groups = client.keys.groups
                # two 3-second tasks per key group, running when the shard dies: the
                # first of each group is awaited through the loss, the second after it
                naps = [await client.submit("nap", seconds=3.0, i=i) for i in range(2 * groups)]
                await eventually(lambda: _all_running(client, naps), "every nap running", 10)
                through = [asyncio.ensure_future(outcome_of(h, 12)) for h in naps[:groups]]
                await asyncio.to_thread(cluster.kill, victim)
                killed = time.monotonic()
                await asyncio.to_thread(cluster.restart, victim)
                restarted = time.monotonic() - killed
                awaited_through = await asyncio.gather(*through)
                awaited_after = await asyncio.gather(*(outcome_of(h, 8) for h in naps[groups:]))
                fresh = [await client.submit("whoami", i=i) for i in range(groups)]  # 1 a group
                fresh_outcomes = await asyncio.gather(*(outcome_of(h, 12) for h in fresh))
                increments = await asyncio.gather(
                    *(
                        outcome_of_call(client, "increment", agent=f"counter/after-{i}")
                        for i in range(8)
                    )
                )
                alive = await alive_since(client, {"n1", "n2"}, time.time() - 2)

    def by_group(handles: list[TaskHandle], outcomes: list[str]) -> dict[int, str]:
        pairs = zip(handles, outcomes, strict=True)
        return dict(sorted((client.keys.task_group(h.id), outcome) for h, outcome in pairs))

    def lost_or_not(gone: str) -> dict[int, str]:
        return {g: gone if g in lost else "succeeded" for g in range(groups)}

    seen = {
        "running tasks awaited through the loss": by_group(naps[:groups], awaited_through),
        "running tasks awaited after the loss": by_group(naps[groups:], awaited_after),
        "new tasks, per key group": by_group(fresh, fresh_outcomes),
        "new increments of new agents": increments,
        "nodes alive": alive,
    }
    print(
        f"\nshard restart ({shard}): groups {sorted(lost)} lost, back in {restarted:.2f}s: {seen}"
    )
    assert lost and len(lost) < groups
    assert seen == {
        "running tasks awaited through the loss": lost_or_not("TaskNotFound"),
        "running tasks awaited after the loss": lost_or_not("TaskNotFound"),
        "new tasks, per key group": dict.fromkeys(range(groups), "succeeded"),
        "new increments of new agents": ["1"] * 8,
        "nodes alive": True,
    }


async def outcome_of_call(client: Client, capability: str, **kwargs: Any) -> str:
    """A call's result as text, or the type of the error it raised."""
    try:
        return str(await client.call(capability, result_timeout=12, **kwargs))
    except ShoalError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _all_running(client: Client, handles: list[TaskHandle]) -> bool:
    return all(info.status == "running" for info in [await h.status() for h in handles])
