"""Celery peer benchmark (runs in the celery venv; also the worker's task module).

Broker and result backend: Redis (kombu's redis transport / celery's redis backend),
with ``global_keyprefix`` so every key of the run carries the run tag.

Throughput: n ``count`` tasks published with ``apply_async`` in a loop on one producer
(celery's ``group`` also publishes one message per task, plus GroupResult bookkeeping);
then ``workers`` x ``celery worker --pool solo --concurrency 1``. The solo pool runs
tasks in the worker's main process: for no-op tasks the prefork pool only adds a pipe
hop per task (prefork -c 2 measured slower than solo here), and "one worker = one
executing process" matches the other peers. Completions are counted with an INCR inside
the task (results ignored). Workers consume with BRPOP, so there is no poll to tune.

Latency: one solo worker; ``noop.delay().get()``. Celery's redis result backend waits
on pub/sub, so ``get(interval=...)`` is effectively unused; it is set anyway.
"""

from __future__ import annotations

import sys
from typing import Any

import _common
import redis
from celery import Celery

CFG = _common.load_config("celery")
QUEUE = "bench"  # kombu prefixes it (and its binding keys) with global_keyprefix
# Prefetch per worker = 32 x concurrency 1. 4 (default), 32 and 128 measured within
# noise of each other here; 32 keeps the worker from going back to Redis per task.
PREFETCH_MULTIPLIER = 32

app = Celery("shoal_bench", broker=CFG.redis_url, backend=CFG.redis_url)
app.conf.update(
    broker_transport_options={"global_keyprefix": CFG.prefix},
    result_backend_transport_options={"global_keyprefix": CFG.prefix},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    worker_enable_remote_control=False,  # no pidbox fan-out traffic on the engine
    worker_send_task_events=False,
    task_send_sent_event=False,
    result_expires=600,
)

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    """One counter connection per worker process, made lazily after the fork."""
    global _client
    if _client is None:
        _client = redis.Redis.from_url(CFG.redis_url)
    return _client


@app.task(name="bench.count", ignore_result=True)
def count() -> None:
    _common.record_completion(_redis(), CFG)


@app.task(name="bench.noop")
def noop() -> int:
    return 1


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [
            _common.venv_bin("celery"), "-A", "celery_bench", "worker",
            "--pool", "solo", "--concurrency", "1", "--loglevel", "WARNING", "-Q", QUEUE,
            "-n", f"bench{i}-{CFG.tag}@%h",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]
        for i in range(workers)
    ]  # fmt: skip


def enqueue_all(dl: _common.Deadline) -> None:
    with app.producer_or_acquire() as producer:
        for i in range(CFG.n):
            if i % _common.DEADLINE_CHECK_EVERY == 0:
                dl.check()
            count.apply_async(producer=producer)


def round_trip(timeout: float) -> None:
    # No forget(): it would add a DEL to the timed path; cleanup deletes result keys.
    if noop.delay().get(timeout=timeout, interval=CFG.poll_s) != 1:
        raise _common.BenchError("unexpected result")


def body(group: _common.WorkerGroup, dl: _common.Deadline) -> dict[str, Any]:
    if CFG.workload == "throughput":
        return _common.run_throughput(CFG, group, dl, enqueue_all, worker_cmds(CFG.workers))
    group.start(worker_cmds(1))
    return _common.latency_result(CFG, _common.measure_round_trips(CFG, dl, round_trip))


SETTINGS = {
    "broker": "redis (kombu redis transport, BRPOP)",
    "result_backend": "redis (pub/sub wait)",
    "pool": "solo (--concurrency 1)",
    "worker_consume": "BRPOP (blocking, no poll interval)",
    "worker_processes": CFG.workers if CFG.workload == "throughput" else 1,
    "prefetch_multiplier": PREFETCH_MULTIPLIER,
    "acks_late": False,
    "enqueue": "apply_async loop on one producer",
    "completion_count": "INCR in task; first/last completion stamped by the task",
    "get_interval_s": CFG.poll_s,
    "worker_flags": "--without-gossip --without-mingle --without-heartbeat, remote control off",
    "log_level": "WARNING",
}

if __name__ == "__main__":
    sys.exit(
        _common.run_driver(CFG, body, SETTINGS, ["celery", "kombu", "billiard", "redis", "hiredis"])
    )
