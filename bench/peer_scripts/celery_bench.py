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

Failover (``_common.run_failover``): ONE ``celery worker`` with celery's default pool,
prefork, at ``--concurrency n`` (100) so that every task is in flight at once; the
threads pool could do the same, but prefork is what users get and its n child processes
are what a crash must take down too. Nothing else is tuned: no prefetch multiplier, no
``--without-*`` flags, remote control on, and no broker transport option but the key
prefix - so ``task_acks_late`` is False and kombu's ``visibility_timeout`` is 3600 s.
The broker is consumed with BRPOP, so there is no poll interval to tune either.
"""

from __future__ import annotations

import sys
from typing import Any

import _common
import redis
from celery import Celery
from kombu.transport.redis import Channel as RedisChannel

CFG = _common.load_config("celery")
QUEUE = "bench"  # kombu prefixes it (and its binding keys) with global_keyprefix
# Prefetch per worker = 32 x concurrency 1. 4 (default), 32 and 128 measured within
# noise of each other here; 32 keeps the worker from going back to Redis per task.
PREFETCH_MULTIPLIER = 32

FAILOVER = CFG.workload == "failover"

app = Celery("shoal_bench", broker=CFG.redis_url, backend=CFG.redis_url)
app.conf.update(
    # Key naming only (every key carries the run tag); no reliability option is set.
    broker_transport_options={"global_keyprefix": CFG.prefix},
    result_backend_transport_options={"global_keyprefix": CFG.prefix},
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=600,
)
if not FAILOVER:  # failover measures celery as shipped: default prefetch, remote control
    app.conf.update(
        worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
        worker_enable_remote_control=False,  # no pidbox fan-out traffic on the engine
        worker_send_task_events=False,
        task_send_sent_event=False,
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


@app.task(name="bench.failover", ignore_result=True)  # acks_late etc.: celery's defaults
def failover(i: int) -> None:
    _common.failover_task(_redis(), CFG, i)


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


def failover_worker_cmd() -> list[str]:
    """celery's default pool (prefork) sized to hold every task; otherwise defaults."""
    return [
        _common.venv_bin("celery"), "-A", "celery_bench", "worker",
        "--pool", "prefork", "--concurrency", str(CFG.concurrency),
        "--loglevel", "WARNING", "-Q", QUEUE, "-n", f"failover-{CFG.tag}@%h",
    ]  # fmt: skip


def failover_probe(client: redis.Redis) -> dict[str, Any]:
    """kombu's keys (all under global_keyprefix): the queue list and the unacked hash."""
    return {
        "queued": client.llen(CFG.prefix + QUEUE),
        "reserved_unacked": client.hlen(CFG.prefix + RedisChannel.unacked_key),
        "note": "started tasks were acked on start: not in any key any more",
    }


def enqueue_failover(dl: _common.Deadline) -> None:
    with app.producer_or_acquire() as producer:
        for i in range(CFG.n):
            failover.apply_async((i,), producer=producer)
    dl.check()


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
    if FAILOVER:
        return _common.run_failover(
            CFG, group, dl, enqueue_failover, failover_worker_cmd(), probe=failover_probe
        )
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


def failover_settings() -> dict[str, Any]:
    """The defaults that decide what a crash does, read from the installed celery/kombu."""
    conf = app.conf
    return {
        "pool": f"prefork (celery's default pool), --concurrency {CFG.concurrency}",
        "worker_processes": 1,
        "task_acks_late": conf.task_acks_late,
        "task_reject_on_worker_lost": conf.task_reject_on_worker_lost,
        "worker_prefetch_multiplier": conf.worker_prefetch_multiplier,
        "ack_point": (
            "celery/worker/request.py Request.on_accepted(): acknowledge() as soon as the"
            " pool accepts the task when not acks_late - a task running at the crash is"
            " already acked, i.e. gone from the broker"
        ),
        "visibility_timeout_s": RedisChannel.visibility_timeout,
        "unacked_restore_interval_s": RedisChannel.unacked_restore_interval,
        "unacked_restore_throttle": RedisChannel.unacked_restore_throttle,
        "unacked_redelivery": (
            "kombu/transport/redis.py QoS.restore_visible(): reserved-but-unacked messages"
            " (kombu 'unacked' hash) are re-queued only once older than"
            " Channel.visibility_timeout"
        ),
        "broker_transport_options": "global_keyprefix only (key naming)",
        "worker_consume": "BRPOP (blocking, no poll interval)",
        "worker_flags": "none beyond -Q/-n/--loglevel (gossip, mingle, heartbeat on)",
    }


if __name__ == "__main__":
    sys.exit(
        _common.run_driver(
            CFG,
            body,
            failover_settings() if FAILOVER else SETTINGS,
            ["celery", "kombu", "billiard", "redis", "hiredis"],
            _common.FAILOVER_STOP_GRACE_S if FAILOVER else _common.WORKER_STOP_GRACE_S,
        )
    )
