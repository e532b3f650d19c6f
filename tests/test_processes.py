"""Nodes as separate processes, started the way a user starts them (`shoal node`)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from shoal import Client, Settings
from tests.conftest import REPO, node_env, node_process, wait_for_status

pytestmark = pytest.mark.asyncio


async def test_quickstart_runs_end_to_end_with_two_node_processes(
    settings: Settings, tmp_path: object
) -> None:
    """The README's quickstart script, against two `shoal node` processes."""
    with (
        node_process(settings, "examples.quickstart", "--name", "qs-1"),
        node_process(settings, "examples.quickstart", "--name", "qs-2"),
    ):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "examples/quickstart.py", "--no-nodes", "--tasks", "200",
            cwd=REPO, env=node_env(settings),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), 120)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "summarize ->" in text
    assert "200 tasks done" in text
    assert "qs-1" in text and "qs-2" in text, "both nodes did some of the work"


@pytest.mark.slow
@pytest.mark.topology
async def test_ten_thousand_tasks_across_two_nodes_each_succeed_exactly_once(
    client: Client, settings: Settings
) -> None:
    n = 10_000
    with (
        node_process(settings, "tests.agents", "--name", "a"),
        node_process(settings, "tests.agents", "--name", "b"),
    ):
        await client.wait_for_hosts("whoami", count=2)
        handles = await client.submit_many("whoami", [{"i": i} for i in range(n)])
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), 120)
    assert [r["i"] for r in results] == list(range(n))
    by_node = {node: sum(1 for r in results if r["node"] == node) for node in ("a", "b")}
    assert by_node["a"] + by_node["b"] == n
    assert min(by_node.values()) > n * 0.1, f"work was not shared: {by_node}"
    pipe = client.redis.pipeline(transaction=False)
    for h in handles:
        pipe.hmget(client.keys.task(h.id), "status", "attempts", "dups")
    records = await pipe.execute()
    assert all(r == [b"succeeded", b"1", None] for r in records), "each ran once, recorded once"
    for priority in ("high", "normal", "low"):
        assert await client.redis.xlen(client.keys.queue("whoami", priority)) == 0, (
            "acknowledged entries are trimmed from the stream"
        )


async def test_node_process_drains_on_sigterm_and_deregisters(
    client: Client, settings: Settings
) -> None:
    with node_process(settings, "tests.agents", "--name", "drainer") as proc:
        await client.wait_for_hosts("sleepy")
        handle = await client.submit("sleepy", seconds=0.5)
        await wait_for_status(handle, "running")
        proc.terminate()
        assert await asyncio.to_thread(proc.wait, 30) == 0
    assert await handle.result(timeout=1) == "woke", "the running task finished during drain"
    assert await client.hosts("sleepy") == []
