"""The agent plane with real node processes, real signals and the real engine:
partition takeover after kill -9, a paused owner and a late commit fenced off,
state across engine restarts, request/response and publish between nodes, and
rebalancing when a node joins under traffic.

Ownership is read where it lives — the partition's lease key (``'<node> <token>'``)
— and every wait polls the engine for its condition with a bound and says what it
waited for when the bound passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from shoal import Client, Settings
from shoal.engine import EmbeddedEngine
from shoal.routing import assignment, owner_of, partition_of
from tests.conftest import eventually, node_process, wait_for_status

T = TypeVar("T")
POLL_S = 0.02  # how often a wait looks at the engine again
TAKEOVER_S = 3.0 + 1.0 + 2.0  # lease time (dead_after) + a keeper round + slack

# --- waiting for what another process does ----------------------------------------------


def parse_lease(raw: bytes | None) -> tuple[str, int] | None:
    if raw is None:
        return None
    node, token = raw.decode().rsplit(" ", 1)
    return node, int(token)


async def lease_of(client: Client, agent_id: str) -> tuple[str, int] | None:
    """(owner node, fencing token) of the agent's partition, or None while it is free."""
    agent_type = agent_id.partition("/")[0]
    partition = partition_of(agent_id, await client.partitions())
    return parse_lease(await client.redis.get(client.keys.lease(agent_type, partition)))


async def leases(client: Client, agent_type: str) -> dict[int, tuple[str, int] | None]:
    """Every partition's lease of ``agent_type``."""
    count = await client.partitions()
    pipe = client.redis.pipeline(transaction=False)
    for p in range(count):
        pipe.get(client.keys.lease(agent_type, p))
    return {p: parse_lease(raw) for p, raw in enumerate(await pipe.execute())}


async def settled(
    client: Client, agent_type: str, nodes: list[str], timeout: float = 20.0
) -> dict[int, tuple[str, int]]:
    """Wait until every partition of ``agent_type`` is leased by the node rendezvous
    hashing gives it among ``nodes`` (equal weights); return the leases."""
    expected = assignment(await client.partitions(), dict.fromkeys(nodes, 1.0))
    last: dict[int, tuple[str, int] | None] = {}

    async def check() -> dict[int, tuple[str, int]] | None:
        nonlocal last
        last = await leases(client, agent_type)
        done = {p: lease for p, lease in last.items() if lease and lease[0] == expected[p]}
        return done if len(done) == len(expected) else None

    try:
        return await eventually(check, f"{agent_type} partitions settled on {nodes}", timeout)
    except AssertionError:
        holders = {p: lease[0] if lease else None for p, lease in last.items()}
        wrong = {p: (last.get(p), o) for p, o in expected.items() if holders.get(p) != o}
        raise AssertionError(
            f"{len(wrong)} {agent_type} partition(s) not with their owner after {timeout}s; "
            f"(lease, expected) of some: {dict(list(wrong.items())[:8])}"
        ) from None


async def stale_turns(client: Client, agent_type: str) -> int:
    field = f"stale_turns:{agent_type}"
    raws = [await client.redis.hget(client.keys.stats(g), field) for g in range(client.keys.groups)]
    return sum(int(raw or 0) for raw in raws)


@contextlib.contextmanager
def nodes(
    settings: Settings, app: str, *names: str
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """``shoal node`` processes named ``names``; each gets SIGTERM (drain) on exit."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(node_process(settings, app, "--name", name)) for name in names
        }


# --- failover ---------------------------------------------------------------------------

LONG_TURN_S = 4.0  # long enough to be surely mid-turn at the kill; it runs twice


@pytest.mark.slow
@pytest.mark.topology
async def test_kill_9_of_the_owner_mid_turn_moves_the_agent_with_its_state_and_queue(
    client: Client, settings: Settings
) -> None:
    agent = "counter/a"
    with nodes(settings, "tests.stateful", "n1", "n2") as procs:
        await client.wait_for_hosts("slow_append", count=2)
        await settled(client, "counter", list(procs))
        assert await client.call("slow_append", agent=agent, item=0, result_timeout=10) == 1
        before = await lease_of(client, agent)
        assert before is not None
        owner, old_token = before
        (survivor,) = set(procs) - {owner}
        handles = await client.submit_many(
            "slow_append",
            [{"item": 1, "seconds": LONG_TURN_S}, {"item": 2}, {"item": 3}, {"item": 4}],
            agent=agent,
        )
        await wait_for_status(handles[0], "running")
        assert [(await h.status()).status for h in handles[1:]] == ["queued"] * 3

        procs[owner].send_signal(signal.SIGKILL)
        procs[owner].wait()
        killed = time.monotonic()
        assert await client.agent_state(agent) == {"seen": [0]}, "the turn in flight saved nothing"

        async def survivor_owns() -> tuple[str, int] | None:
            lease = await lease_of(client, agent)
            return lease if lease and lease[0] == survivor else None

        _, new_token = await eventually(survivor_owns, f"{survivor} owns {agent}", TAKEOVER_S)
        took_over = time.monotonic() - killed
        results = await asyncio.wait_for(
            asyncio.gather(*(h.result() for h in handles)), LONG_TURN_S + 10
        )
        where = await client.call("whereami", agent=agent, result_timeout=10)
        infos = [await h.status() for h in handles]
        tokens = [await client.redis.hget(client.keys.task(h.id), "token") for h in handles]

    assert took_over < TAKEOVER_S
    assert new_token > old_token, "a new owner gets a larger fencing token"
    assert results == [2, 3, 4, 5], "the in-flight message, then the queued ones, in order"
    assert await client.agent_state(agent) == {"seen": [0, 1, 2, 3, 4]}, "each saved once"
    assert [i.attempts for i in infos] == [2, 1, 1, 1], "only the interrupted turn ran again"
    assert {i.node for i in infos} == {survivor} and all(i.status == "succeeded" for i in infos)
    assert [int(t or 0) for t in tokens] == [new_token] * 4
    assert where["node"] == survivor and where["token"] == new_token


PAUSED_TURN_S = 1.5  # shorter than any lease can lapse in: over when the owner wakes


@pytest.mark.slow
async def test_a_paused_owner_writes_nothing_and_the_item_is_saved_once(
    client: Client, settings: Settings
) -> None:
    """SIGSTOP the owner mid-turn until another node holds the lease, then SIGCONT:
    the item is saved once (by the new owner, under a larger token), and the old
    owner, finding its lease may have expired, stops without sending its commit."""
    agent = "counter/p"
    with nodes(settings, "tests.stateful", "n1", "n2") as procs:
        await client.wait_for_hosts("slow_append", count=2)
        await settled(client, "counter", list(procs))
        before = await lease_of(client, agent)
        assert before is not None
        owner, old_token = before
        (other,) = set(procs) - {owner}
        handle = await client.submit("slow_append", agent=agent, item="x", seconds=PAUSED_TURN_S)
        await wait_for_status(handle, "running")
        procs[owner].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:

            async def other_owns() -> tuple[str, int] | None:
                lease = await lease_of(client, agent)
                return lease if lease and lease[0] == other else None

            _, new_token = await eventually(other_owns, f"{other} owns {agent}", TAKEOVER_S)
            paused_for = time.monotonic() - stopped
        finally:
            procs[owner].send_signal(signal.SIGCONT)
        result = await handle.result(timeout=PAUSED_TURN_S + 10)
        info = await handle.status()
        # The woken owner registers again and takes its share back: it has been awake
        # for seconds by then, long past the moment its overdue turn would commit.
        await client.wait_for_hosts("slow_append", count=2, timeout=20)
        await settled(client, "counter", list(procs))
        state = await client.agent_state(agent)
        refused = await stale_turns(client, "counter")

    assert paused_for > PAUSED_TURN_S, "the paused turn was over before the owner woke"
    assert new_token > old_token
    assert result == 1 and info.attempts == 2 and info.node == other
    assert info.duplicates == 0, "nothing of the old owner's turn was recorded"
    assert state == {"seen": ["x"]}, "the item is saved exactly once"
    # It checks its lease before it commits and knows the lease may have moved: it
    # sends nothing (a commit already on its way is refused by the engine: see the
    # test below).
    assert refused == 0, "the woken owner stops by itself, before writing anything"


class HoldingLink:
    """A TCP proxy between one node process and the engine: ``hold()`` keeps what the
    node sends (a network delaying its packets), ``release()`` delivers it in order,
    ``held()`` shows the commands held (RESP arrays)."""

    def __init__(self, url: str) -> None:
        self._parts = urllib.parse.urlsplit(url)
        self.holding = False
        self._links: list[tuple[asyncio.StreamWriter, bytearray, list[bool]]] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        """Start; the URL the node connects to instead of the engine's."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        userinfo = self._parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urllib.parse.urlunsplit(self._parts._replace(netloc=netloc))

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for to_engine, held, node_closed in self._links:
            if held:
                to_engine.write(bytes(held))
                held.clear()
            if node_closed[0]:
                to_engine.close()

    def held(self) -> list[list[bytes]]:
        return [cmd for _, held, _ in self._links for cmd in resp_commands(bytes(held))]

    async def _serve(self, from_node: asyncio.StreamReader, to_node: asyncio.StreamWriter) -> None:
        assert self._parts.hostname and self._parts.port
        from_engine, to_engine = await asyncio.open_connection(
            self._parts.hostname, self._parts.port
        )
        self._writers += [to_node, to_engine]
        held, node_closed = bytearray(), [False]
        self._links.append((to_engine, held, node_closed))

        async def upstream() -> None:
            while data := await from_node.read(65536):
                if self.holding:
                    held.extend(data)
                else:
                    to_engine.write(data)
            node_closed[0] = True
            if not self.holding:
                to_engine.close()

        async def downstream() -> None:
            while data := await from_engine.read(65536):
                to_node.write(data)
            to_node.close()

        for pump in (upstream(), downstream()):
            task = asyncio.ensure_future(pump)
            self._tasks.add(task)
            task.add_done_callback(_discard_from(self._tasks))


def _discard_from(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a reset connection ends its pumps; nothing to report

    return done


def resp_commands(data: bytes) -> list[list[bytes]]:
    """The complete commands (arrays of bulk strings, as clients send them) in ``data``."""
    commands: list[list[bytes]] = []
    i = 0
    while data[i : i + 1] == b"*":
        end = data.find(b"\r\n", i)
        if end < 0:
            break
        count, i = int(data[i + 1 : end]), end + 2
        args: list[bytes] = []
        for _ in range(count):
            end = data.find(b"\r\n", i)
            if end < 0 or data[i : i + 1] != b"$":
                return commands
            start = end + 2
            stop = start + int(data[i + 1 : end])
            if stop + 2 > len(data):
                return commands
            args.append(data[start:stop])
            i = stop + 2
        commands.append(args)
    return commands


LATE_TURN_S = 0.5  # ends well before the owner's lease can lapse without renewals


@pytest.mark.slow
async def test_a_commit_that_reaches_the_engine_after_a_takeover_is_refused(
    client: Client, settings: Settings
) -> None:
    """The owner's network holds its packets (a proxy) while its turn ends and sends
    the commit; the owner is paused (SIGSTOP) until the other node holds the lease;
    then the network delivers the commit, late: the engine refuses it, and the item
    is saved once, by the new owner."""
    count = await client.partitions()
    ring = {"late": 1.0, "prompt": 1.0}
    agent = next(
        a for a in (f"counter/k{i}" for i in range(1000))
        if owner_of(partition_of(a, count), ring) == "late"
    )  # fmt: skip
    link = HoldingLink(settings.url or "")
    async with link as proxied:
        late_settings = dataclasses.replace(settings, url=proxied)
        with (
            node_process(late_settings, "tests.stateful", "--name", "late") as late,
            node_process(settings, "tests.stateful", "--name", "prompt"),
        ):
            await client.wait_for_hosts("slow_append", count=2)
            await settled(client, "counter", list(ring))
            before = await lease_of(client, agent)
            assert before is not None and before[0] == "late"
            handle = await client.submit("slow_append", agent=agent, item="x", seconds=LATE_TURN_S)
            await wait_for_status(handle, "running")
            link.hold()
            sha = client.scripts.turn_end.sha.encode()

            async def commit_held() -> bool:
                return any(sha in cmd and agent.encode() in cmd for cmd in link.held())

            async def prompt_owns() -> tuple[str, int] | None:
                lease = await lease_of(client, agent)
                return lease if lease and lease[0] == "prompt" else None

            try:
                await eventually(commit_held, f"the owner's commit of {agent} on the wire", 5)
                late.send_signal(signal.SIGSTOP)
                _, new_token = await eventually(prompt_owns, f"prompt owns {agent}", TAKEOVER_S)
                assert await stale_turns(client, "counter") == 0, "the commit is still held"
                link.release()
                refused = await eventually(
                    lambda: stale_turns(client, "counter"), "the late commit refused", 10
                )
                late.send_signal(signal.SIGCONT)
                result = await handle.result(timeout=LATE_TURN_S + 10)
                info = await handle.status()
                await client.wait_for_hosts("slow_append", count=2, timeout=20)
                await settled(client, "counter", list(ring))
                state = await client.agent_state(agent)
            finally:
                # Stopped here, not by node_process (whose wait would block this loop,
                # and with it the link the node drains through).
                link.release()
                late.send_signal(signal.SIGCONT)
                late.send_signal(signal.SIGTERM)
                exit_code = await asyncio.to_thread(late.wait, 30)

    assert exit_code == 0
    assert new_token > before[1]
    assert refused == 1, "the late commit was refused"
    assert result == 1 and info.attempts == 2 and info.node == "prompt"
    assert info.duplicates == 0, "the refused commit touched nothing"
    assert state == {"seen": ["x"]}, "the item is saved exactly once"


# --- the engine restarts ----------------------------------------------------------------


async def restart(engine: EmbeddedEngine, down_for: float = 0.0) -> None:
    """Stop the engine (AOF flushed), keep it down ``down_for`` seconds (the outage
    is the scenario), start it again on the same data dir."""
    await asyncio.to_thread(engine.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(engine.ensure)


@pytest.mark.slow
async def test_agent_state_survives_engine_restarts(own_engine: EmbeddedEngine) -> None:
    record = own_engine.ensure()
    settings = Settings(url=record.url, namespace="agents-restart")
    counters = {f"counter/r{k}": k for k in range(1, 21)}

    async def increment_all() -> list[int]:
        calls = [
            client.call("increment", agent=a, by=k, result_timeout=20) for a, k in counters.items()
        ]
        return list(await asyncio.gather(*calls))

    async with Client(settings=settings) as client:
        with node_process(settings, "tests.stateful", "--name", "before"):
            await client.wait_for_hosts("increment")
            for _ in range(3):
                await increment_all()
            for item in "abc":
                await client.call("slow_append", agent="counter/list", item=item, result_timeout=10)
            ids = [*counters, "counter/list"]
            saved = [await client.agent_state(a) for a in ids]
            await restart(own_engine, down_for=1.0)
            assert [await client.agent_state(a) for a in ids] == saved, "states kept"
            assert await increment_all() == [4 * k for k in counters.values()], (
                "the running node carries on from the saved state"
            )
        await restart(own_engine)  # no node at all this time
        with node_process(settings, "tests.stateful", "--name", "after"):
            await client.wait_for_hosts("increment")
            assert await increment_all() == [5 * k for k in counters.values()], (
                "a new node loads the states from the restarted engine"
            )
            assert await client.call("slow_append", agent="counter/list", item="d") == 4
            assert await client.agent_state("counter/list") == {"seen": ["a", "b", "c", "d"]}
    assert saved[0] == {"n": 3} and saved[-1] == {"seen": ["a", "b", "c"]}


# --- messages between nodes -------------------------------------------------------------


@pytest.mark.topology
async def test_an_agent_asks_an_agent_hosted_only_on_another_node(
    client: Client, settings: Settings
) -> None:
    with (
        node_process(settings, "tests.stateful_counter", "--name", "counters"),
        node_process(settings, "tests.stateful_relay", "--name", "relays"),
    ):
        await client.wait_for_hosts("increment")
        await client.wait_for_hosts("ask")
        hosts = (await client.hosts("increment"), await client.hosts("ask"))
        asks = [
            await client.call(
                "ask", agent="relay/r", target="counter/c", message={"q": q}, result_timeout=20
            )
            for q in (1, 2)
        ]
        owners = (await lease_of(client, "relay/r"), await lease_of(client, "counter/c"))
    assert hosts == (["counters"], ["relays"])
    assert asks == [
        {"reply": {"count": q, "sender": "relay/r", "node": "counters"}, "node": "relays"}
        for q in (1, 2)
    ]
    assert [o and o[0] for o in owners] == ["relays", "counters"]
    assert await client.agent_state("counter/c") == {"seen": [{"q": 1}, {"q": 2}]}
    assert await client.agent_state("relay/r") == {"last_reply": asks[1]["reply"]}


@pytest.mark.slow
async def test_a_publication_reaches_the_subscribers_agent_even_while_its_node_is_down(
    client: Client, settings: Settings
) -> None:
    def finding(name: str) -> dict[str, Any]:
        return {"findings": [{"finding": name}]}

    with node_process(settings, "tests.stateful_relay", "--name", "relays"):
        with node_process(settings, "tests.stateful_counter", "--name", "counters"):
            await client.wait_for_hosts("increment")
            assert await client.publish("findings", {"finding": "f1"}, source="k1") == 1
            await eventually(
                lambda: client.agent_state("counter/k1"), "counter/k1 got its finding", 10
            )
        assert await client.hosts("increment") == [], "no node hosts counter now"
        await client.wait_for_hosts("ask")
        assert await client.publish("findings", {"finding": "f2"}, source="k2") == 1
        assert await client.call("announce", agent="relay/k3", finding="f3", result_timeout=10) == 1
        count = await client.partitions()
        mailboxes = [
            client.keys.mailbox("counter", partition_of(f"counter/{k}", count))
            for k in ("k2", "k3")
        ]
        waiting = [await client.redis.xlen(m) for m in mailboxes]
        states_while_down = [await client.agent_state(f"counter/{k}") for k in ("k2", "k3")]
        with node_process(settings, "tests.stateful_counter", "--name", "counters"):

            async def delivered() -> list[Any] | None:
                states = [await client.agent_state(f"counter/{k}") for k in ("k2", "k3")]
                return states if all(states) else None

            await eventually(delivered, "counter/k2 and counter/k3 got their findings", 15)
            with_state = await client.agents("counter", with_state=True)

    assert waiting == [1, 1] or (mailboxes[0] == mailboxes[1] and waiting == [2, 2])
    assert states_while_down == [None, None]
    assert [await client.agent_state(f"counter/k{i}") for i in (1, 2, 3)] == [
        finding("f1"), finding("f2"), finding("f3"),
    ]  # fmt: skip
    assert [a.id for a in with_state] == ["counter/k1", "counter/k2", "counter/k3"]


# --- rebalancing --------------------------------------------------------------------------

TRAFFIC_AGENTS = 120
TRAFFIC_ROUND_S = 0.05  # pacing between rounds of one message to every agent


async def send_traffic(
    client: Client, agents: list[str], probe: str, sent: dict[str, int], stop: asyncio.Event
) -> None:
    """Rounds of one message per agent (so each agent's messages go in sequence)
    until ``stop``; ``sent`` counts what each agent was sent."""
    while not stop.is_set():
        await asyncio.gather(
            *(client.send(a, {"probe": probe, "seq": sent[a], "hold": 0.005}) for a in agents)
        )
        for a in agents:
            sent[a] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TRAFFIC_ROUND_S)


@pytest.mark.slow
async def test_a_joining_node_takes_a_third_of_the_partitions_without_double_processing(
    client: Client, settings: Settings
) -> None:
    probe = f"{client.keys.prefix}probe"
    agents = [f"guarded/g{i}" for i in range(TRAFFIC_AGENTS)]
    sent = dict.fromkeys(agents, 0)
    stop = asyncio.Event()
    count = await client.partitions()
    with nodes(settings, "tests.stateful_guarded", "n1", "n2"):
        await client.wait_for_hosts("increment", count=2)
        before = {t: await settled(client, t, ["n1", "n2"]) for t in ("counter", "guarded")}
        since = (await client.redis.xinfo_stream(client.keys.ownership()))["last-generated-id"]
        traffic = asyncio.create_task(send_traffic(client, agents, probe, sent, stop))

        async def turns_on(*names: str) -> dict[bytes, bytes] | None:
            per_node: dict[bytes, bytes] = await client.redis.hgetall(f"{probe}:nodes")
            return per_node if all(int(per_node.get(n.encode(), 0)) >= 50 for n in names) else None

        try:
            await eventually(lambda: turns_on("n1", "n2"), "both nodes run turns", 10)
            with node_process(settings, "tests.stateful_guarded", "--name", "n3"):
                await client.wait_for_hosts("increment", count=3)
                joined = sum(sent.values())
                after = {t: await settled(client, t, ["n1", "n2", "n3"]) for t in before}
                during_join = sum(sent.values()) - joined
                await eventually(lambda: turns_on("n3"), "the newcomer runs turns", 10)
                stop.set()
                await traffic

                async def all_processed() -> bool:
                    states = await asyncio.gather(*(client.agent_state(a) for a in agents))
                    done = [len((s or {}).get("seqs", ())) for s in states]
                    return done == [sent[a] for a in agents]

                await eventually(all_processed, "every message processed", 30, interval=0.1)
                states = await asyncio.gather(*(client.agent_state(a) for a in agents))
                changes = await client.redis.xrange(client.keys.ownership(), f"({since.decode()}")
        finally:
            stop.set()
            await traffic
    overlaps = await client.redis.lrange(f"{probe}:overlaps", 0, -1)
    runs = await client.redis.hgetall(f"{probe}:runs")
    per_node = await client.redis.hgetall(f"{probe}:nodes")
    print(
        f"rebalancing: {sum(sent.values())} messages, {during_join} of them while partitions "
        f"moved; turns per node {per_node}"
    )

    total = sum(sent.values())
    assert during_join >= TRAFFIC_AGENTS, "messages kept coming while partitions moved"
    for agent_type in ("counter", "guarded"):
        owners = {p: lease[0] for p, lease in after[agent_type].items()}
        moved = {p for p, lease in before[agent_type].items() if owners[p] != lease[0]}
        assert {owners[p] for p in moved} == {"n3"}, "whatever moved, moved to the newcomer"
        share = sum(1 for o in owners.values() if o == "n3") / count
        assert 0.20 <= share <= 0.45, f"the newcomer owns {share:.0%} of {agent_type}"
        events = [(f[b"event"].decode(), int(f[b"p"]), f[b"node"].decode())
                  for _, f in changes if f[b"type"].decode() == agent_type]  # fmt: skip
        assert sorted(events) == sorted(
            [("released", p, before[agent_type][p][0]) for p in moved]
            + [("acquired", p, "n3") for p in moved]
        ), "each moved partition: released once by its old owner, acquired once by n3"
    assert set(per_node) == {b"n1", b"n2", b"n3"}, "the traffic went through the handover"
    assert overlaps == [], "no agent ran two turns at once"
    assert len(runs) == total and set(runs.values()) == {b"1"}, "every message ran exactly once"
    assert [(s or {}).get("seqs") for s in states] == [list(range(sent[a])) for a in agents], (
        "every agent saved each of its messages once, in order"
    )
    assert await stale_turns(client, "guarded") == 0
