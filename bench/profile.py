"""Where the time goes: one throughput run (N no-op tasks, one node process) with
the node under pyinstrument, the client timed, and the engine's own CPU time and
per-command statistics (summed over the primaries of a Cluster), and the growth of
the engine's used_memory per task (the finished records kept for the retention
period). Prints JSON; writes the node's profile as text.

    python -m bench.profile [-n 20000] [--profile-out node-profile.txt]
    python -m bench.profile --engine cluster --profile-out node-profile-cluster.txt
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import redis

from bench.common import (
    REPO,
    Engine,
    add_engine_arguments,
    check_engine_arguments,
    code_version,
    emit,
    engine_report,
    engine_snapshot,
    machine,
    private_topology,
    process_cpu,
    save,
    shoal_env,
)
from shoal import Client, Settings


def _used_memory(engine: Engine) -> int:
    total = 0
    for url in engine.primaries:
        with redis.Redis.from_url(url) as conn:
            total += int(conn.info("memory")["used_memory"])
    return total


async def _run(
    engine: Engine, namespace: str, n: int, node: subprocess.Popen[bytes], ack_replicas: int
) -> dict[str, Any]:
    settings = Settings(url=engine.url, namespace=namespace, ack_replicas=ack_replicas)
    async with Client(settings=settings) as client:
        await client.wait_for_hosts("noop")
        await client.call("noop", i=0)
        memory = await asyncio.to_thread(_used_memory, engine)
        before = await asyncio.to_thread(engine_snapshot, engine)
        wall, node_cpu = time.perf_counter(), process_cpu([node])
        process_before = time.process_time()
        handles = await client.submit_many("noop", [{"i": i} for i in range(n)])
        submitted = time.perf_counter()
        await asyncio.gather(*(h.result() for h in handles))
        done = time.perf_counter()
        client_cpu = time.process_time() - process_before
        node_cpu = process_cpu([node]) - node_cpu
        after = await asyncio.to_thread(engine_snapshot, engine)
    report = engine_report(before, after, n)
    return {
        "n": n,
        "tasks_per_s": round(n / (done - wall)),
        "submit_s": round(submitted - wall, 3),
        "client_cpu_us_per_task": round(client_cpu / n * 1e6, 1),
        "node_cpu_us_per_task_under_profiler": round(node_cpu / n * 1e6, 1),
        "engine_cpu_us_per_task": report.pop("engine_cpu_us_per_task"),
        "engine_memory_bytes_per_finished_task": round((_used_memory(engine) - memory) / n),
        "engine": report,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--profile-out", default="node-profile.txt")
    add_engine_arguments(parser, several=False)
    args = parser.parse_args()
    check_engine_arguments(parser, args)
    with private_topology(args.engine, args.cluster_replicas, args.aof) as engine:
        namespace = f"profile-{time.monotonic_ns()}"
        env = {**os.environ, "SHOAL_REDIS_URL": engine.url, "SHOAL_NAMESPACE": namespace}
        node = subprocess.Popen(
            [sys.executable, "-m", "pyinstrument", "-i", "0.0005", "-r", "text", "-o",
             os.path.abspath(args.profile_out), "-m", "shoal.cli", "node", "--app",
             "bench.noop_app", "--concurrency", "256", "--log-level", "warning"],
            cwd=REPO, env={**env, **shoal_env(args.ack_replicas)},
        )  # fmt: skip
        try:
            result = asyncio.run(_run(engine, namespace, args.n, node, args.ack_replicas))
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
    out = {
        "benchmark": "profile",
        "machine": machine(),
        "code": code_version(),
        "engine_kind": engine.kind,
        "ack_replicas": args.ack_replicas,
        "node_profile": args.profile_out,
        **result,
    }
    if args.save:
        save(args.save, out)
    emit(out)


if __name__ == "__main__":
    main()
