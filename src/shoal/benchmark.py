"""A quick, bounded benchmark — ``shoal bench`` — and the pieces the full suite in the
repository's ``bench/`` is built on.

Installed with the package, so anyone can measure Shoal on their own machine and
engine without a checkout: no-op task throughput with 1..N node processes, the
round trip of one task at a time (p50/p99), and the round trip of a request to an
agent. Figures depend on the machine; compare runs on the same one.

The full suite (peers such as Celery, engine statistics, Cluster and Sentinel
topologies, failover) lives in ``bench/`` and imports the agents, the engine and
node helpers and the measuring loops from here, so both measure the same thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from shoal import __version__
from shoal.addresses import mask_url
from shoal.agent import Agent, capability, handler
from shoal.client import Client, TaskHandle
from shoal.engine import EmbeddedEngine
from shoal.settings import Settings

APP = "shoal.benchmark"  # the --app of the node processes: the agents below
ECHO_AGENT = "bench_echo/a"
NODE_STOP_S = 30.0


class Noop(Agent):
    """Tasks that do nothing, so what is measured is Shoal; and tasks of a known
    duration, for the failover benchmark."""

    @capability("noop")
    async def noop(self, i: int = 0) -> int:
        return i

    @capability("nap")
    async def nap(self, seconds: float = 0.2, i: int = 0) -> int:
        await asyncio.sleep(seconds)  # the work itself: a task of known duration
        return i


class BenchEcho(Agent):
    """An addressed agent that replies with what it got: the request round trip."""

    @capability("bench_echo_noop")
    async def noop(self) -> None:
        """Never called: a node needs every type it hosts to have a capability."""

    @handler
    async def receive(self, message: Any) -> Any:
        return message


agents = [Noop, BenchEcho]


# --- an engine and nodes of one's own --------------------------------------------------


@contextlib.contextmanager
def private_engine() -> Iterator[str]:
    """A fresh embedded engine in a temporary directory (stopped and removed at the
    end), so a run neither disturbs nor is disturbed by other work; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        engine = EmbeddedEngine(tmp)
        record = engine.ensure()
        try:
            yield record.url
        finally:
            engine.stop()


@contextlib.contextmanager
def node_processes(
    url: str,
    namespace: str,
    count: int,
    concurrency: int = 256,
    env: dict[str, str] | None = None,
    app: str = APP,
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` separate ``shoal node`` processes hosting ``app``; drained (SIGTERM)
    at the end, killed if one does not stop within NODE_STOP_S."""
    env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": namespace, **(env or {})}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "node", "--app", app,
             "--concurrency", str(concurrency), "--name", f"bench-{namespace}-{i}",
             "--log-level", "warning"],
            env=env,
        )
        for i in range(count)
    ]  # fmt: skip
    try:
        yield procs
    finally:
        _stop(procs)


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=NODE_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- measuring -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Drained:
    """``n`` no-op tasks submitted at once and all their results back."""

    handles: list[TaskHandle]
    results: list[Any]
    submit_s: float  # submitting them all
    seconds: float  # first submit to last result

    @property
    def tasks_per_s(self) -> float:
        return len(self.handles) / self.seconds


async def drain(client: Client, n: int) -> Drained:
    """Submit ``n`` no-op tasks with submit_many and wait for every result."""
    start = time.perf_counter()
    handles = await client.submit_many("noop", [{"i": i} for i in range(n)])
    submitted = time.perf_counter()
    results = await asyncio.gather(*(h.result() for h in handles))
    done = time.perf_counter()
    return Drained(handles, list(results), submitted - start, done - start)


async def round_trips(client: Client, n: int) -> list[float]:
    """``n`` sequential no-op calls (submit, wait for the result); each one's ms."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await client.call("noop", i=i)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def request_round_trips(client: Client, agent_id: str, n: int) -> list[float]:
    """``n`` sequential requests to an agent that echoes them; each one's ms."""
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await client.request(agent_id, i, timeout=30)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of sorted values; NaN for none."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summary(samples_ms: list[float]) -> dict[str, Any]:
    """n, p50, p90, p99 and mean of round-trip times in ms."""
    ms = sorted(samples_ms)
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --- the quick profile -------------------------------------------------------------------


@dataclass(frozen=True)
class QuickProfile:
    """How much ``shoal bench`` does. The defaults take some 10-30 s on a small machine
    (most of it starting node processes); every figure can be made tiny for a test."""

    tasks: int = 20_000  # no-op tasks per throughput run
    nodes: int = 2  # throughput with 1, 2, .. this many node processes
    round_trips: int = 2000  # sequential task round trips (one node)
    requests: int = 1000  # sequential agent requests (one node); 0 skips them
    concurrency: int = 256  # tasks each node runs at once
    warmup: int = 20  # round trips of each kind before measuring

    def steps(self) -> list[str]:
        """What a run does, in order (for a progress display)."""
        names = [f"throughput, {k} node(s)" for k in range(1, self.nodes + 1)]
        return [names[0], "task round trips", *(["agent requests"] if self.requests else []),
                *names[1:]]  # fmt: skip


async def _one_node(client: Client, profile: QuickProfile, step: Callable[[str], None]) -> Any:
    """On one node: throughput, then task round trips, then agent requests."""
    await client.wait_for_hosts("noop", timeout=60)
    await round_trips(client, profile.warmup)  # scripts loaded, consumer groups made
    step(profile.steps()[0])
    drained = await drain(client, profile.tasks)
    step("task round trips")
    latency = summary(await round_trips(client, profile.round_trips))
    requests = None
    if profile.requests:
        step("agent requests")
        await request_round_trips(client, ECHO_AGENT, profile.warmup)
        requests = summary(await request_round_trips(client, ECHO_AGENT, profile.requests))
    return drained, latency, requests


async def _more_nodes(client: Client, profile: QuickProfile, nodes: int) -> Drained:
    await client.wait_for_hosts("noop", count=nodes, timeout=60)
    await round_trips(client, profile.warmup)
    return await drain(client, profile.tasks)


def _throughput(nodes: int, drained: Drained) -> dict[str, Any]:
    if drained.results != list(range(len(drained.handles))):
        raise AssertionError("a no-op task's result is missing or wrong")
    return {
        "nodes": nodes, "tasks": len(drained.handles), "submit_s": round(drained.submit_s, 3),
        "seconds": round(drained.seconds, 3), "tasks_per_s": round(drained.tasks_per_s),
    }  # fmt: skip


def run_quick(
    profile: QuickProfile,
    url: str,
    namespace: str | None = None,
    step: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """The quick profile against the engine at ``url``, in a fresh namespace per node
    count (``namespace`` as their prefix). ``step`` is told each step as it starts."""
    prefix = namespace or f"bench-{time.monotonic_ns()}"
    result: dict[str, Any] = {"benchmark": "quick", "version": __version__,
                              "machine": machine(), "engine": mask_url(url),
                              "profile": vars(profile).copy(), "throughput": []}  # fmt: skip
    for nodes in range(1, profile.nodes + 1):
        ns = f"{prefix}-{nodes}"
        with node_processes(url, ns, nodes, profile.concurrency):
            settings = Settings(url=url, namespace=ns)
            if nodes == 1:
                drained, latency, requests = asyncio.run(_measure_one(settings, profile, step))
                result |= {"task_round_trip": latency, "agent_request": requests}
            else:
                step(f"throughput, {nodes} node(s)")
                drained = asyncio.run(_measure_more(settings, profile, nodes))
        result["throughput"].append(_throughput(nodes, drained))
    return result


async def _measure_one(
    settings: Settings, profile: QuickProfile, step: Callable[[str], None]
) -> Any:
    async with Client(settings=settings) as client:
        return await _one_node(client, profile, step)


async def _measure_more(settings: Settings, profile: QuickProfile, nodes: int) -> Drained:
    async with Client(settings=settings) as client:
        return await _more_nodes(client, profile, nodes)
