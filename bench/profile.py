"""Where the time goes: one throughput run (N no-op tasks, one node process) with
the node under pyinstrument, the client timed, and the engine's own CPU time and
per-command statistics. Prints JSON; writes the node's profile as text.

    python -m bench.profile [-n 20000] [--profile-out node-profile.txt]
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

from bench.common import REPO, emit, machine, private_engine
from shoal import Client


def _engine_cpu(conn: redis.Redis) -> float:
    cpu = conn.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def _run(url: str, namespace: str, n: int) -> dict[str, Any]:
    conn = redis.Redis.from_url(url)
    async with Client(url, namespace=namespace) as client:
        await client.wait_for_hosts("noop")
        await client.call("noop", i=0)
        conn.config_resetstat()
        cpu_before, wall = _engine_cpu(conn), time.perf_counter()
        process_before = time.process_time()
        handles = await client.submit_many("noop", [{"i": i} for i in range(n)])
        submitted = time.perf_counter()
        await asyncio.gather(*(h.result() for h in handles))
        done = time.perf_counter()
        client_cpu = time.process_time() - process_before
        engine_cpu = _engine_cpu(conn) - cpu_before
    stats = conn.info("commandstats")
    top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:8]
    return {
        "n": n,
        "tasks_per_s": round(n / (done - wall)),
        "submit_s": round(submitted - wall, 3),
        "client_cpu_us_per_task": round(client_cpu / n * 1e6, 1),
        "engine_cpu_us_per_task": round(engine_cpu / n * 1e6, 1),
        "engine_memory_bytes_per_finished_task": round(conn.info("memory")["used_memory"] / n),
        "engine_commands": {
            name.removeprefix("cmdstat_"): {
                "calls": v["calls"],
                "usec_per_call": v["usec_per_call"],
            }
            for name, v in top
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=20_000)
    parser.add_argument("--profile-out", default="node-profile.txt")
    args = parser.parse_args()
    with private_engine() as url:
        env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": "profile"}
        node = subprocess.Popen(
            [sys.executable, "-m", "pyinstrument", "-i", "0.0005", "-r", "text", "-o",
             os.path.abspath(args.profile_out), "-m", "shoal.cli", "node", "--app",
             "bench.noop_app", "--concurrency", "256", "--log-level", "warning"],
            cwd=REPO, env=env,
        )  # fmt: skip
        try:
            result = asyncio.run(_run(url, "profile", args.n))
        finally:
            node.send_signal(signal.SIGTERM)
            node.wait(60)
    emit({"benchmark": "profile", "machine": machine(), "node_profile": args.profile_out, **result})


if __name__ == "__main__":
    main()
