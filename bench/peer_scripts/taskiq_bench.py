"""taskiq peer benchmark (runs in the taskiq venv; also the worker's broker module).

Broker: taskiq-redis ``RedisStreamBroker`` (the one its README leads with, and the one
with acknowledgements; ``ListQueueBroker`` is LPUSH/BRPOP without acks). Stream and
consumer-group names carry the run tag.

Throughput: n ``count`` tasks kicked with ``kiq`` by ENQUEUE_CONCURRENCY concurrent
coroutines, then ``workers`` x ``taskiq worker --workers 1`` (one executing child
process each) at taskiq's default ``--max-async-tasks`` of 100. The broker has no
result backend in this mode, because taskiq would otherwise store every task's result;
that mirrors celery's ignore_result and arq's keep_result=0. Completions: INCR in task.

Latency: one worker; ``(await noop.kiq()).wait_result(check_interval=...)`` with
taskiq-redis's ``RedisAsyncResultBackend``. ``wait_result`` polls (default 0.2 s), so
``check_interval`` is set to the run's poll interval.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import _common
from redis.asyncio import Redis
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

CFG = _common.load_config("taskiq")
STREAM = CFG.prefix + "stream"
MAX_ASYNC_TASKS = 100  # taskiq's default per worker process
ENQUEUE_CONCURRENCY = 64

broker: Any = RedisStreamBroker(
    url=CFG.redis_url,
    queue_name=STREAM,
    consumer_group_name=CFG.prefix + "group",
    max_connection_pool_size=ENQUEUE_CONCURRENCY + 8,
)
if CFG.workload == "latency":
    broker = broker.with_result_backend(
        RedisAsyncResultBackend(
            redis_url=CFG.redis_url, prefix_str=CFG.prefix + "res", result_ex_time=600
        )
    )

_client: Redis | None = None


def _redis() -> Redis:
    """One counter connection per worker process, made lazily inside its event loop."""
    global _client
    if _client is None:
        _client = Redis.from_url(CFG.redis_url)
    return _client


@broker.task(task_name="count")
async def count() -> None:
    await _common.record_completion_async(_redis(), CFG)


@broker.task(task_name="noop")
async def noop() -> int:
    return 1


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [
            _common.venv_bin("taskiq"), "worker", "taskiq_bench:broker",
            "--workers", "1", "--max-async-tasks", str(MAX_ASYNC_TASKS),
            "--log-level", "WARNING", "--app-dir", str(_common.SCRIPTS_DIR),
        ]
        for _ in range(workers)
    ]  # fmt: skip


async def _enqueue_all_async(dl: _common.Deadline) -> None:
    # startup() creates the consumer group at the stream's current end ("$"); it must
    # exist before the first kick or workers would skip everything enqueued before them.
    await broker.startup()
    remaining = iter(range(CFG.n))

    async def lane() -> None:
        for i in remaining:  # the shared iterator hands each slot to exactly one lane
            if i % _common.DEADLINE_CHECK_EVERY == 0:
                dl.check()
            await count.kiq()

    try:
        await asyncio.gather(*(lane() for _ in range(ENQUEUE_CONCURRENCY)))
    finally:
        await broker.shutdown()


def enqueue_all(dl: _common.Deadline) -> None:
    asyncio.run(_enqueue_all_async(dl))


async def _round_trip(wait_s: float) -> None:
    task = await noop.kiq()
    result = await task.wait_result(check_interval=CFG.poll_s, timeout=wait_s)
    if result.is_err or result.return_value != 1:
        raise _common.BenchError(f"unexpected result {result!r}")


async def _latency_async(dl: _common.Deadline) -> list[float]:
    await broker.startup()
    try:
        return await _common.measure_round_trips_async(CFG, dl, _round_trip)
    finally:
        await broker.shutdown()


def body(group: _common.WorkerGroup, dl: _common.Deadline) -> dict[str, Any]:
    if CFG.workload == "throughput":
        return _common.run_throughput(CFG, group, dl, enqueue_all, worker_cmds(CFG.workers))
    group.start(worker_cmds(1))
    return _common.latency_result(CFG, asyncio.run(_latency_async(dl)))


SETTINGS = {
    "broker": "RedisStreamBroker (XADD / XREADGROUP, acked when_saved)",
    "result_backend": "RedisAsyncResultBackend (polled), latency only",
    "worker_processes": CFG.workers if CFG.workload == "throughput" else 1,
    "max_async_tasks": MAX_ASYNC_TASKS,
    "max_prefetch": 0,
    "xread_count": 100,
    "enqueue": f"kiq, {ENQUEUE_CONCURRENCY} concurrent coroutines",
    "completion_count": "INCR in task; first/last completion stamped by the task",
    "wait_result_check_interval_s": CFG.poll_s,
    "log_level": "WARNING",
}

# taskiq 0.13 / taskiq-redis 1.2.4 workers hang on SIGTERM once the stream is idle (the
# shielded hand-off of a late prefetched message waits on XREADGROUP forever), so they
# get a short grace before SIGKILL; every task has completed by then anyway.
STOP_GRACE_S = 3.0

if __name__ == "__main__":
    sys.exit(
        _common.run_driver(
            CFG, body, SETTINGS, ["taskiq", "taskiq-redis", "redis", "hiredis"], STOP_GRACE_S
        )
    )
