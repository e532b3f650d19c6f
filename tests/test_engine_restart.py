"""Engine trouble: nodes and clients ride out an engine restart (AOF on) and a chaos
run of node kills. Each test runs its own engine, since it stops it."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import time
from typing import Any

import pytest

from shoal import Client, Settings
from shoal.engine import EmbeddedEngine
from tests.conftest import node_process


async def restart(engine: EmbeddedEngine, down_for: float = 0.0) -> None:
    """Stop the server (AOF flushed), keep it down ``down_for`` seconds (the length
    of the outage is the scenario), and start it again on the same data dir."""
    await asyncio.to_thread(engine.stop)
    await asyncio.sleep(down_for)
    await asyncio.to_thread(engine.ensure)


async def test_every_task_completes_across_an_engine_restart(own_engine: EmbeddedEngine) -> None:
    record = own_engine.ensure()
    settings = Settings(url=record.url, namespace="restart")
    with (
        node_process(settings, "tests.agents", "--name", "a"),
        node_process(settings, "tests.agents", "--name", "b"),
    ):
        async with Client(settings=settings) as client:
            await client.wait_for_hosts("nap", count=2)
            handles = await client.submit_many(
                "nap", [{"seconds": 0.02, "i": i} for i in range(2000)]
            )
            while (await client.redis.xlen(client.keys.queue("nap", "normal"))) > 1500:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # until the run is well under way
            await restart(own_engine, down_for=4.0)  # longer than dead_after
            results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 90)
            assert [r["i"] for r in results] == list(range(2000))
            assert {r["node"] for r in results} == {"a", "b"}
            assert {r["token"] for r in results} == {1}, (
                "no live node was declared dead because of the outage: nothing ran twice"
            )
            # No node was left idle: both still take work after the restart.
            after = await client.submit_many("nap", [{"seconds": 0.05, "i": i} for i in range(300)])
            later = await asyncio.gather(*(h.result(timeout=30) for h in after))
            assert {r["node"] for r in later} == {"a", "b"}


async def test_submit_during_an_outage_waits_for_the_engine_or_says_so(
    own_engine: EmbeddedEngine,
) -> None:
    record = own_engine.ensure()
    patient = Settings(url=record.url, namespace="outage", engine_timeout=20)
    impatient = Settings(url=record.url, namespace="outage", engine_timeout=0.5)
    async with Client(settings=patient) as client, Client(settings=impatient) as hasty:
        await asyncio.to_thread(own_engine.stop)
        with pytest.raises(Exception, match="cannot reach the engine"):
            await hasty.submit("nap", seconds=0.1)
        submitting = asyncio.create_task(client.submit("nap", seconds=0.1))
        await asyncio.sleep(0.5)  # the engine stays down for a while
        assert not submitting.done()
        await asyncio.to_thread(own_engine.ensure)
        handle = await asyncio.wait_for(submitting, 20)
        assert (await client.status(handle.id)).status == "queued", "stored, not just reported"


@pytest.mark.slow
async def test_chaos_node_kills_and_an_engine_restart_lose_nothing(
    own_engine: EmbeddedEngine,
) -> None:
    """3 node processes, 5,000 tasks of random duration; every few seconds one node is
    killed -9 and restarted; one engine restart. Bounded to about a minute."""
    record = own_engine.ensure()
    settings = Settings(url=record.url, namespace="chaos")
    rng = random.Random(int(os.environ.get("SHOAL_CHAOS_SEED", "7")))
    nodes: dict[str, subprocess.Popen[bytes]] = {}
    stack = [node_process(settings, "tests.agents", "--name", f"c{i}", "--concurrency", "32")
             for i in range(3)]  # fmt: skip
    for index, ctx in enumerate(stack):
        nodes[f"c{index}"] = ctx.__enter__()
    restarts: list[subprocess.Popen[bytes]] = []
    try:
        async with Client(settings=settings) as client:
            await client.wait_for_hosts("nap", count=3)
            handles = await client.submit_many(
                "nap", [{"seconds": rng.uniform(0.05, 0.3), "i": i} for i in range(5000)]
            )
            waiting = asyncio.ensure_future(asyncio.gather(*(h.result() for h in handles)))
            start = time.monotonic()
            for round_ in range(5):
                await asyncio.sleep(2.0)  # let it run between two strokes of chaos
                if waiting.done():
                    break
                if round_ == 2:
                    await restart(own_engine)
                    continue
                victim = rng.choice(sorted(nodes))
                nodes[victim].send_signal(signal.SIGKILL)
                nodes[victim].wait()
                ctx = node_process(
                    settings, "tests.agents", "--name", victim, "--concurrency", "32"
                )
                stack.append(ctx)
                nodes[victim] = ctx.__enter__()
                restarts.append(nodes[victim])
            try:
                results = await asyncio.wait_for(asyncio.shield(waiting), 60)
            except TimeoutError:
                await _print_stuck(client, handles)
                raise
            elapsed = time.monotonic() - start
            assert sorted(r["i"] for r in results) == list(range(5000)), "none lost"
            pipe = client.redis.pipeline(transaction=False)
            for h in handles:
                pipe.hmget(client.keys.task(h.id), "status", "token", "dups")
            records = await pipe.execute()
    finally:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)
    assert all(status == b"succeeded" for status, _, _ in records), "each recorded, succeeded"
    executions = sum(int(token) for _, token, _ in records)
    refused = sum(int(dups or 0) for _, _, dups in records)
    print(
        f"chaos: 5000 tasks in {elapsed:.1f}s; {executions - 5000} re-run(s) after kills, "
        f"{refused} late duplicate outcome(s) refused"
    )
    assert elapsed < 60


async def _print_stuck(client: Client, handles: list[Any]) -> None:
    """On failure, say where the unfinished tasks are (for the CI log)."""
    pipe = client.redis.pipeline(transaction=False)
    for h in handles:
        pipe.hmget(client.keys.task(h.id), "status", "node", "token")
    records = await pipe.execute()
    print("task states:", collections.Counter((r[0], r[1]) for r in records))
    print("live nodes:", await client.redis.zrange(client.keys.nodes, 0, -1, withscores=True))
    queue = client.keys.queue("nap", "normal")
    print("pending:", await client.redis.xpending(queue, "nodes"))


async def test_watchdog_reports_a_node_that_cannot_record_its_results(
    own_engine: EmbeddedEngine,
) -> None:
    from tests.agents import Toolbox
    from tests.conftest import running_node, wait_for_status

    record = own_engine.ensure()
    settings = Settings(url=record.url, namespace="watchdog")
    async with (
        Client(settings=settings) as client,
        running_node([Toolbox], settings, stall_after=1.0) as node,
    ):
        handle = await client.submit("nap", seconds=0.5)
        await wait_for_status(handle, "running")
        await asyncio.to_thread(own_engine.stop)
        async with asyncio.timeout(10):
            while not node.stalled:  # noqa: ASYNC110 - the watchdog sets it
                await asyncio.sleep(0.1)
        assert "holds unrecorded results" in node.stalled
        await asyncio.to_thread(own_engine.ensure)
        assert (await handle.result(timeout=20))["i"] == 0
        async with asyncio.timeout(10):
            while node.stalled:  # noqa: ASYNC110 - cleared once it records again
                await asyncio.sleep(0.1)
