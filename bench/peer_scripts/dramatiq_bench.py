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

Failover (``_common.run_failover``): ONE ``dramatiq --processes 1 --threads n`` (100)
worker, so every task is in flight at once (dramatiq's defaults would be one process
per core x 8 threads). The broker keeps its defaults: a dead worker's fetched messages
go back to the queue only during "maintenance", which a dispatch call runs with chance
``maintenance_chance``/1e6 (1000 -> 0.1%) once the worker's heartbeat is older than
``heartbeat_timeout`` (60 s). The idle back-off cap (``dramatiq_worker_timeout``) is
*not* lowered here: the idle consumer's fetches are what roll that 0.1% die, so the cap
is not a pure poll interval but sets the pace of dead-worker recovery (default 1000 ms;
set the environment variable yourself to see what a faster poll does).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import _common
import dramatiq
import dramatiq.worker
import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
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


@dramatiq.actor(queue_name=QUEUE)  # retries, time limit etc.: dramatiq's defaults
def failover(i: int) -> None:
    _common.failover_task(_redis(), CFG, i)


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [
            _common.venv_bin("dramatiq"), "dramatiq_bench",
            "--processes", "1", "--threads", str(THREADS), "--queues", QUEUE,
            "--path", str(_common.SCRIPTS_DIR),
        ]
        for _ in range(workers)
    ]  # fmt: skip


def failover_worker_cmd() -> list[str]:
    return [
        _common.venv_bin("dramatiq"), "dramatiq_bench",
        "--processes", "1", "--threads", str(CFG.concurrency), "--queues", QUEUE,
        "--path", str(_common.SCRIPTS_DIR),
    ]  # fmt: skip


def failover_probe(client: redis.Redis) -> dict[str, Any]:
    """dispatch.lua's keys: queue list, message hash, per-worker ack sets, heartbeats."""
    ns = broker.namespace
    ack_sets = {
        key.decode(): client.scard(key)
        for key in client.scan_iter(match=f"{ns}:__acks__.*", count=1000)
    }
    now_ms = time.time() * 1000
    beats = client.zrange(f"{ns}:__heartbeats__", 0, -1, withscores=True)
    return {
        "queued": client.llen(f"{ns}:{QUEUE}"),
        "unacked_messages": client.hlen(f"{ns}:{QUEUE}.msgs"),
        "ack_sets": {key.rsplit("__acks__.", 1)[1]: n for key, n in ack_sets.items() if n},
        "heartbeat_age_s": {w.decode(): round((now_ms - t) / 1000, 1) for w, t in beats},
    }


def enqueue_failover(dl: _common.Deadline) -> None:
    for i in range(CFG.n):
        failover.send(i)
    dl.check()


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
    if CFG.workload == "failover":  # no env: the worker keeps its default idle back-off
        return _common.run_failover(
            CFG, group, dl, enqueue_failover, failover_worker_cmd(), probe=failover_probe
        )
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


def failover_settings() -> dict[str, Any]:
    """The defaults that decide what a crash does, read from the installed dramatiq.

    The driver inherits the same environment as its workers, so ``WORKER_TIMEOUT`` here
    is what the workers use (1000 unless ``dramatiq_worker_timeout`` is set outside).
    """
    timeout_ms = dramatiq.worker.WORKER_TIMEOUT
    chance = broker.maintenance_chance / MAINTENANCE_SCALE
    return {
        "worker_processes": 1,
        "threads": CFG.concurrency,
        "queue_prefetch": f"default: threads x 2 = {CFG.concurrency * 2}",
        "heartbeat_timeout_ms": broker.heartbeat_timeout,
        "maintenance_chance": f"{broker.maintenance_chance}/{MAINTENANCE_SCALE} = {chance:.4%}",
        "worker_timeout_ms": timeout_ms,
        "worker_timeout_env": os.environ.get("dramatiq_worker_timeout"),  # noqa: SIM112
        "worker_timeout_source": (
            "dramatiq/worker.py WORKER_TIMEOUT = env dramatiq_worker_timeout or 1000;"
            " not lowered for failover (it paces the maintenance dice)"
        ),
        "ack_point": "after the actor returns (dispatch.lua 'ack')",
        "redelivery": (
            "dramatiq/brokers/redis.py RedisBroker._should_do_maintenance() +"
            " brokers/redis/dispatch.lua: a dispatch call on the queue (an idle consumer's"
            " fetch, at most one per back-off sleep of 500-1000 ms at the default cap)"
            " runs maintenance with chance maintenance_chance/1e6; maintenance re-queues"
            " the __acks__ set of every worker whose heartbeat is older than"
            " heartbeat_timeout"
        ),
        "expected_recovery": (
            f"heartbeat_timeout ({broker.heartbeat_timeout / 1000:.0f}s) + a geometric wait"
            f" with mean ~{1 / chance:.0f} queue fetches"
        ),
        "max_retries": "default (20)",
    }


if __name__ == "__main__":
    failover_mode = CFG.workload == "failover"
    sys.exit(
        _common.run_driver(
            CFG,
            body,
            failover_settings() if failover_mode else SETTINGS,
            ["dramatiq", "redis", "hiredis"],
            _common.FAILOVER_STOP_GRACE_S if failover_mode else _common.WORKER_STOP_GRACE_S,
        )
    )
