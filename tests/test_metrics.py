"""Metrics: what nodes count (attempts, times, takeovers, duplicates, agents), what a
node process serves on its /metrics port, and the cluster-wide gauges a gateway reads.

The registry is per process and its counters only grow, so the in-process tests
compare before and after."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal import Client, Settings, TaskFailed, protocol
from shoal.cluster import ClusterState, NodeInfo
from shoal.errors import ConfigurationError
from shoal.node import Node, NodeConfig
from shoal.observability import metrics
from shoal.protocol import ErrorInfo
from shoal.recovery import Reaper
from tests.agents import Toolbox
from tests.conftest import eventually, node_process, running_node, wait_for_status
from tests.stateful import Counter
from tests.test_cli import shoal


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def growth() -> Callable[[str], float]:
    """How much a sample grew since now: ``grown = growth(); ...; grown('name', k=v)``."""
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in metrics.REGISTRY.collect()
        for s in family.samples
    }

    def grown(name: str, **labels: str) -> float:
        return sample(name, **labels) - values.get((name, tuple(sorted(labels.items()))), 0.0)

    return grown


async def test_attempts_are_counted_by_capability_and_outcome(
    client: Client, settings: Settings
) -> None:
    grown = growth()
    async with running_node([Toolbox], settings):
        assert [await client.call("echo", value=i) for i in range(2)] == [0, 1]
        with pytest.raises(TaskFailed):
            await client.call("always_fails")  # 2 attempts: retried, then dead
        with pytest.raises(TaskFailed):
            await client.call("permanent")  # non-retryable: failed at once
    finished = "shoal_tasks_finished_total"
    assert grown("shoal_tasks_started_total", capability="echo") == 2
    assert grown(finished, capability="echo", outcome="succeeded") == 2
    assert grown("shoal_tasks_started_total", capability="always_fails") == 2
    assert grown(finished, capability="always_fails", outcome="retried") == 1
    assert grown(finished, capability="always_fails", outcome="dead") == 1
    assert grown(finished, capability="permanent", outcome="failed") == 1
    assert grown(finished, capability="permanent", outcome="retried") == 0
    assert grown("shoal_task_run_seconds_count", capability="echo") == 2
    assert grown("shoal_task_queue_wait_seconds_count", capability="echo") == 2


async def test_run_time_and_queue_wait_measure_the_handler_and_the_wait(
    client: Client, settings: Settings
) -> None:
    grown = growth()
    handle = await client.submit("sleepy", seconds=0.3)  # queued before any node runs
    async with running_node([Toolbox], settings):
        assert await handle.result(timeout=10) == "woke"
    info = await handle.status()
    assert info.started_at is not None and info.finished_at is not None
    # The wait runs from the queueing to the handler's start: after the node claimed
    # the entry (the record's started_at), before the 0.3 s handler finished. A
    # loaded machine widens the gap between the claim and the start, nothing else.
    claimed = (info.started_at - info.created_at) / 1000
    handler_start_at_latest = (info.finished_at - info.created_at) / 1000 - 0.3
    waited = grown("shoal_task_queue_wait_seconds_sum", capability="sleepy")
    assert claimed - 0.002 <= waited <= handler_start_at_latest + 0.002  # ms clocks
    assert 0.3 <= grown("shoal_task_run_seconds_sum", capability="sleepy") < 1.0
    assert grown("shoal_task_run_seconds_bucket", capability="sleepy", le="0.25") == 0
    assert grown("shoal_task_run_seconds_bucket", capability="sleepy", le="0.5") == 1


async def test_a_takeover_after_a_node_death_is_counted(client: Client, settings: Settings) -> None:
    grown = growth()
    fast = ("--dead-after", "1", "--heartbeat-interval", "0.2")
    with node_process(settings, "tests.agents", "--name", "doomed", *fast) as doomed:
        await client.wait_for_hosts("nap")
        handle = await client.submit("nap", seconds=0.5)
        await wait_for_status(handle, "running")
        async with running_node(
            [Toolbox], settings, name="heir", dead_after=1.0, heartbeat_interval=0.2
        ):
            doomed.send_signal(signal.SIGKILL)
            await asyncio.to_thread(doomed.wait)
            result = await handle.result(timeout=20)
    assert result["node"] == "heir"
    assert grown("shoal_nodes_declared_dead_total") == 1
    assert grown("shoal_tasks_reclaimed_total", outcome="requeued") == 1
    assert grown("shoal_tasks_reclaimed_total", outcome="dead_lettered") == 0


async def test_an_outcome_refused_as_a_duplicate_is_counted(
    client: Client, settings: Settings
) -> None:
    grown = growth()
    async with running_node([Toolbox], settings, name="late", concurrency=1):
        handle = await client.submit("nap", seconds=0.5)
        await wait_for_status(handle, "running")
        # taken over while it runs, as if its node had been declared dead meanwhile:
        # its outcome, sent later, is refused (the re-run's is recorded)
        died = protocol.encode(ErrorInfo("shoal.errors.NodeDied", "taken over by the test"))
        requeued, _ = await Reaper(client, "elsewhere", 3.0).claim("late", "nap", died)
        assert requeued == [handle.id]
        await handle.result(timeout=10)
    info = await handle.status()
    assert info.duplicates == 1 and info.attempts == 2
    assert grown("shoal_duplicate_outcomes_total") == 1


async def test_agent_activations_turns_and_partition_moves_are_counted(
    client: Client, settings: Settings
) -> None:
    grown = growth()
    async with running_node([Counter], settings, name="host"):
        await client.send("counter/a", "one")
        assert (await client.request("counter/a", "two"))["count"] == 2
        assert (await client.request("counter/b", "three"))["count"] == 1
        assert await client.call("increment", agent="counter/a") == 1
        assert grown("shoal_partition_changes_total", agent_type="counter", change="acquired") > 0
    changes = "shoal_partition_changes_total"
    acquired = grown(changes, agent_type="counter", change="acquired")
    assert grown(changes, agent_type="counter", change="released") == acquired, "drained"
    assert grown(changes, agent_type="counter", change="lost") == 0
    assert grown("shoal_agent_activations_total", agent_type="counter") == 2
    assert grown("shoal_agent_deactivations_total", agent_type="counter") == 2
    assert grown("shoal_agent_turns_total", agent_type="counter", kind="msg") == 3
    assert grown("shoal_agent_turns_total", agent_type="counter", kind="task") == 1
    assert grown("shoal_tasks_finished_total", capability="increment", outcome="succeeded") == 1


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    response.raise_for_status()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


async def node_record(client: Client, node_id: str) -> NodeInfo:
    return next(n for n in (await client.cluster()).nodes if n.id == node_id)


async def test_a_node_serves_metrics_on_the_port_it_publishes(
    client: Client, settings: Settings
) -> None:
    with node_process(settings, "tests.agents", "--name", "scraped", "--metrics-port", "0"):
        await client.wait_for_hosts("echo")
        port = (await node_record(client, "scraped")).metrics_port
        assert port, "the port it picked is in its record (shoal status --json shows it)"
        handles = await client.submit_many("echo", [{"value": i} for i in range(3)])
        assert await asyncio.gather(*(h.result(timeout=10) for h in handles)) == [0, 1, 2]
        scraped = await scrape(port)
        code, table, _ = await shoal(settings, "status")
        assert code == 0 and f":{port}" in table, "shoal status shows where it serves"
    succeeded = (("capability", "echo"), ("outcome", "succeeded"))
    assert scraped["shoal_tasks_finished_total", succeeded] == 3
    assert scraped["shoal_task_run_seconds_count", (("capability", "echo"),)] == 3
    assert scraped["shoal_node_in_flight", (("node", "scraped"),)] == 0
    assert scraped["shoal_node_free_slots", (("node", "scraped"),)] == 64


async def test_a_taken_metrics_port_stops_the_node_at_start(settings: Settings) -> None:
    taken = metrics.MetricsServer("127.0.0.1", 0)
    try:
        node = Node([Toolbox], settings, NodeConfig(metrics_port=taken.port))
        with pytest.raises(ConfigurationError, match=f"metrics on 127.0.0.1:{taken.port}"):
            await node.run()
    finally:
        taken.close()
    with pytest.raises(ConfigurationError, match="metrics_port"):
        NodeConfig(metrics_port=70000)


async def test_a_node_answers_health_and_readiness_probes_next_to_metrics(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_node([Toolbox], settings, metrics_port=0, stall_after=0.5) as node:
        base = f"http://127.0.0.1:{node.telemetry.metrics_port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            ready = await eventually(
                lambda: _probe(http, metrics.READY_PATH, 200), "the node reports ready"
            )
            alive = await http.get(metrics.HEALTH_PATH)
            assert (alive.status_code, alive.text, ready.text) == (200, "ok\n", "ok\n")
            assert "shoal_node_in_flight" in (await http.get("/metrics")).text

        # a loop that stops turning fails liveness, seen from the metrics thread
        monkeypatch.setattr("shoal.node.LOOP_BLOCKED_AFTER_S", 0.3)
        seen: list[tuple[int, str]] = []
        found = threading.Event()

        def watch() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not found.is_set():
                r = httpx.get(base + metrics.HEALTH_PATH, timeout=5)
                seen.append((r.status_code, r.text))
                if r.status_code == 503:
                    found.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        found.wait(timeout=10)  # blocks the event loop: the condition under test
        watcher.join()
        assert seen[-1][0] == 503 and "event loop unresponsive" in seen[-1][1], seen
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            await eventually(lambda: _probe(http, metrics.HEALTH_PATH, 200), "alive again")
        node.stop()
        assert node.readiness() == (False, "draining")


async def _probe(http: httpx.AsyncClient, path: str, status: int) -> httpx.Response | None:
    response = await http.get(path)
    return response if response.status_code == status else None


def cluster_gauge(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


async def test_cluster_gauges_follow_the_cluster_and_forget_a_node_that_left(
    client: Client, settings: Settings
) -> None:
    naps = await client.submit_many("nap", [{"seconds": 30.0}] * 3)
    async with running_node([Toolbox, Counter], settings, name="gauged", concurrency=1):

        async def settled() -> ClusterState | None:
            state = await client.cluster()
            owned = all(t.unowned == 0 for t in state.agent_types) and state.agent_types
            running = any(q.capability == "nap" and q.pending == 1 for q in state.queues)
            return state if owned and running else None

        await eventually(settled, "a nap running and every counter partition owned")
        await metrics.refresh_cluster_gauges(client)
        nap = {"capability": "nap", "priority": "normal"}
        assert cluster_gauge("shoal_cluster_queue_depth", **nap) == 3
        assert cluster_gauge("shoal_cluster_queue_waiting", **nap) == 2
        assert cluster_gauge("shoal_cluster_queue_pending", **nap) == 1
        assert (cluster_gauge("shoal_cluster_queue_oldest_age_seconds", **nap) or 0) > 0
        assert cluster_gauge("shoal_cluster_dead_letters", capability="nap") == 0
        assert cluster_gauge("shoal_cluster_nodes", state="alive") == 1
        assert cluster_gauge("shoal_cluster_node_free_slots", node="gauged") is not None
        partitions = await client.partitions()
        owned = cluster_gauge("shoal_cluster_partitions_owned", node="gauged", agent_type="counter")
        assert owned == partitions
        assert cluster_gauge("shoal_cluster_partitions_unowned", agent_type="counter") == 0
        for handle in naps:
            await handle.cancel()
    await metrics.refresh_cluster_gauges(client)
    assert cluster_gauge("shoal_cluster_node_free_slots", node="gauged") is None, "gone with it"
    owner = {"node": "gauged", "agent_type": "counter"}
    assert cluster_gauge("shoal_cluster_partitions_owned", **owner) is None
    assert cluster_gauge("shoal_cluster_partitions_unowned", agent_type="counter") == partitions
    assert cluster_gauge("shoal_cluster_nodes", state="alive") == 0


def test_gateway_metrics_render_in_the_prometheus_text_format() -> None:
    grown = growth()
    metrics.observe_http("/tasks/{task_id}", "GET", 200, 0.004)
    metrics.observe_http("/tasks/{task_id}", "GET", 404, 0.002)
    metrics.rate_limited(None)
    metrics.rate_limited("key-7")
    metrics.tasks_submitted("summarize", 3)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    parsed: dict[str, Any] = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    route = {"route": "/tasks/{task_id}", "method": "GET"}
    assert parsed["shoal_http_requests_total", tuple(sorted({**route, "status": "404"}.items()))]
    assert grown("shoal_http_requests_total", **route, status="200") == 1
    assert grown("shoal_http_request_duration_seconds_count", **route) == 2
    assert grown("shoal_rate_limited_total", key="anonymous") == 1
    assert grown("shoal_rate_limited_total", key="key-7") == 1
    assert grown("shoal_tasks_submitted_total", capability="summarize") == 3
