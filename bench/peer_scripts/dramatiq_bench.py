"""Dramatiq peer benchmark (runs in the dramatiq venv; also the worker's task module).

Broker: ``RedisBroker`` with ``namespace`` = the run prefix. Results: ``Results``
middleware with ``RedisBackend`` (namespace-prefixed keys so cleanup can find them).

Throughput: n ``count`` messages sent in a loop (dramatiq has no batch publish for
Redis; ``group().run()`` is the same loop), then ``workers`` x ``dramatiq --processes 1
--threads 8`` (dramatiq's default thread count, and its default prefetch of threads x 2).
Completions are counted with an INCR inside the actor.

Latency: one worker; ``noop.send().get_result(block=True)`` (BRPOPLPUSH on the result
key, no polling). The worker side *does* poll: an idle consumer backs off exponentially
(5 ms minimum, capped at ``dramatiq_worker_timeout``, default 1000 ms); the cap is set
to the run's poll interval so that an idle worker re-checks as often as arq/taskiq do.
"""

from __future__ import annotations

import sys
from typing import Any

import _common
import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

CFG = _common.load_config("dramatiq")
QUEUE = "bench"
# dramatiq's default; 1 and 2 threads were measured slower for no-op tasks on this
# 2-core box because a process spends much of its time in consumer/worker handoffs.
THREADS = 8
# Caps the idle consumer's back-off sleep; integer milliseconds, at least 1.
WORKER_TIMEOUT_MS = max(1, round(CFG.poll_s * 1000))

broker = RedisBroker(url=CFG.redis_url, namespace=CFG.prefix + "dq")
broker.add_middleware(
    Results(
        backend=RedisBackend(
            url=CFG.redis_url, namespace=CFG.prefix + "res", use_namespace_prefix_keys=True
        )
    )
)
dramatiq.set_broker(broker)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """One counter connection per worker process, made lazily after the fork."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(CFG.redis_url)
    return _client


@dramatiq.actor(queue_name=QUEUE, max_retries=0, store_results=False)
def count() -> None:
    _common.record_completion(_redis(), CFG)


@dramatiq.actor(queue_name=QUEUE, max_retries=0, store_results=True)
def noop() -> int:
    return 1


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [
            _common.venv_bin("dramatiq"), "dramatiq_bench",
            "--processes", "1", "--threads", str(THREADS), "--queues", QUEUE,
            "--path", str(_common.SCRIPTS_DIR),
        ]
        for _ in range(workers)
    ]  # fmt: skip


def enqueue_all(dl: _common.Deadline) -> None:
    for i in range(CFG.n):
        if i % _common.DEADLINE_CHECK_EVERY == 0:
            dl.check()
        count.send()


def round_trip(timeout: float) -> None:
    message = noop.send()
    if message.get_result(block=True, timeout=int(timeout * 1000)) != 1:
        raise _common.BenchError("unexpected result")


def body(group: _common.WorkerGroup, dl: _common.Deadline) -> dict[str, Any]:
    env = {"dramatiq_worker_timeout": str(WORKER_TIMEOUT_MS)}
    if CFG.workload == "throughput":
        cmds = worker_cmds(CFG.workers)
        return _common.run_throughput(CFG, group, dl, enqueue_all, cmds, env)
    group.start(worker_cmds(1), env=env)
    return _common.latency_result(CFG, _common.measure_round_trips(CFG, dl, round_trip))


SETTINGS = {
    "broker": "RedisBroker (Lua dispatch, ack via Lua)",
    "result_backend": "RedisBackend (BRPOPLPUSH wait)",
    "worker_processes": CFG.workers if CFG.workload == "throughput" else 1,
    "threads_per_process": THREADS,
    "queue_prefetch": f"default ({THREADS * 2} = threads x 2)",
    "worker_timeout_ms": WORKER_TIMEOUT_MS,
    "idle_backoff": "5 ms minimum x 2^misses with jitter, capped at worker_timeout_ms",
    "enqueue": "actor.send loop",
    "completion_count": "INCR in task; first/last completion stamped by the task",
    "get_result": "block=True",
    "max_retries": 0,
}

if __name__ == "__main__":
    sys.exit(_common.run_driver(CFG, body, SETTINGS, ["dramatiq", "redis", "hiredis"]))
