"""Throughput: N no-op tasks submitted with submit_many, drained by 1 and 2 node
processes; tasks/s end to end (first submit to last result), and the peers' figures
from the same run on the same engine.

    python -m bench.throughput [-n 20000] [--nodes 1 2] [--peers celery dramatiq arq taskiq]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.common import emit, machine, node_processes, private_engine
from shoal import Client


async def _measure(url: str, namespace: str, n: int) -> dict[str, Any]:
    async with Client(url, namespace=namespace) as client:
        await client.wait_for_hosts("noop")
        await client.call("noop", i=0)  # warm: scripts loaded, groups created
        start = time.perf_counter()
        handles = await client.submit_many("noop", [{"i": i} for i in range(n)])
        submitted = time.perf_counter()
        results = await asyncio.gather(*(h.result() for h in handles))
        done = time.perf_counter()
    assert results == list(range(n)), "a result is missing or wrong"
    return {
        "n": n,
        "submit_s": round(submitted - start, 3),
        "seconds": round(done - start, 3),
        "tasks_per_s": round(n / (done - start)),
    }


def run_shoal(url: str, n: int, nodes: int) -> dict[str, Any]:
    namespace = f"bench-tp-{nodes}-{time.monotonic_ns()}"
    with node_processes(url, namespace, nodes):
        result = asyncio.run(_measure(url, namespace, n))
    return {"system": "shoal", "workload": "throughput", "nodes": nodes, **result}


def run_peers(url: str, n: int, nodes: int, peers: list[str]) -> list[dict[str, Any]]:
    from bench.peers.harness import run_peer

    results = []
    for peer in peers:
        try:
            results.append(run_peer(peer, url, "throughput", n, workers=nodes))
        except Exception as exc:
            results.append(
                {"peer": peer, "workload": "throughput", "workers": nodes, "error": str(exc)}
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20_000, help="tasks per run")
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--peers", nargs="*", default=["celery", "dramatiq", "arq", "taskiq"])
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with private_engine() as url:
        for nodes in args.nodes:
            runs.append(run_shoal(url, args.n, nodes))
            runs += run_peers(url, args.n, nodes, args.peers)
    emit({"benchmark": "throughput", "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
