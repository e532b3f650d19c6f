"""Failover: kill -9 a node holding 100 in-flight tasks (200 ms each), start a
replacement at once, and measure the time from the kill until the last task
completed, plus duplicates and losses. The peers run the same scenario with their
default settings in the same run.

    python -m bench.failover [--peers celery dramatiq arq taskiq] [--recovery-timeout 120]

Two Shoal scenarios: the replacement has a new name (the dead node is found by its
silent heartbeat, `dead_after` = 3 s), and the replacement reuses the dead node's
name, as a supervisor restarting it would (it reclaims its predecessor's work at
start-up).
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

from bench.common import REPO, emit, machine, private_engine
from shoal import Client

TASKS = 100
TASK_S = 0.2


def _node(url: str, namespace: str, name: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": namespace}
    return subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "node", "--app", "bench.noop_app", "--name", name,
         "--concurrency", "200", "--log-level", "error"],
        cwd=REPO, env=env, start_new_session=True,
    )  # fmt: skip


async def _all_running(client: Client, ids: list[str]) -> None:
    async with asyncio.timeout(30):
        while True:
            pipe = client.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hget(client.keys.task(task_id), "status")
            if all(s == b"running" for s in await pipe.execute()):
                return
            await asyncio.sleep(0.005)


async def _scenario(url: str, same_name: bool, timeout: float) -> dict[str, Any]:
    namespace = f"bench-failover-{time.monotonic_ns()}"
    victim = _node(url, namespace, "victim")
    replacement: subprocess.Popen[bytes] | None = None
    try:
        async with Client(url, namespace=namespace) as client:
            await client.wait_for_hosts("nap")
            handles = await client.submit_many(
                "nap", [{"seconds": TASK_S, "i": i} for i in range(TASKS)]
            )
            await _all_running(client, [h.id for h in handles])
            os.killpg(victim.pid, signal.SIGKILL)
            killed = time.perf_counter()
            replacement = _node(url, namespace, "victim" if same_name else "replacement")
            try:
                async with asyncio.timeout(timeout):
                    results = await asyncio.gather(*(h.result() for h in handles))
            except TimeoutError:
                return {"recovered": False, "waited_s": timeout}
            seconds = time.perf_counter() - killed
            pipe = client.redis.pipeline(transaction=False)
            for h in handles:
                pipe.hmget(client.keys.task(h.id), "token", "dups")
            records = await pipe.execute()
        return {
            "recovered": sorted(results) == list(range(TASKS)),
            "seconds_to_recover": round(seconds, 3),
            "completed_distinct": len(set(results)),
            "lost": TASKS - len(set(results)),
            "reruns": sum(int(token) - 1 for token, _ in records),
            "duplicates": sum(int(dups or 0) for _, dups in records),
        }
    finally:
        for proc in (victim, replacement):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
            elif proc is not None:
                proc.wait()


def run_shoal(url: str, timeout: float) -> list[dict[str, Any]]:
    runs = []
    for same_name in (False, True):
        result = asyncio.run(_scenario(url, same_name, timeout))
        scenario = "replacement reuses the name" if same_name else "new node (heartbeat timeout)"
        runs.append({
            "system": "shoal", "workload": "failover", "scenario": scenario, "n": TASKS,
            "task_ms": int(TASK_S * 1000),
            "settings": {"heartbeat_interval_s": 1.0, "dead_after_s": 3.0, "concurrency": 200},
            **result,
        })  # fmt: skip
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peers", nargs="*", default=["celery", "dramatiq", "arq", "taskiq"])
    parser.add_argument("--recovery-timeout", type=float, default=120.0)
    args = parser.parse_args()
    runs: list[dict[str, Any]] = []
    with private_engine() as url:
        runs += run_shoal(url, args.recovery_timeout)
        for peer in args.peers:
            from bench.peers.harness import run_peer

            try:
                runs.append(
                    run_peer(peer, url, "failover", TASKS, recovery_timeout=args.recovery_timeout)
                )
            except Exception as exc:
                runs.append({"peer": peer, "workload": "failover", "error": str(exc)})
    emit({"benchmark": "failover", "machine": machine(), "runs": runs})


if __name__ == "__main__":
    main()
