"""arq peer benchmark (runs in the arq venv; also the worker's settings module).

arq hard-codes its key prefixes (``arq:job:<id>``, ``arq:result:<id>`` ...), so every
job id and the queue name carry the run tag instead, which is what cleanup matches.

Throughput: n ``count`` jobs enqueued with ``enqueue_job`` by ENQUEUE_CONCURRENCY
concurrent coroutines (each enqueue is a WATCH/MULTI transaction, so unbounded gather
would just open thousands of connections), then ``workers`` x ``arq
arq_bench.WorkerSettings`` with ``max_jobs`` = MAX_JOBS. ``count`` keeps no result
(``keep_result=0``), like celery's ignore_result. Completions: INCR inside the job.

Latency: one worker; ``(await enqueue_job("noop")).result(poll_delay=...)``. arq polls
on both sides - the worker's queue poll (``poll_delay``, default 0.5 s) and the
client's result poll (``poll_delay``, default 0.5 s) - and both are set to the run's
poll interval, or the numbers would measure the defaults' sleeps.

Failover (``_common.run_failover``): ONE ``arq arq_bench.FailoverWorkerSettings``
worker with ``max_jobs`` = n (100; default 10) so every job is in flight at once. All
reliability settings are arq's defaults: a job stays in the queue sorted set while it
runs, guarded by an ``arq:in-progress:<id>`` key that expires ``job_timeout`` (300 s)
+ 10 s after the job was picked, and ``max_tries`` is 5. Only ``poll_delay`` is set to
the run's poll interval: it is purely how often the worker re-reads the queue, and
does not change when a dead worker's jobs become runnable again (the key's TTL does).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from itertools import count as counter
from typing import Any

import _common
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func

CFG = _common.load_config("arq")
QUEUE = CFG.prefix + "queue"
MAX_JOBS = 100  # concurrent jobs per worker process (asyncio tasks); default is 10
ENQUEUE_CONCURRENCY = 64
REDIS_SETTINGS = RedisSettings.from_dsn(CFG.redis_url)

# Passed to the CLI with --custom-log-dict: arq logs every job at INFO, which would
# turn a no-op benchmark into a logging benchmark.
LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"level": "WARNING", "class": "logging.StreamHandler"}},
    "loggers": {"arq": {"handlers": ["stderr"], "level": "WARNING"}},
}


async def count(ctx: dict[str, Any]) -> None:
    await _common.record_completion_async(ctx["redis"], CFG)


async def noop(ctx: dict[str, Any]) -> int:
    return 1


class WorkerSettings:
    """Read by ``arq arq_bench.WorkerSettings`` in each worker process."""

    functions = [func(count, name="count", keep_result=0), func(noop, name="noop")]
    redis_settings = REDIS_SETTINGS
    queue_name = QUEUE
    max_jobs = MAX_JOBS
    poll_delay = CFG.poll_s
    keep_result = 600
    max_tries = 1
    handle_signals = True


async def failover(ctx: dict[str, Any], i: int) -> None:
    await _common.failover_task_async(ctx["redis"], CFG, i)


class FailoverWorkerSettings:
    """Failover worker: arq's defaults except the concurrency and the poll interval."""

    functions = [func(failover, name="failover")]
    redis_settings = REDIS_SETTINGS
    queue_name = QUEUE
    max_jobs = CFG.concurrency
    poll_delay = CFG.poll_s


def failover_worker_cmd() -> list[str]:
    return [
        _common.venv_bin("arq"), "--custom-log-dict", "arq_bench.LOG_CONFIG",
        "arq_bench.FailoverWorkerSettings",
    ]  # fmt: skip


async def _enqueue_failover_async() -> None:
    pool = await _pool()
    try:
        for i in range(CFG.n):
            if await pool.enqueue_job("failover", i, _job_id=f"{CFG.prefix}f{i}") is None:
                raise _common.BenchError(f"job {i} not enqueued (duplicate id)")
    finally:
        await pool.aclose()


def failover_probe(client: Any) -> dict[str, Any]:
    """arq's keys: the queue sorted set and the dead worker's in-progress guards."""
    guards = list(client.scan_iter(match=f"{in_progress_key_prefix}{CFG.prefix}*", count=1000))
    ttls = [client.pttl(key) for key in guards]
    return {
        "queued_or_running": client.zcard(QUEUE),
        "in_progress_keys": len(guards),
        "in_progress_ttl_left_s": [round(min(ttls) / 1000, 1), round(max(ttls) / 1000, 1)]
        if ttls
        else None,
    }


def enqueue_failover(dl: _common.Deadline) -> None:
    asyncio.run(_enqueue_failover_async())
    dl.check()


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [_common.venv_bin("arq"), "--custom-log-dict", "arq_bench.LOG_CONFIG",
         "arq_bench.WorkerSettings"]
        for _ in range(workers)
    ]  # fmt: skip


async def _pool() -> ArqRedis:
    return await create_pool(REDIS_SETTINGS, default_queue_name=QUEUE)


async def _enqueue_all_async(dl: _common.Deadline) -> None:
    pool = await _pool()
    ids = iter(range(CFG.n))

    async def lane() -> None:
        for i in ids:  # the shared iterator hands each id to exactly one lane
            if i % _common.DEADLINE_CHECK_EVERY == 0:
                dl.check()
            if await pool.enqueue_job("count", _job_id=f"{CFG.prefix}c{i}") is None:
                raise _common.BenchError(f"job {i} not enqueued (duplicate id)")

    try:
        await asyncio.gather(*(lane() for _ in range(ENQUEUE_CONCURRENCY)))
    finally:
        await pool.aclose()


def enqueue_all(dl: _common.Deadline) -> None:
    asyncio.run(_enqueue_all_async(dl))


async def _latency_async(dl: _common.Deadline) -> list[float]:
    pool = await _pool()
    seq = counter()

    async def round_trip(wait_s: float) -> None:
        job = await pool.enqueue_job("noop", _job_id=f"{CFG.prefix}l{next(seq)}")
        if job is None:
            raise _common.BenchError("job not enqueued")
        if await job.result(timeout=wait_s, poll_delay=CFG.poll_s) != 1:
            raise _common.BenchError("unexpected result")

    try:
        return await _common.measure_round_trips_async(CFG, dl, round_trip)
    finally:
        await pool.aclose()


def body(group: _common.WorkerGroup, dl: _common.Deadline) -> dict[str, Any]:
    if CFG.workload == "throughput":
        return _common.run_throughput(CFG, group, dl, enqueue_all, worker_cmds(CFG.workers))
    if CFG.workload == "failover":
        return _common.run_failover(
            CFG, group, dl, enqueue_failover, failover_worker_cmd(), probe=failover_probe
        )
    group.start(worker_cmds(1))
    return _common.latency_result(CFG, asyncio.run(_latency_async(dl)))


SETTINGS = {
    "broker": "arq (sorted-set queue polled by workers)",
    "result_backend": "arq result keys (polled)",
    "worker_processes": CFG.workers if CFG.workload == "throughput" else 1,
    "max_jobs": MAX_JOBS,
    "worker_poll_delay_s": CFG.poll_s,
    "result_poll_delay_s": CFG.poll_s,
    "enqueue": f"enqueue_job, {ENQUEUE_CONCURRENCY} concurrent coroutines",
    "completion_count": "INCR in job via ctx['redis']; first/last completion stamped by the job",
    "count_keep_result": 0,
    "max_tries": 1,
    "log_level": "WARNING",
}


def failover_settings() -> dict[str, Any]:
    """The defaults that decide what a crash does, read from the installed arq."""
    defaults = {
        name: param.default
        for name, param in inspect.signature(Worker.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    job_timeout = defaults["job_timeout"]
    return {
        "worker_processes": 1,
        "max_jobs": CFG.concurrency,
        "max_jobs_default": defaults["max_jobs"],
        "job_timeout_s": job_timeout,
        "in_progress_timeout_s": job_timeout + 10,
        "max_tries": defaults["max_tries"],
        "retry_jobs": defaults["retry_jobs"],
        "keep_result_s": defaults["keep_result"],
        "expires_extra_ms": defaults["expires_extra_ms"],
        "poll_delay_s": CFG.poll_s,
        "poll_delay_default_s": defaults["poll_delay"],
        "redelivery": (
            "arq/worker.py Worker.start_jobs(): a picked job gets"
            f" '{in_progress_key_prefix}<id>' with PSETEX in_progress_timeout_s ="
            " max(function timeout or job_timeout) + 10 (Worker.__init__); the job stays"
            " in the queue sorted set and any worker may start it once that key expires"
        ),
        "ack_point": "job removed from the queue by finish_job() after it ran",
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    failover_mode = CFG.workload == "failover"
    sys.exit(
        _common.run_driver(
            CFG,
            body,
            failover_settings() if failover_mode else SETTINGS,
            ["arq", "redis", "hiredis"],
            _common.FAILOVER_STOP_GRACE_S if failover_mode else _common.WORKER_STOP_GRACE_S,
        )
    )
