"""The agent plane against the real engine, with in-process nodes: addressed tasks,
state, turn order, messages, subscriptions, the directory and clear errors."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from shoal import (
    Agent,
    Client,
    ConfigurationError,
    RequestFailed,
    RequestTimeout,
    Retry,
    Settings,
    ShoalError,
    TaskCancelled,
    TaskFailed,
    UnknownAgentType,
    capability,
    handler,
    subscribe,
)
from shoal.routing import partition_of
from tests.conftest import running_node, wait_for_status
from tests.stateful import Counter, Relay


class Guarded(Agent):
    """Records overlapping turns: per agent (must never happen) and across agents."""

    busy: ClassVar[set[str]] = set()
    overlaps: ClassVar[list[str]] = []
    concurrent: ClassVar[int] = 0
    max_concurrent: ClassVar[int] = 0
    activated: ClassVar[list[str]] = []
    holding: ClassVar[bool] = False
    deactivated: ClassVar[list[str]] = []

    @capability("append")
    async def append(self, item: Any, pause: float = 0.0) -> int:
        agent_id = self.id or ""
        if agent_id in Guarded.busy:
            Guarded.overlaps.append(agent_id)
        Guarded.busy.add(agent_id)
        Guarded.concurrent += 1
        Guarded.max_concurrent = max(Guarded.max_concurrent, Guarded.concurrent)
        try:
            await asyncio.sleep(pause)  # simulated I/O inside the turn
            self.state.setdefault("items", []).append(item)
            return len(self.state["items"])
        finally:
            Guarded.concurrent -= 1
            Guarded.busy.discard(agent_id)

    @capability("flaky_bump")
    async def flaky_bump(self) -> int:
        """Changes state, then fails on the first attempt: the change must be undone."""
        self.state["bumps"] = self.state.get("bumps", 0) + 1
        if self.ctx.attempt == 1:
            raise Retry(delay=0.01)
        return int(self.state["bumps"])

    @capability("hold")
    async def hold(self, item: Any) -> int:
        """Waits while Guarded.holding is set (a long turn a test can end), then appends."""
        self.state["started"] = self.state.get("started", 0) + 1
        while Guarded.holding:  # noqa: ASYNC110 - a long turn, until the test lets it go
            await asyncio.sleep(0.01)
        self.state.setdefault("items", []).append(item)
        return len(self.state["items"])

    @capability("store_unsendable")
    async def store_unsendable(self) -> None:
        self.state["bad"] = object()

    @capability("always_fails", max_attempts=2, backoff=0.01)
    async def always_fails(self) -> None:
        raise RuntimeError("boom")

    @handler
    async def on_message(self, message: Any) -> Any:
        return {"echo": message, "state": dict(self.state)}

    async def on_activate(self) -> None:
        Guarded.activated.append(self.id or "")

    async def on_deactivate(self) -> None:
        Guarded.deactivated.append(self.id or "")
        self.state["deactivations"] = self.state.get("deactivations", 0) + 1


@pytest.fixture(autouse=True)
def _reset_guarded() -> None:
    Guarded.busy.clear()
    Guarded.overlaps.clear()
    Guarded.concurrent = Guarded.max_concurrent = 0
    Guarded.activated.clear()
    Guarded.deactivated.clear()
    Guarded.holding = False


@pytest.mark.topology
async def test_addressed_tasks_keep_state_per_agent(client: Client, settings: Settings) -> None:
    async with running_node([Counter, Relay], settings):
        assert [await client.call("increment", agent="counter/a", by=2) for _ in range(3)] == [
            2,
            4,
            6,
        ]
        assert await client.call("increment", agent="counter/b") == 1
        assert await client.agent_state("counter/a") == {"n": 6}
        assert await client.agent_state("counter/b") == {"n": 1}
        assert await client.agent_state("counter/never") is None
        # capability tasks (no agent) still run on the shared, stateless instance
        failing = await client.submit("increment")
        with pytest.raises(ShoalError, match="state exists only on an agent addressed by id"):
            await failing.result(timeout=10)


@pytest.mark.topology
async def test_one_turn_at_a_time_per_agent_in_arrival_order(
    client: Client, settings: Settings
) -> None:
    """Three concurrent senders to one agent: each sender's messages arrive in its
    order and no two turns of the agent overlap, while other agents run concurrently."""

    async def sender(name: str) -> None:
        for i in range(15):
            await client.submit("append", agent="guarded/one", item=[name, i], pause=0.002)

    async with running_node([Guarded], settings, concurrency=16):
        await asyncio.gather(*(sender(n) for n in "xyz"))
        others = [
            await client.submit("append", agent=f"guarded/other-{i}", item=i, pause=0.05)
            for i in range(8)
        ]
        last = await client.submit("append", agent="guarded/one", item="end")
        assert await last.result(timeout=20) == 46
        for handle in others:
            assert await handle.result(timeout=20) == 1
    items = (await client.agent_state("guarded/one") or {})["items"]
    assert items[-1] == "end"
    for name in "xyz":
        assert [i for n, i in items[:-1] if n == name] == list(range(15))
    assert Guarded.overlaps == []
    assert Guarded.max_concurrent > 1, "different agents run concurrently"


async def test_failed_turn_undoes_its_state_changes(client: Client, settings: Settings) -> None:
    async with running_node([Guarded], settings):
        assert await client.call("flaky_bump", agent="guarded/f") == 1
        assert (await client.agent_state("guarded/f")) == {"bumps": 1}
        handle = await client.submit("always_fails", agent="guarded/f")
        with pytest.raises(ShoalError, match="boom"):
            await handle.result(timeout=10)
        assert (await handle.status()).status == "dead"
        letters = await client.dead_letters("always_fails")
        assert [d.task.id for d in letters] == [handle.id]


async def test_addressed_task_redriven_goes_back_to_its_agent(
    client: Client, settings: Settings
) -> None:
    async with running_node([Guarded], settings):
        handle = await client.submit("always_fails", agent="guarded/r")
        with pytest.raises(ShoalError):
            await handle.result(timeout=10)
        assert await client.redrive("always_fails") == [handle.id]
        with pytest.raises(ShoalError):
            await handle.result(timeout=10)
        assert (await handle.status()).attempts == 2


async def test_queued_addressed_task_can_be_cancelled_and_idempotent(
    client: Client, settings: Settings
) -> None:
    async with running_node([Counter], settings):  # registers the type
        assert await client.call("increment", agent="counter/c") == 1
    handle = await client.submit("increment", agent="counter/c", idempotency_key="once")
    again = await client.submit("increment", agent="counter/c", idempotency_key="once")
    assert again.id == handle.id and not again.is_new
    assert await client.cancel(handle.id) == "cancelled"
    async with running_node([Counter], settings):
        assert await client.call("increment", agent="counter/c") == 2, "the cancelled one never ran"
    with pytest.raises(TaskCancelled):
        await handle.result(timeout=1)


@pytest.mark.topology
async def test_messages_requests_and_failures(client: Client, settings: Settings) -> None:
    async with running_node([Counter, Relay], settings):
        await client.send("counter/m", "first")
        reply = await client.request("counter/m", "second", timeout=10)
        assert reply["count"] == 2 and reply["sender"] is None
        with pytest.raises(RequestFailed, match="asked to fail"):
            await client.request("counter/m", {"fail": True}, timeout=10)
        # the failed turn changed nothing
        assert (await client.agent_state("counter/m")) == {"seen": ["first", "second"]}
        asked = await client.call("ask", agent="relay/r", target="counter/m", message="third")
        assert asked["reply"]["sender"] == "relay/r"
        assert (await client.agent_state("relay/r")) == {"last_reply": asked["reply"]}


async def test_request_times_out_without_a_node(client: Client, settings: Settings) -> None:
    async with running_node([Counter], settings):
        assert await client.call("increment", agent="counter/t") == 1
    with pytest.raises(RequestTimeout, match=r"did not reply within 0\.2s"):
        await client.request("counter/t", "anyone?", timeout=0.2)
    async with running_node([Counter], settings):  # the message stayed delivered
        assert (await client.request("counter/t", "now", timeout=10))["count"] == 2


@pytest.mark.topology
async def test_publish_reaches_the_subscribed_type_by_source_key(
    client: Client, settings: Settings
) -> None:
    async with running_node([Counter, Relay], settings):
        assert await client.call("announce", agent="relay/k1", finding="tides") == 1
        assert await client.publish("findings", "from a client", source="k2") == 1
        assert await client.publish("nobody-listens", "x", source="k1") == 0
        await client.call("increment", agent="counter/k1")  # behind the published one
        await client.call("increment", agent="counter/k2")
    assert (await client.agent_state("counter/k1") or {})["findings"] == [{"finding": "tides"}]
    assert (await client.agent_state("counter/k2") or {})["findings"] == ["from a client"]


@pytest.mark.topology
async def test_broadcast_reaches_active_agents_only(client: Client, settings: Settings) -> None:
    async with running_node([Counter], settings):
        await client.call("increment", agent="counter/b1")
        await client.call("increment", agent="counter/b2")
        await client.broadcast("counter", "to all")
        # a request queued after the broadcast is handled after it, per agent
        assert (await client.request("counter/b1", "after", timeout=10))["count"] == 2
        assert (await client.request("counter/b2", "after", timeout=10))["count"] == 2
        assert (await client.request("counter/b3", "after", timeout=10))["count"] == 1


@pytest.mark.topology
async def test_delete_agent_removes_its_state_in_order(client: Client, settings: Settings) -> None:
    async with running_node([Counter], settings):
        assert await client.call("increment", agent="counter/d", by=5) == 5
        assert await client.delete_agent("counter/d") is True
        assert await client.agent_state("counter/d") is None
        assert await client.call("increment", agent="counter/d") == 1, "the active one forgot it"
        assert await client.delete_agent("counter/none") is False
    # without a node, the deletion waits in line behind a message sent before it
    await client.send("counter/d", "sent before the deletion")
    with pytest.raises(RequestTimeout, match=r"not deleted within 0\.2s"):
        await client.delete_agent("counter/d", timeout=0.2)
    assert await client.agent_state("counter/d") == {"n": 1}, "nothing deleted yet"
    async with running_node([Counter], settings):
        reply = await client.request("counter/d", "after", timeout=10)
    assert reply["count"] == 1, "the message before the deletion saw the state, then it went"
    assert await client.agent_state("counter/d") == {"seen": ["after"]}


async def test_idle_agents_are_deactivated_lru_with_hooks(
    client: Client, settings: Settings
) -> None:
    async with running_node([Guarded], settings, max_active_agents=2) as node:
        for i in range(5):
            await client.call("append", agent=f"guarded/lru-{i}", item=i)
        assert node.agents is not None
        assert len(node.agents.activations) <= 3
        assert Guarded.deactivated[:2] == ["guarded/lru-0", "guarded/lru-1"]
        # on_deactivate's state change was saved; re-activation loads it
        assert (await client.agent_state("guarded/lru-0")) == {"items": [0], "deactivations": 1}
        reply = await client.request("guarded/lru-0", "back", timeout=10)
        assert reply["state"] == {"items": [0], "deactivations": 1}
        assert Guarded.activated.count("guarded/lru-0") == 2


@pytest.mark.topology
async def test_directory_lists_active_agents_and_agents_with_state(
    client: Client, settings: Settings
) -> None:
    async with running_node([Counter, Relay], settings, name="dir-node"):
        await client.call("increment", agent="counter/d1")
        await client.call("increment", agent="counter/d2")
        await client.send("counter/d3", "hello")
        await client.request("counter/d3", "again", timeout=10)
        await client.call("announce", agent="relay/d4", finding="x")  # no state change
        async with asyncio.timeout(10):
            # nodes publish their active agents about once a second: look again until then
            while len(await client.agents(active=True)) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        active = await client.agents(active=True)
        assert {a.id for a in active} >= {"counter/d1", "counter/d2", "counter/d3", "relay/d4"}
        assert all(a.node == "dir-node" and a.activated_at for a in active)
        one = await client.agent("counter/d1")
        assert one.node == "dir-node" and one.state_size > 0
        assert one.partition == partition_of("counter/d1", await client.partitions())
        by_capability = await client.agents(capability="ask")
        assert {a.id for a in by_capability} == {"relay/d4"}
        assert {a.id for a in await client.agents(with_state=False)} == {"relay/d4"}
        assert await client.agents(active=False) == [], "every agent with state is active"
    stored = await client.agents("counter", with_state=True)
    assert {a.id for a in stored} >= {"counter/d1", "counter/d2", "counter/d3"}
    assert all(a.state_size > 0 and a.node is None for a in stored)
    assert [a.id for a in await client.agents("relay", with_state=True)] == []


async def test_bad_addresses_give_clear_errors(client: Client, settings: Settings) -> None:
    async with running_node([Counter, Relay], settings):
        await client.call("increment", agent="counter/x")
        with pytest.raises(ConfigurationError, match="is not 'type/key'"):
            await client.submit("increment", agent="counter")
        with pytest.raises(ConfigurationError, match="must be snake_case"):
            await client.send("Counter/x", "hi")
        with pytest.raises(ConfigurationError, match="key '' must be"):
            await client.send("counter/", "hi")
        with pytest.raises(UnknownAgentType, match=r"'nosuch'.*known types: counter, relay"):
            await client.call("increment", agent="nosuch/x")
        with pytest.raises(UnknownAgentType, match=r"'nosuch'"):
            await client.agent_state("nosuch/x")
        with pytest.raises(UnknownAgentType, match=r"has no capability 'ask'.*increment"):
            await client.submit("ask", agent="counter/x")
        with pytest.raises(UnknownAgentType, match="handles no messages"):
            await client.send("relay/x", "hi")
        selfish = await client.submit("ask", agent="relay/self", target="relay/self", message="x")
        with pytest.raises(TaskFailed, match=r"ConfigurationError: .* cannot request itself"):
            await selfish.result(timeout=10)
        assert (await selfish.status()).status == "failed", "a configuration error is final"
        assert (await selfish.status()).attempts == 1


async def test_partition_count_is_fixed_per_namespace(client: Client, settings: Settings) -> None:
    assert await client.partitions() == 256
    async with Client(settings=settings.with_(partitions=256)) as same:
        assert await same.partitions() == 256
    async with Client(settings=settings.with_(partitions=8)) as other:
        with pytest.raises(ConfigurationError, match="has 256 agent partitions"):
            await other.partitions()
    with pytest.raises(ConfigurationError, match="partitions must be within"):
        settings.with_(partitions=0)


def test_agent_classes_are_checked_where_they_are_declared() -> None:
    with pytest.raises(ConfigurationError, match="marks 2 methods @handler"):

        class TwoHandlers(Agent):
            @handler
            async def a(self, message: Any) -> None: ...

            @handler
            async def b(self, message: Any) -> None: ...

    with pytest.raises(ConfigurationError, match="topic 'bad topic' is invalid"):
        subscribe("bad topic")


@pytest.mark.topology
async def test_running_addressed_task_can_be_cancelled(client: Client, settings: Settings) -> None:
    async with running_node([Counter], settings):
        handle = await client.submit("slow_append", agent="counter/z", item="never", seconds=60)
        await wait_for_status(handle, "running")
        assert await client.cancel(handle.id) == "cancelling"
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=10)
        assert await client.call("slow_append", agent="counter/z", item="next") == 1
    assert await client.agent_state("counter/z") == {"seen": ["next"]}


async def test_addressed_task_events_are_recorded(client: Client, settings: Settings) -> None:
    class Reporter(Agent):
        @capability("report_steps")
        async def report_steps(self) -> str:
            await self.ctx.progress(0.5, "half")
            self.state["done"] = True
            return "ok"

    async with running_node([Reporter], settings):
        handle = await client.submit("report_steps", agent="reporter/e")
        assert await handle.result(timeout=10) == "ok"
    kinds = [e.kind for e in await client.event_history(handle.id)]
    assert kinds[0] == "progress"


async def test_state_that_cannot_be_saved_fails_the_task(
    client: Client, settings: Settings
) -> None:
    async with running_node([Guarded], settings):
        await client.call("append", agent="guarded/u", item=1)
        handle = await client.submit("store_unsendable", agent="guarded/u")
        with pytest.raises(
            TaskFailed, match="SerializationError: the agent's state cannot be saved"
        ):
            await handle.result(timeout=10)
        assert (await handle.status()).attempts == 1, "final: retrying cannot help"
        assert await client.call("append", agent="guarded/u", item=2) == 2
    assert await client.agent_state("guarded/u") == {"items": [1, 2], "deactivations": 1}


async def test_draining_node_hands_a_running_task_back_in_place(
    client: Client, settings: Settings
) -> None:
    """Past the grace period the running turn is stopped, its changes undone, and
    the task queued again where it was: it runs first on the next node, and the
    stopped attempt does not count."""
    Guarded.holding = True
    async with running_node([Guarded], settings, grace_period=0.2):
        first = await client.submit("hold", agent="guarded/h", item="first")
        second = await client.submit("append", agent="guarded/h", item="second")
        await wait_for_status(first, "running")
    info = await first.status()
    assert (info.status, info.attempts) == ("queued", 0)
    assert (await second.status()).status == "queued"
    assert await client.agent_state("guarded/h") is None, "the stopped turn saved nothing"
    Guarded.holding = False
    async with running_node([Guarded], settings):
        assert await first.result(timeout=10) == 1
        assert await second.result(timeout=10) == 2
    assert (await first.status()).attempts == 1
    assert await client.agent_state("guarded/h") == {
        "started": 1, "items": ["first", "second"], "deactivations": 1,
    }  # fmt: skip


async def test_a_dropped_subscription_stops_receiving(client: Client, settings: Settings) -> None:
    async with running_node([Counter], settings):
        assert await client.publish("findings", "x", source="s") == 1

    class Quiet(Agent):  # the counter type, redeployed without its subscription
        agent_type = "counter"

        @capability("increment")
        async def increment(self) -> int:
            return 0

    async with running_node([Quiet], settings), Client(settings=settings) as fresh:
        # (a fresh client: a client trusts the subscribers it read for a second)
        assert await fresh.publish("findings", "y", source="s") == 0


async def test_a_node_can_host_agents_that_only_handle_messages(
    client: Client, settings: Settings
) -> None:
    class Listener(Agent):
        async def on_message(self, message: Any) -> Any:
            self.state["heard"] = message
            return f"heard {message}"

    async with running_node([Listener], settings) as node:
        assert node.capabilities == []
        assert await client.request("listener/l", "hello", timeout=10) == "heard hello"
    assert await client.agent_state("listener/l") == {"heard": "hello"}


async def test_many_concurrent_sends_all_arrive_in_order_per_sender(
    client: Client, settings: Settings
) -> None:
    """Sends made at once share pipelines; each sender's messages keep their order."""

    async def sender(name: str) -> None:
        for i in range(30):
            await client.send("counter/many", [name, i])

    async with running_node([Counter], settings):
        await asyncio.gather(*(sender(f"s{n}") for n in range(10)))
        reply = await client.request("counter/many", "last", timeout=20)
    assert reply["count"] == 301
    seen = (await client.agent_state("counter/many") or {})["seen"]
    for n in range(10):
        assert [i for s, i in seen[:-1] if s == f"s{n}"] == list(range(30))


async def test_a_repeated_turn_begin_runs_the_task_again_without_counting(
    client: Client, settings: Settings
) -> None:
    """A connection retry can run turn_begin twice (its first reply lost): the second
    call must hand the task out again, not skip it (which would lose it for good)."""
    from shoal import protocol

    async with running_node([Counter], settings):
        await client.call("increment", agent="counter/b0")  # registers the type
    handle = await client.submit("increment", agent="counter/rb")
    partition = partition_of("counter/rb", await client.partitions())
    keys = client.keys
    group = keys.partition_group(partition)
    token = await client.redis.hincrby(keys.lease_tokens(group), f"counter:{partition}", 1)
    await client.redis.set(keys.lease("counter", partition), f"n1 {token}", px=10_000)
    args: list[Any] = [keys.group_prefix(group), protocol.now_ms(), 60_000, b"", "n1"]
    args += ["counter", partition, token, handle.id]
    first = await client.scripts.turn_begin([keys.delayed(group)], args)
    again = await client.scripts.turn_begin([keys.delayed(group)], args)
    assert first[0][0] == again[0][0] == b"run"
    assert first[0][3] == again[0][3] == 1, "the same attempt, counted once"
    assert (await handle.status()).attempts == 1
