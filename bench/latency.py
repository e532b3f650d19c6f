"""Latency: sequential round trips (submit a no-op task, wait for its result) against
one node process; p50/p90/p99 in ms, with the peers' figures from the same run.

    python -m bench.latency [-n 1000] [--peers celery dramatiq arq taskiq]
    python -m bench.latency --engine sentinel --ack-replicas 0 1 [--repeat K] [--save NAME]

``--engine``, ``--ack-replicas`` and the rest as in bench.throughput (peers:
standalone only). Each run also reports the engine's commands and CPU per round
trip (with ack_replicas, two WAITs: the submit's and the result's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from bench.common import (
    Engine,
    add_engine_arguments,
    check_engine_arguments,
    engine_report,
    engine_snapshot,
    node_processes,
    percentile,
    private_topology,
    report,
    shoal_env,
)
from shoal import Client, Settings
from shoal.benchmark import round_trips

WARMUP = 50


async def _measure(engine: Engine, namespace: str, n: int, ack_replicas: int) -> dict[str, Any]:
    settings = Settings(url=engine.url, namespace=namespace, ack_replicas=ack_replicas)
    async with Client(settings=settings) as client:
        await client.wait_for_hosts("noop")
        await round_trips(client, WARMUP)
        before = await asyncio.to_thread(engine_snapshot, engine)
        samples = await round_trips(client, n)
        after = await asyncio.to_thread(engine_snapshot, engine)
    samples.sort()
    return {
        "n": n,
        "p50_ms": round(percentile(samples, 0.50), 3),
        "p90_ms": round(percentile(samples, 0.90), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
        # per round trip: the engine's commands (WAITs: the submit's and the result's)
        "engine": engine_report(before, after, n),
    }


def run_shoal(engine: Engine, n: int, ack_replicas: int = 0) -> dict[str, Any]:
    namespace = f"bench-lat-{time.monotonic_ns()}"
    load = os.getloadavg()[0]
    with node_processes(engine.url, namespace, 1, env=shoal_env(ack_replicas)):
        result = asyncio.run(_measure(engine, namespace, n, ack_replicas))
    return {
        "system": "shoal",
        "workload": "latency",
        "engine_kind": engine.kind,
        "ack_replicas": ack_replicas,
        "load_avg_1m_before": round(load, 2),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1000, help="round trips")
    parser.add_argument("--peers", nargs="*", default=["celery", "dramatiq", "arq", "taskiq"])
    add_engine_arguments(parser)
    args = parser.parse_args()
    check_engine_arguments(parser, args)
    peers = args.peers if args.engine == "standalone" else []
    runs: list[dict[str, Any]] = []
    with private_topology(args.engine, args.cluster_replicas, args.aof) as engine:
        for _ in range(args.repeat):
            runs += [run_shoal(engine, args.n, ack) for ack in args.ack_replicas]
        for peer in peers:
            from bench.peers.harness import run_peer

            try:
                runs.append(run_peer(peer, engine.url, "latency", args.n))
            except Exception as exc:
                runs.append({"peer": peer, "workload": "latency", "error": str(exc)})
    report("latency", engine, args, runs, peers)


if __name__ == "__main__":
    main()
