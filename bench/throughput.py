"""Throughput: N no-op tasks submitted with submit_many, drained by 1 and 2 node
processes; tasks/s end to end (first submit to last result), and the peers' figures
from the same run on the same engine.

    python -m bench.throughput [-n 20000] [--nodes 1 2] [--peers celery dramatiq arq taskiq]
    python -m bench.throughput --engine cluster|sentinel [--ack-replicas N [N ...]]
        [--cluster-replicas N] [--no-aof] [--repeat K] [--save NAME]

``--engine`` picks the engine: the embedded standalone server (default), a local
Cluster of 3 primaries, or a local Sentinel group (1 primary, 2 replicas, 3
Sentinels); all on this machine, so a Cluster shows its overhead and how the work
spreads over the shards, not how it scales. Peers run on standalone only.
``--ack-replicas 0 1`` runs each setting in turn on the same engine. Each run also
reports, from the engine's INFO before and after it, the commands and engine CPU per
task (summed over the primaries), each primary's share, and the CPU time of the
node processes and of the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import time
from typing import Any

from bench.common import (
    Engine,
    add_engine_arguments,
    check_engine_arguments,
    engine_report,
    engine_snapshot,
    node_processes,
    private_topology,
    process_cpu,
    report,
    shard_of,
    shoal_env,
    slot_owners,
)
from shoal import Client, Settings
from shoal.benchmark import drain


async def _measure(
    engine: Engine, namespace: str, n: int, procs: list[Any], ack_replicas: int
) -> dict[str, Any]:
    settings = Settings(url=engine.url, namespace=namespace, ack_replicas=ack_replicas)
    async with Client(settings=settings) as client:
        await client.wait_for_hosts("noop")
        await client.call("noop", i=0)  # warm: scripts loaded, groups created
        before = await asyncio.to_thread(engine_snapshot, engine)
        nodes_cpu, client_cpu = process_cpu(procs), time.process_time()
        drained = await drain(client, n)
        client_cpu, nodes_cpu = time.process_time() - client_cpu, process_cpu(procs) - nodes_cpu
        after = await asyncio.to_thread(engine_snapshot, engine)
        groups = (await client.cluster()).key_groups
        task_keys = [client.keys.task(h.id) for h in drained.handles]
    assert drained.results == list(range(n)), "a result is missing or wrong"
    spread = _spread(engine, task_keys, [g.shard for g in groups])
    return {
        "n": n,
        "submit_s": round(drained.submit_s, 3),
        "seconds": round(drained.seconds, 3),
        "tasks_per_s": round(drained.tasks_per_s),
        "client_cpu_us_per_task": round(client_cpu / n * 1e6, 1),
        "nodes_cpu_us_per_task": round(nodes_cpu / n * 1e6, 1),
        "key_groups": {"count": len(groups), "per_shard": spread["groups"]},
        "engine": engine_report(before, after, n, spread["tasks"]),
    }


def _spread(engine: Engine, task_keys: list[str], group_shards: list[str]) -> dict[str, Any]:
    """Tasks (by their record's key slot) and key groups per primary."""
    owners = slot_owners(engine)
    if not owners:  # one primary holds everything
        (address,) = engine.primary_addresses
        return {"tasks": {address: len(task_keys)}, "groups": {address: len(group_shards)}}
    tasks = collections.Counter(shard_of(key, owners) for key in task_keys)
    return {"tasks": dict(tasks), "groups": dict(collections.Counter(group_shards))}


def run_shoal(engine: Engine, n: int, nodes: int, ack_replicas: int = 0) -> dict[str, Any]:
    namespace = f"bench-tp-{nodes}-{time.monotonic_ns()}"
    load = os.getloadavg()[0]  # anything else running on the machine shows here
    env = shoal_env(ack_replicas)
    with node_processes(engine.url, namespace, nodes, env=env) as procs:
        result = asyncio.run(_measure(engine, namespace, n, procs, ack_replicas))
    return {
        "system": "shoal",
        "workload": "throughput",
        "engine_kind": engine.kind,
        "ack_replicas": ack_replicas,
        "nodes": nodes,
        "load_avg_1m_before": round(load, 2),
        **result,
    }


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
    add_engine_arguments(parser)
    args = parser.parse_args()
    check_engine_arguments(parser, args)
    peers = args.peers if args.engine == "standalone" else []
    runs: list[dict[str, Any]] = []
    with private_topology(args.engine, args.cluster_replicas, args.aof) as engine:
        for nodes in args.nodes:
            for _ in range(args.repeat):
                runs += [run_shoal(engine, args.n, nodes, ack) for ack in args.ack_replicas]
            runs += run_peers(engine.url, args.n, nodes, peers)
    report("throughput", engine, args, runs, peers)


if __name__ == "__main__":
    main()
