"""Gateway: what the HTTP gateway costs, as a ratio to the Python client, measured in
the same run on the same engine and node.

    python -m bench.gateway [--seconds 10] [--concurrency 1 64] [--repeat K] [--save [NAME]]
    python -m bench.gateway --loader wrk            # the one-request path also through wrk
    python -m bench.gateway --table bench/results/gateway-<date>.json   # docs' tables
    python -m bench.gateway --paths http-wait --concurrency 64 \\
        --profile-out bench/results/gateway-profile.txt    # the gateway under pyinstrument

One engine (the embedded server), one ``shoal node`` process hosting bench.noop_app,
and one ``shoal gateway`` process (loopback, no API keys, ``--key-rate 0``). A load
process, apart from the gateway, runs each path as a closed loop of N callers for
``--seconds`` after ``--warmup``:

* ``direct``: ``shoal.Client.call`` (submit, then the result from the inbox);
* ``http-wait``: ``POST /v1/tasks?wait=30``, the outcome in the same answer;
* ``http-2step``: ``POST /v1/tasks``, then ``GET /v1/tasks/{id}?wait=30``.

HTTP goes through httpx: N ``AsyncClient``s of one keep-alive connection each, one
per caller. ``--loader wrk`` also drives ``http-wait`` with wrk (N connections, one
thread), whose C loop costs far less CPU than httpx. Each phase reports tasks/s,
latency percentiles, the CPU each process used in the window (gateway, node, engine,
load process; and other processes on the machine) and the engine's commands per
task; each run, the gateway/direct ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil

from bench.common import (
    REPO,
    Engine,
    code_version,
    emit,
    engine_report,
    engine_snapshot,
    machine,
    node_processes,
    percentile,
    private_topology,
    save,
)
from shoal import Client, Settings

PATHS = ("direct", "http-wait", "http-2step")
WAIT_S = 30
NOTE = (
    "2 cores: the load process, the gateway, the node and the engine compete for them, "
    "so a gateway path also pays for the HTTP load generator's CPU (httpx: a Python "
    "client, not free) and the direct path for the Python client in the load process. "
    "The ratios are what one machine shows, not what a gateway costs on its own cores. "
    "cpu_pct.others is what the rest of the machine used meanwhile (other processes, "
    "and kernel work no process is charged for); 100 is a whole core."
)


@dataclass(frozen=True)
class Phase:
    """One measured path at one concurrency, as the load process runs it."""

    path: str
    concurrency: int
    seconds: float
    warmup: float
    engine: Engine
    namespace: str
    base_url: str
    pids: dict[str, int]  # gateway and node: their CPU is read over the window


# --- the load process ---------------------------------------------------------------


def run_phase(phase: Phase) -> dict[str, Any]:
    """Entry point in the load process (a spawned worker)."""
    return asyncio.run(_phase(phase))


async def _phase(phase: Phase) -> dict[str, Any]:
    settings = Settings(url=phase.engine.url, namespace=phase.namespace)
    async with contextlib.AsyncExitStack() as stack:
        if phase.path == "direct":  # one Client shared by the callers, as in the gateway
            client = await stack.enter_async_context(Client(settings=settings))
            await client.wait_for_hosts("noop")
            ops = [_direct(client)] * phase.concurrency
        else:  # one keep-alive connection per caller (see _http_client)
            step = _one_step if phase.path == "http-wait" else _two_step
            clients = [_http_client(phase.base_url) for _ in range(phase.concurrency)]
            ops = [step(await stack.enter_async_context(http)) for http in clients]
        return await _closed_loop(phase, ops)


def _http_client(base_url: str) -> httpx.AsyncClient:
    """A client of one keep-alive connection. Callers do not share one client with N
    connections: httpx's pool (httpcore) scans its connections for every request
    queued on each event, so 64 callers sharing it got ~40 requests/s with the load
    process at 100 % CPU in a trial run (encode/httpx#3215); 64 clients of one
    connection each, ~700."""
    return httpx.AsyncClient(
        base_url=base_url,
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=WAIT_S + 30,
        trust_env=False,
    )


Op = Callable[[int], Awaitable[None]]


def _direct(client: Client) -> Op:
    async def op(i: int) -> None:
        result = await client.call("noop", i=i)
        if result != i:
            raise ValueError(f"result {result!r}, expected {i}")

    return op


def _body(i: int) -> bytes:
    return msgspec.json.encode({"capability": "noop", "args": {"i": i}})


JSON = {"content-type": "application/json"}


def _one_step(http: httpx.AsyncClient) -> Op:
    async def op(i: int) -> None:
        answer = await http.post(f"/v1/tasks?wait={WAIT_S}", content=_body(i), headers=JSON)
        _check(answer, 201, msgspec.json.decode(answer.content).get("outcome"), i)

    return op


def _two_step(http: httpx.AsyncClient) -> Op:
    async def op(i: int) -> None:
        answer = await http.post("/v1/tasks", content=_body(i), headers=JSON)
        _check(answer, 201, None, None)
        task_id = msgspec.json.decode(answer.content)["id"]
        answer = await http.get(f"/v1/tasks/{task_id}?wait={WAIT_S}")
        _check(answer, 200, msgspec.json.decode(answer.content), i)

    return op


def _check(answer: httpx.Response, status: int, outcome: Any, i: int | None) -> None:
    if answer.status_code != status:
        raise ValueError(f"HTTP {answer.status_code}: {answer.text[:200]}")
    if i is not None and (outcome["task"]["status"] != "succeeded" or outcome["result"] != i):
        raise ValueError(f"outcome {outcome!r}, expected the result {i}")


async def _closed_loop(phase: Phase, ops: list[Op]) -> dict[str, Any]:
    """A caller per op, each starting its next task when its last one ended; the
    tasks that ended within the window count, and their latencies."""
    start = time.perf_counter() + phase.warmup
    end = start + phase.seconds
    samples: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    counter = iter(range(1 << 62))

    async def caller(op: Op) -> None:
        while (began := time.perf_counter()) < end:
            try:
                await op(next(counter))
            except Exception as exc:
                errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                continue
            if began >= start and (done := time.perf_counter()) <= end:
                samples.append(done - began)

    window = asyncio.create_task(_window_usage(phase, start, end))
    await asyncio.gather(*(caller(op) for op in ops))
    usage = await window
    return _summary(phase, samples, errors, usage)


async def _window_usage(phase: Phase, start: float, end: float) -> dict[str, Any]:
    await asyncio.sleep(start - time.perf_counter())
    before = await asyncio.to_thread(_usage, phase)
    await asyncio.sleep(end - time.perf_counter())
    after = await asyncio.to_thread(_usage, phase)
    return {"before": before, "after": after}


def _usage(phase: Phase) -> dict[str, Any]:
    """CPU seconds of each process so far, the machine's busy and total CPU seconds,
    and the engine's statistics."""
    cpu = {name: _cpu_s(pid) for name, pid in phase.pids.items()}
    cpu["load"] = time.process_time()
    machine_cpu = psutil.cpu_times()
    idle = machine_cpu.idle + getattr(machine_cpu, "iowait", 0.0)
    return {
        "cpu": cpu,
        "machine_busy": sum(machine_cpu) - idle,
        "engine": engine_snapshot(phase.engine),
        "at": time.perf_counter(),
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of one process so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def _summary(
    phase: Phase, samples: list[float], errors: dict[str, int], usage: dict[str, Any]
) -> dict[str, Any]:
    before, after = usage["before"], usage["after"]
    wall = after["at"] - before["at"]
    n = len(samples)
    samples.sort()
    result: dict[str, Any] = {
        "path": phase.path,
        "concurrency": phase.concurrency,
        "seconds": round(wall, 2),
        "tasks": n,
        "tasks_per_s": round(n / wall, 1),
        "p50_ms": round(percentile(samples, 0.50) * 1000, 3),
        "p90_ms": round(percentile(samples, 0.90) * 1000, 3),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(samples) * 1000, 3) if samples else None,
        "errors": dict(errors),
        **_cpu_report(before, after, wall, n),
    }
    if n:
        report = engine_report(before["engine"], after["engine"], n)
        result["engine"] = {k: v for k, v in report.items() if k != "shards"}
    return result


def _cpu_report(
    before: dict[str, Any], after: dict[str, Any], wall: float, n: int
) -> dict[str, Any]:
    """Each process's share of one core over the window (100 = a whole core), its
    CPU per task, and what other processes on the machine used meanwhile."""
    used = {name: after["cpu"][name] - before["cpu"][name] for name in before["cpu"]}
    engine = sum(s.cpu_s for s in after["engine"]["primaries"]) - sum(
        s.cpu_s for s in before["engine"]["primaries"]
    )
    used["engine"] = engine
    busy = after["machine_busy"] - before["machine_busy"]
    used["others"] = max(0.0, busy - sum(used.values()))
    return {
        "cpu_pct": {name: round(s / wall * 100, 1) for name, s in used.items()}
        | {"machine_busy": round(busy / wall * 100, 1)},
        "cpu_us_per_task": {name: round(s / n * 1e6, 1) for name, s in used.items()} if n else {},
    }


# --- the processes under test --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def gateway_process(
    url: str, namespace: str, profile: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """One ``shoal gateway`` on a free loopback port, no keys, no rate limit; with
    ``profile``, under pyinstrument, which writes its session there when it stops.
    That one is stopped with SIGINT: uvicorn re-raises the signal it stopped on, and
    only SIGINT (KeyboardInterrupt) lets pyinstrument write before the process ends."""
    port = free_port()
    argv = ["-m", "shoal.cli", "gateway", "--host", "127.0.0.1", "--port", str(port),
            "--key-rate", "0", "--no-dashboard", "--log-level", "warning"]  # fmt: skip
    if profile is not None:
        argv = ["-m", "pyinstrument", "-i", "0.0005", "-r", "pyisession", "-o", str(profile),
                *argv]  # fmt: skip
    env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": namespace}
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base_url)
        yield proc, base_url
    finally:
        proc.send_signal(signal.SIGINT if profile else signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], base_url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with status {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base_url}/readyz", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the gateway at {base_url} was not ready within {timeout}s")


async def _wait_for_node(engine: Engine, namespace: str) -> None:
    async with Client(settings=Settings(url=engine.url, namespace=namespace)) as client:
        await client.wait_for_hosts("noop")
        await client.call("noop", i=0)  # scripts loaded, groups created


# --- wrk (optional) ------------------------------------------------------------------

WRK_REQUEST = f"""\
wrk.method = "POST"
wrk.path = "/v1/tasks?wait={WAIT_S}"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{{"capability": "noop", "args": {{"i": 1}}}}'
"""
WRK_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\nWRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "mean_us": %.1f, "status_errors": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, e.status, e.connect + e.read + e.write + e.timeout))
end
"""
WRK_SCRIPT = WRK_REQUEST + WRK_DONE


def run_wrk(phase: Phase) -> dict[str, Any]:
    """``http-wait`` driven by wrk (one thread, N connections): a warm-up run, then
    the measured one; CPU is read around it from here (wrk's own from rusage)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_SCRIPT)
        script.flush()

        def wrk(seconds: float) -> dict[str, Any]:
            argv = ["wrk", "-t1", f"-c{phase.concurrency}", f"-d{max(1, round(seconds))}s",
                    "--timeout", f"{WAIT_S + 30}s", "-s", script.name, phase.base_url]  # fmt: skip
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
            parsed: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            return parsed

        wrk(phase.warmup)
        before, children = _usage(phase), _children_cpu()
        stats = wrk(phase.seconds)
        after = _usage(phase)
    before["cpu"]["load"], after["cpu"]["load"] = 0.0, _children_cpu() - children
    return _wrk_summary(phase, stats, before, after)


def _children_cpu() -> float:
    """CPU seconds of this process's ended children (here: the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _wrk_summary(
    phase: Phase, stats: dict[str, Any], before: dict[str, Any], after: dict[str, Any]
) -> dict[str, Any]:
    n, seconds = stats["requests"], stats["duration_us"] / 1e6
    result: dict[str, Any] = {
        "path": "http-wait",
        "loader": "wrk",
        "concurrency": phase.concurrency,
        "seconds": round(seconds, 2),
        "tasks": n,
        "tasks_per_s": round(n / seconds, 1),
        **{f"{q}_ms": round(stats[f"{q}_us"] / 1000, 3) for q in ("p50", "p90", "p99")},
        "mean_ms": round(stats["mean_us"] / 1000, 3),
        "errors": {k: stats[k] for k in ("status_errors", "socket_errors") if stats[k]},
        **_cpu_report(before, after, after["at"] - before["at"], n),
    }
    if n:
        report = engine_report(before["engine"], after["engine"], n)
        result["engine"] = {k: v for k, v in report.items() if k != "shards"}
    return result


# --- the profile ---------------------------------------------------------------------


# Where a request's time goes, by the functions that mark each stage (inclusive
# time: a function and everything it called, counted once per stack).
STAGES = {
    "http_request": "RequestResponseCycle.run_asgi",  # uvicorn hands the request to the app
    "route_submit_task": "submit_task",
    "route_get_task": "get_task",
    "client_submit": "Client.submit",
    "client_result": "Client.result",
    "client_status": "Client.status",  # the record read that follows the wait
    "fastapi_solve_dependencies": "solve_dependencies",  # params, body, auth
    "auth": "_authenticate",
    "redis_execute_command": "Redis.execute_command",  # every engine call
    "redis_pool_get_connection": "BlockingConnectionPool.get_connection",
    "redis_pool_release": "BlockingConnectionPool.release",
    "response_send": "Response.__call__",
}


def _package(file_path: str | None) -> str | None:
    """Who owns a frame: a third-party package, a Shoal module group, or the stdlib
    (None for built-ins and frozen modules: they count for their caller)."""
    path = (file_path or "").replace("\\", "/")
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if "/shoal/" in path:
        parts = path.split("/shoal/", 1)[1].split("/")
        return "shoal." + parts[0].removesuffix(".py")
    if "/lib/python3" in path:
        return "stdlib." + path.split("/lib/python3", 1)[1].split("/", 2)[1].removesuffix(".py")
    return None


def _name(frame: Any) -> str:
    return f"{frame.class_name}.{frame.function}" if frame.class_name else str(frame.function)


def _serving_loop(root: Any) -> Any:
    """The frame of ``asyncio.Runner.run`` that served requests (the longest one)."""
    found, stack = None, [root]
    while stack:
        frame = stack.pop()
        if _name(frame) == "Runner.run" and (found is None or frame.time > found.time):
            found = frame
        stack += frame.children
    return found or root


def profile_breakdown(session: Any) -> dict[str, Any]:
    """The sampled wall time of the gateway's serving loop: in uvloop's C loop (idle,
    and the I/O it does in C), and in Python — by package and by function (self
    time) and by stage (``STAGES``, inclusive), as shares of the Python part."""
    loop = _serving_loop(session.root_frame())
    packages: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    wanted = {function: stage for stage, function in STAGES.items()}
    stack = [(c, "stdlib.asyncio", "", frozenset[str]()) for c in loop.children]
    while stack:
        frame, owner, caller, counted = stack.pop()
        own = max(0.0, frame.time - sum(c.time for c in frame.children))
        if frame.is_synthetic:  # a caller's own time, or (under the loop) the C loop's
            package, function = owner, caller or "(uvloop C loop: idle and I/O)"
        else:
            package = _package(frame.file_path) or owner
            function = f"{_name(frame)}  {frame.file_path_short}"
        packages[package if caller else "(uvloop C loop)"] += own
        functions[function] += own
        if (stage := wanted.get(_name(frame))) and stage not in counted:
            stages[stage] += frame.time
            counted = counted | {stage}
        stack += [(child, package, function, counted) for child in frame.children]
    in_c = packages.pop("(uvloop C loop)", 0.0)
    python = sum(packages.values())
    if not python:
        return {}

    def shares(counter: collections.Counter[str], top: int) -> dict[str, float]:
        return {k: round(v / python, 3) for k, v in counter.most_common(top) if v / python >= 0.002}

    functions.pop("(uvloop C loop: idle and I/O)", None)
    return {
        "serving_loop_s": round(loop.time, 2),
        "in_c_event_loop_s": round(in_c, 2),
        "in_python_s": round(python, 2),
        "python_share_by_package": shares(packages, 30),
        "python_share_by_stage": {k: round(stages[k] / python, 3) for k in STAGES if stages[k]},
        "python_share_by_function": shares(functions, 40),
    }


def render_profile(session_file: Path, out: Path) -> dict[str, Any]:
    """Write the profile as text (the breakdown, then pyinstrument's call tree with
    library frames grouped) and return the breakdown."""
    from pyinstrument.renderers import ConsoleRenderer
    from pyinstrument.session import Session

    session = Session.load(str(session_file))
    breakdown = profile_breakdown(session)
    tree = ConsoleRenderer(show_all=False, processor_options={"filter_threshold": 0.005})
    sections = [
        f"{title} (share of the serving loop's Python samples)\n\n"
        + "\n".join(f"{share:7.1%}  {name}" for name, share in breakdown.get(key, {}).items())
        for title, key in (("By package, self time", "python_share_by_package"),
                           ("By stage, inclusive", "python_share_by_stage"),
                           ("By function, self time", "python_share_by_function"))
    ]  # fmt: skip
    head = {k: v for k, v in breakdown.items() if not k.startswith("python_share")}
    out.write_text(
        f"{json.dumps(head)}\n\n" + "\n\n".join(sections)
        + "\n\nCall tree (pyinstrument; library frames grouped)\n" + tree.render(session)
    )  # fmt: skip
    return breakdown


# --- the run -------------------------------------------------------------------------


def run_once(
    engine: Engine, args: argparse.Namespace, pool: ProcessPoolExecutor, profile: Path | None
) -> dict[str, Any]:
    """A fresh namespace, node and gateway; every path at every concurrency in turn."""
    namespace = f"bench-gw-{time.monotonic_ns()}"
    load_avg = os.getloadavg()[0]  # anything else running on the machine shows here
    phases: list[dict[str, Any]] = []
    with (
        node_processes(engine.url, namespace, 1) as (node,),
        gateway_process(engine.url, namespace, profile) as (gateway, base_url),
    ):
        asyncio.run(_wait_for_node(engine, namespace))
        pids = {"gateway": gateway.pid, "node": node.pid}
        for concurrency in args.concurrency:
            for path in args.paths:
                phase = Phase(path, concurrency, args.seconds, args.warmup, engine, namespace,
                              base_url, pids)  # fmt: skip
                loader = "shoal.Client" if path == "direct" else "httpx"
                phases.append({"loader": loader} | pool.submit(run_phase, phase).result())
                if path == "http-wait" and args.loader == "wrk":
                    phases.append(run_wrk(phase))
    return {"load_avg_1m_before": round(load_avg, 2), "phases": phases, "ratios": ratios(phases)}


OURS = ("gateway", "node", "engine", "load")


def ratios(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each HTTP phase against the direct phase of the same concurrency: throughput
    and latency, and — less sensitive to what else runs on the machine — CPU per
    task: all of ours (load process, gateway, node, engine), and the gateway's
    against the Python client's own (the load process of the direct path)."""
    direct = {p["concurrency"]: p for p in phases if p["path"] == "direct"}
    out = []
    for phase in phases:
        base = direct.get(phase["concurrency"])
        if phase["path"] == "direct" or base is None or not base["tasks"] or not phase["tasks"]:
            continue
        cpu, base_cpu = phase["cpu_us_per_task"], base["cpu_us_per_task"]
        out.append({
            "path": phase["path"], "loader": phase["loader"], "concurrency": phase["concurrency"],
            "throughput_ratio": round(phase["tasks_per_s"] / base["tasks_per_s"], 3),
            "p50_ratio": round(phase["p50_ms"] / base["p50_ms"], 2),
            "p99_ratio": round(phase["p99_ms"] / base["p99_ms"], 2),
            "cpu_per_task_ratio": round(_ours(cpu) / _ours(base_cpu), 2),
            "gateway_vs_client_cpu": round(cpu["gateway"] / base_cpu["load"], 2),
            "gateway_cpu_pct": phase["cpu_pct"]["gateway"],
            "gateway_cpu_us_per_task": cpu["gateway"],
        })  # fmt: skip
    return out


def _ours(cpu_us_per_task: dict[str, float]) -> float:
    return sum(cpu_us_per_task.get(k, 0.0) for k in OURS)


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per path, loader and concurrency: the median over the runs (and the range of
    tasks/s), with the median ratios to direct."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = collections.defaultdict(list)
    for run in runs:
        ratio_of = {(r["path"], r["loader"], r["concurrency"]): r for r in run["ratios"]}
        for phase in run["phases"]:
            key = (phase["path"], phase["loader"], phase["concurrency"])
            groups[key].append(phase | ratio_of.get(key, {}))
    rows = []
    for (path, loader, concurrency), phases in groups.items():
        rates = [p["tasks_per_s"] for p in phases]
        row = {"path": path, "loader": loader, "concurrency": concurrency, "runs": len(phases),
               "tasks_per_s_range": [min(rates), max(rates)]}  # fmt: skip
        for name, get in _SUMMARIZED.items():
            values = [v for p in phases if (v := get(p)) is not None]
            if values:
                row[name] = round(statistics.median(values), 3)
        rows.append(row)
    return rows


_SUMMARIZED: dict[str, Callable[[dict[str, Any]], Any]] = {
    "tasks_per_s": lambda p: p["tasks_per_s"],
    "p50_ms": lambda p: p["p50_ms"],
    "p90_ms": lambda p: p["p90_ms"],
    "p99_ms": lambda p: p["p99_ms"],
    "throughput_ratio": lambda p: p.get("throughput_ratio"),
    "p50_ratio": lambda p: p.get("p50_ratio"),
    "cpu_per_task_ratio": lambda p: p.get("cpu_per_task_ratio"),
    "gateway_vs_client_cpu": lambda p: p.get("gateway_vs_client_cpu"),
    "gateway_cpu_pct": lambda p: p["cpu_pct"].get("gateway"),
    "gateway_cpu_us_per_task": lambda p: p["cpu_us_per_task"].get("gateway"),
    "node_cpu_pct": lambda p: p["cpu_pct"].get("node"),
    "node_us": lambda p: p["cpu_us_per_task"].get("node"),
    "engine_us": lambda p: p["cpu_us_per_task"].get("engine"),
    "engine_cpu_pct": lambda p: p["cpu_pct"].get("engine"),
    "load_cpu_pct": lambda p: p["cpu_pct"].get("load"),
    "load_cpu_us_per_task": lambda p: p["cpu_us_per_task"].get("load"),
    "cpu_us_per_task_ours": lambda p: _ours(p["cpu_us_per_task"]),
    "others_cpu_pct": lambda p: p["cpu_pct"].get("others"),
    "machine_busy_pct": lambda p: p["cpu_pct"].get("machine_busy"),
    "engine_commands_per_task": lambda p: p.get("engine", {}).get("commands_per_task"),
}


RATIO_FORMATS = (("throughput_ratio", ".2f"), ("p50_ratio", ".1f"), ("cpu_per_task_ratio", ".1f"),
                 ("gateway_vs_client_cpu", ".1f"))  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md from a saved run (``--table FILE``)."""
    rows = sorted(result["summary"], key=lambda r: (r["concurrency"], PATHS.index(r["path"])))
    speed = [
        "| path | loader | callers | tasks/s (range) | p50 ms | p90 ms | p99 ms "
        "| tasks/s vs direct | p50 vs direct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cpu = [
        "| path | loader | callers | gateway CPU % | CPU µs/task: gateway / load process / "
        "node / engine | CPU/task vs direct | gateway vs client CPU | others CPU % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        low, high = r["tasks_per_s_range"]
        ratio = ["-"] * 4
        if "throughput_ratio" in r:
            ratio = [f"{r[k]:{f}}x" for k, f in RATIO_FORMATS]
        head = f"| {r['path']} | {r['loader']} | {r['concurrency']} "
        speed.append(
            head + f"| {r['tasks_per_s']:,.0f} ({low:,.0f}-{high:,.0f}) | {r['p50_ms']:.2f} "
            f"| {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {ratio[0]} | {ratio[1]} |"
        )
        per_task = " / ".join(
            f"{r.get(k, 0):,.0f}" for k in ("gateway_cpu_us_per_task", "load_cpu_us_per_task")
        )
        cpu.append(
            head + f"| {r['gateway_cpu_pct']:.0f} | {per_task} / {r['node_us']:,.0f} / "
            f"{r['engine_us']:,.0f} | {ratio[2]} | {ratio[3]} | {r['others_cpu_pct']:.0f} |"
        )
    return "\n".join(speed) + "\n\n" + "\n".join(cpu) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64], metavar="N",
                        help="closed-loop callers; each value is a phase per path")  # fmt: skip
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--loader", choices=("httpx", "wrk"), default="httpx",
                        help="wrk: also drive http-wait with wrk (apt install wrk)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1, metavar="K", help="runs (one engine)")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="profile the gateway (pyinstrument) into FILE")  # fmt: skip
    parser.add_argument("--save", nargs="?", const=f"gateway-{time.strftime('%Y-%m-%d')}",
                        metavar="NAME", help="also write bench/results/NAME.json "
                        "(default NAME: gateway-<date>)")  # fmt: skip
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="print the Markdown tables of a saved run and exit")  # fmt: skip
    args = parser.parse_args()
    if args.loader == "wrk" and shutil.which("wrk") is None:
        parser.error("--loader wrk: no wrk on PATH (apt-get install -y wrk)")
    if args.profile_out and args.repeat != 1:
        parser.error("--profile-out profiles one run: leave out --repeat")
    if min(args.concurrency) < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--concurrency must be >= 1, --seconds > 0, --warmup >= 0")
    return args


def _versions() -> dict[str, str]:
    """The HTTP stack measured (and wrk's, when used)."""
    from importlib.metadata import version

    found = {name: version(name) for name in VERSIONED}
    if shutil.which("wrk"):
        done = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        found["wrk"] = (done.stdout + done.stderr).split(" [", 1)[0].removeprefix("wrk ")
    return found


VERSIONED = ("fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "redis",
             "msgspec", "httpx")  # fmt: skip


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seconds": args.seconds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "loader": args.loader,
        "wait_s": WAIT_S,
        "gateway": "one `shoal gateway` process (uvicorn; uvloop and httptools when "
        "installed), loopback, no API keys, --key-rate 0, --no-dashboard, log warning",
        "gateway_under_profiler": bool(args.profile_out),
        "versions": _versions(),
        "note": NOTE,
    }


def main() -> None:
    args = parse_args()
    if args.table:
        sys.stdout.write(markdown(json.loads(args.table.read_text())))
        return
    runs = []
    with (
        private_topology("standalone") as engine,
        tempfile.TemporaryDirectory(prefix="shoal-bench-gw-") as tmp,
        ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool,
    ):
        session = Path(tmp) / "gateway.pyisession" if args.profile_out else None
        for _ in range(args.repeat):
            runs.append(run_once(engine, args, pool, session))
        profile = render_profile(session, args.profile_out) if session else None
    result: dict[str, Any] = {
        "benchmark": "gateway",
        "machine": machine(),
        "code": code_version(),
        "engine": {"kind": engine.kind, **engine.topology},
        "setup": _setup(args),
        "summary": summary(runs),
        "runs": runs,
    }
    if profile is not None:
        result["profile"] = {"file": str(args.profile_out), **profile}
    if args.save:
        save(args.save, result)
    emit(result)


if __name__ == "__main__":
    main()
