"""Failover with real processes and real kills: takeover, fencing, drain."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from typing import Any

import pytest

from shoal import Client, Settings
from tests.agents import Toolbox
from tests.conftest import REPO, node_env, node_process, running_node, wait_for_status


async def wait_all_running(client: Client, handles: list, timeout: float = 20) -> None:  # type: ignore[type-arg]
    """Until every task is 'running' (a node in another process starts them)."""
    async with asyncio.timeout(timeout):
        while True:
            pipe = client.redis.pipeline(transaction=False)
            for h in handles:
                pipe.hget(client.keys.task(h.id), "status")
            if all(s == b"running" for s in await pipe.execute()):
                return
            await asyncio.sleep(0.02)  # another process moves them


@pytest.mark.topology
async def test_kill_9_of_a_node_with_100_running_tasks_loses_none(
    client: Client, settings: Settings
) -> None:
    with node_process(
        settings, "tests.agents", "--name", "victim", "--concurrency", "200"
    ) as victim:
        await client.wait_for_hosts("nap")
        handles = await client.submit_many("nap", [{"seconds": 2.0, "i": i} for i in range(100)])
        await wait_all_running(client, handles)
        with node_process(settings, "tests.agents", "--name", "survivor", "--concurrency", "200"):
            await client.wait_for_hosts("nap", count=2)
            victim.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 30)
            recovered = time.monotonic() - killed
    assert [r["i"] for r in results] == list(range(100)), "every task completed"
    assert {r["node"] for r in results} == {"survivor"}
    infos = [await h.status() for h in handles]
    assert all(i.status == "succeeded" and i.attempts == 2 for i in infos)
    assert all(i.errors[0].message == "node died while running" for i in infos)
    assert all(r["token"] == 2 for r in results), "the re-run carries a newer fencing token"
    assert sum(i.duplicates for i in infos) == 0, "the dead node recorded nothing"
    assert recovered < 3.0 + 1.0 + 2.0 + 3.0, f"recovery took {recovered:.1f}s"


@pytest.mark.slow
async def test_a_task_running_ten_times_dead_after_on_a_live_node_is_never_taken_over(
    client: Client, settings: Settings
) -> None:
    """No visibility timeout: only a node's death hands its work over, however long a
    task runs (here 10x the silence that declares a node dead, with a peer's reaper
    looking all along)."""
    fast = {"heartbeat_interval": 0.25, "dead_after": 1.0}
    async with running_node([Toolbox], settings, name="runner", concurrency=2, **fast):
        handle = await client.submit("nap", seconds=10.0)
        await wait_for_status(handle, "running")
        async with running_node([Toolbox], settings, name="peer", **fast):
            result = await handle.result(timeout=60)
    info = await handle.status()
    assert result["node"] == "runner" and result["token"] == 1
    assert info.attempts == 1 and info.errors == () and info.duplicates == 0


async def test_a_poison_task_that_kills_its_node_ends_in_the_dead_letters(
    client: Client, settings: Settings
) -> None:
    with (
        node_process(settings, "tests.agents", "--name", "n1"),
        node_process(settings, "tests.agents", "--name", "n2"),
        node_process(settings, "tests.agents", "--name", "n3"),
    ):
        await client.wait_for_hosts("poison", count=3)
        handle = await client.submit("poison")  # max_attempts=2: two nodes die
        with pytest.raises(Exception, match="node died while running"):
            await handle.result(timeout=30)
        letters = await client.dead_letters("poison")
    assert [letter.task.id for letter in letters] == [handle.id]
    info = letters[0].task
    assert info.status == "dead" and info.attempts == 2
    assert [e.message for e in info.errors] == ["node died while running"] * 2


async def test_sigterm_hands_unfinished_work_back_at_once_and_exits_0(
    client: Client, settings: Settings
) -> None:
    with node_process(settings, "tests.agents", "--name", "leaving", "--grace", "0.2") as leaving:
        await client.wait_for_hosts("nap")
        handle = await client.submit("nap", seconds=3.0)
        blocking = await client.submit("blocking_sleep", seconds=3.0)
        await wait_for_status(handle, "running")
        await wait_for_status(blocking, "running")
        async with running_node([Toolbox], settings, name="staying"):
            leaving.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            assert await asyncio.to_thread(leaving.wait, 10) == 0
            exited = time.monotonic() - sent
            await wait_for_status(handle, "running")
            taken = time.monotonic() - sent
            result = await handle.result(timeout=10)
            assert await blocking.result(timeout=10) == "woke"
            assert await client.hosts("nap") == ["staying"], "the leaving node deregistered"
    assert exited < 2.0, "a sync handler still sleeping must not hold the exit"
    assert taken < 2.0, "handed back at once, not after dead_after"
    info = await handle.status()
    assert result["node"] == "staying" and info.attempts == 1, "a hand-back is not an attempt"


async def test_node_declared_dead_gives_up_its_work_and_comes_back(
    client: Client, settings: Settings
) -> None:
    """A node whose heartbeats stop (SIGSTOP: frozen, as in a long GC or a VM pause)
    is taken over; when it wakes, its late results are refused and it re-registers."""
    with node_process(settings, "tests.agents", "--name", "frozen") as frozen:
        await client.wait_for_hosts("nap")
        handle = await client.submit("nap", seconds=1.0)
        await wait_for_status(handle, "running")
        async with running_node([Toolbox], settings, name="survivor"):
            frozen.send_signal(signal.SIGSTOP)
            try:
                result = await handle.result(timeout=20)
            finally:
                frozen.send_signal(signal.SIGCONT)
            assert result["node"] == "survivor"
            await client.wait_for_hosts("nap", count=2, timeout=20)  # it registered again
    info = await handle.status()
    assert info.status == "succeeded" and result["token"] == 2


async def test_a_second_live_node_with_the_same_name_is_refused(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings, name="only-one"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal.cli", "node", "--app", "tests.agents",
            "--name", "only-one", "--dead-after", "1", "--heartbeat-interval", "0.2",
            cwd=REPO, env=node_env(settings), stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert "a live node named 'only-one' runs already" in err.decode()
        assert await client.hosts("echo") == ["only-one"], "the refused one left it alone"


@pytest.mark.topology
async def test_cluster_shows_nodes_and_queues(client: Client, settings: Settings) -> None:
    waiting = await client.submit_many("nap", [{"seconds": 5.0}] * 3)
    async with running_node([Toolbox], settings, name="seen", concurrency=2, zone="eu-1"):
        await wait_for_status(waiting[0], "running")
        await wait_for_status(waiting[1], "running")
        state = await client.cluster()
        for handle in waiting:
            await handle.cancel()
    node = next(n for n in state.nodes if n.id == "seen")
    assert node.state == "alive" and node.zone == "eu-1" and node.concurrency == 2
    assert "nap" in node.capabilities and node.heartbeat_age_s < 2.0
    nap = next(q for q in state.queues if q.capability == "nap" and q.priority == "normal")
    assert nap.pending == 2 and nap.waiting == 1 and nap.consumers >= 1
    assert nap.oldest_age_s is not None


async def test_a_killed_node_shows_as_dead(client: Client, settings: Settings) -> None:
    with node_process(settings, "tests.agents", "--name", "doomed") as doomed:
        await client.wait_for_hosts("nap")
        async with running_node([Toolbox], settings, name="witness"):
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
            async with asyncio.timeout(15):
                while True:  # the witness's reaper declares it dead
                    state = await client.cluster()
                    if any(n.id == "doomed" and n.state == "dead" for n in state.nodes):
                        break
                    await asyncio.sleep(0.1)


async def test_a_second_signal_forces_the_exit_without_draining(
    client: Client, settings: Settings
) -> None:
    node = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "node", "--app", "tests.agents",
        "--name", "impatient", "--grace", "60",
        cwd=REPO, env=node_env(settings), stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await client.wait_for_hosts("nap")
        handle = await client.submit("nap", seconds=30.0)
        await wait_for_status(handle, "running")
        node.send_signal(signal.SIGTERM)  # drain: would wait up to 60 s for the task
        assert node.stderr is not None
        async with asyncio.timeout(10):
            while b"draining" not in await node.stderr.readline():
                pass  # the node says it got the first signal
        node.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(node.wait(), 10) == 130
    finally:
        if node.returncode is None:
            node.kill()
            await node.wait()
    await handle.cancel()


async def test_a_node_restarted_under_its_name_takes_its_work_back_at_once(
    client: Client, settings: Settings
) -> None:
    """A supervisor restarting a crashed node (same name, same host) gets the crashed
    process's running tasks back at start-up, without waiting for dead_after."""
    with node_process(settings, "tests.agents", "--name", "phoenix") as first:
        await client.wait_for_hosts("nap")
        handles = await client.submit_many("nap", [{"seconds": 0.2, "i": i} for i in range(20)])
        await wait_all_running(client, handles)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed = time.monotonic()
        with node_process(settings, "tests.agents", "--name", "phoenix"):
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 20)
            recovered = time.monotonic() - killed
    assert [r["i"] for r in results] == list(range(20))
    assert all(r["token"] == 2 and r["node"] == "phoenix" for r in results)
    assert recovered < 2.5, f"took {recovered:.1f}s: waited for dead_after instead of reclaiming"


async def test_a_blocked_event_loop_does_not_make_a_node_look_dead(
    client: Client, settings: Settings
) -> None:
    """The heartbeat runs in its own thread: a handler blocking the loop for longer
    than dead_after does not get its node declared dead and its task re-run."""
    with node_process(settings, "tests.agents", "--name", "blocked"):
        await client.wait_for_hosts("blocks_loop")
        async with running_node([Toolbox], settings, name="watcher"):  # reaper runs
            handle = await client.submit("blocks_loop", seconds=5.0)
            result = await handle.result(timeout=30)
            state = await client.cluster()
    assert result == {"node": "blocked", "token": 1}, "ran once, never taken over"
    assert next(n for n in state.nodes if n.id == "blocked").state == "alive"


async def test_tasks_fetched_before_the_node_learnt_it_was_dead_go_back_not_run(
    client: Client, settings: Settings
) -> None:
    """A fetch reply that arrives after the node learnt it was declared dead (a link
    cut mid-reply, then restored) must not start its tasks — a survivor may run them
    already. Here the news lands while the fetch is on its way: the task goes back
    to its queue with its attempt not counted, and runs once, after."""
    async with running_node([Toolbox], settings, name="late") as node:
        fetch = node._fetch
        bumped = False
        wrapped = asyncio.Event()

        async def fetch_while_declared_dead(*args: Any) -> Any:
            nonlocal bumped
            wrapped.set()
            reply = await fetch(*args)
            if reply[0] and not bumped:
                bumped = True
                node._lives += 1  # what _on_liveness("dead") does, minus re-registering
            return reply

        node._fetch = fetch_while_declared_dead  # type: ignore[method-assign]
        # a fetch that began before the swap may still be on its way: submit once
        # the fetch loop has come round to the wrapper (within its idle block)
        await asyncio.wait_for(wrapped.wait(), 10)
        handle = await client.submit("whoami", i=7)
        result = await handle.result(timeout=10)
    info = await handle.status()
    assert bumped, "the fetch that carried the task was seen"
    assert result["i"] == 7 and info.status == "succeeded"
    assert info.attempts == 1, "the handed-back delivery is not counted as an attempt"
    token = await client.redis.hget(client.keys.task(handle.id), "token")
    assert token == b"2", "it was delivered twice and ran on the second delivery"
