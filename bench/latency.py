"""Latency: sequential round trips (submit a no-op task, wait for its result) against
one node process; p50/p90/p99 in ms, with the peers' figures from the same run.

    python -m bench.latency [-n 1000] [--peers celery dramatiq arq taskiq]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from bench.common import emit, machine, node_processes, percentile, private_engine
from shoal import Client

WARMUP = 50


async def _measure(url: str, namespace: str, n: int) -> dict[str, Any]:
    async with Client(url, namespace=namespace) as client:
        await client.wait_for_hosts("noop")
        for i in range(WARMUP):
            await client.call("noop", i=i)
        samples = []
        for i in range(n):
            start = time.perf_counter()
            await client.call("noop", i=i)
            samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return {
        "n": n,
        "p50_ms": round(percentile(samples, 0.50), 3),
        "p90_ms": round(percentile(samples, 0.90), 3),
        "p99_ms": round(percentile(samples, 0.99), 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


def run_shoal(url: str, n: int) -> dict[str, Any]:
    namespace = f"bench-lat-{time.monotonic_ns()}"
    with node_processes(url, namespace, 1):
        result = asyncio.run(_measure(url, namespace, n))
    return {"system": "shoal", "workload": "latency", **result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=1000, help="round trips")
    parser.add_argument("--peers", nargs="*", default=["celery", "dramatiq", "arq", "taskiq"])
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with private_engine() as url:
        runs.append(run_shoal(url, args.n))
        for peer in args.peers:
            from bench.peers.harness import run_peer

            try:
                runs.append(run_peer(peer, url, "latency", args.n))
            except Exception as exc:
                runs.append({"peer": peer, "workload": "latency", "error": str(exc)})
    emit({"benchmark": "latency", "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
