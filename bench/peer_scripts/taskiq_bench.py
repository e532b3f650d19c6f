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

Failover (``_common.run_failover``): ONE ``taskiq worker --workers 1`` (a supervisor
plus one executing child; the default is 2 children) at ``--max-async-tasks`` n (100,
which is also taskiq's default), so every task is in flight at once. The broker keeps
its defaults: messages are XACKed after the result is "saved" (``ack_type``
``when_saved``), and a dead consumer's pending messages are only taken over by
XAUTOCLAIM with ``idle_timeout`` 600000 ms (10 min). The worker blocks in XREADGROUP
(``xread_block`` 2000 ms), so there is no poll interval to tune.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
from typing import Any

import _common
from redis.asyncio import Redis
from taskiq.cli.worker.args import WorkerArgs
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


@broker.task(task_name="failover")
async def failover(i: int) -> None:
    await _common.failover_task_async(_redis(), CFG, i)


def worker_cmds(workers: int) -> list[list[str]]:
    return [
        [
            _common.venv_bin("taskiq"), "worker", "taskiq_bench:broker",
            "--workers", "1", "--max-async-tasks", str(MAX_ASYNC_TASKS),
            "--log-level", "WARNING", "--app-dir", str(_common.SCRIPTS_DIR),
        ]
        for _ in range(workers)
    ]  # fmt: skip


def failover_worker_cmd() -> list[str]:
    return [
        _common.venv_bin("taskiq"), "worker", "taskiq_bench:broker",
        "--workers", "1", "--max-async-tasks", str(CFG.concurrency),
        "--log-level", "WARNING", "--app-dir", str(_common.SCRIPTS_DIR),
    ]  # fmt: skip


async def _enqueue_failover_async() -> None:
    await broker.startup()  # creates the consumer group before the first XADD
    try:
        for i in range(CFG.n):
            await failover.kiq(i)
    finally:
        await broker.shutdown()


def failover_probe(client: Any) -> dict[str, Any]:
    """The stream's consumer group: entries pending (delivered, not XACKed) per consumer."""
    group = broker.consumer_group_name
    summary = client.xpending(STREAM, group)
    consumers = {}
    for info in client.xinfo_consumers(STREAM, group):
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in info.items()}
        name = fields["name"]
        consumers[name.decode() if isinstance(name, bytes) else name] = {
            "pending": fields["pending"],
            "idle_s": round(fields["idle"] / 1000, 1),
        }
    return {
        "stream_len": client.xlen(STREAM),
        "pending": summary["pending"],
        "consumers": consumers,
    }


def enqueue_failover(dl: _common.Deadline) -> None:
    asyncio.run(_enqueue_failover_async())
    dl.check()


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
    if CFG.workload == "failover":
        return _common.run_failover(
            CFG, group, dl, enqueue_failover, failover_worker_cmd(), probe=failover_probe
        )
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


def failover_settings() -> dict[str, Any]:
    """The defaults that decide what a crash does, read from the installed taskiq(-redis)."""
    broker_defaults = {
        name: param.default
        for name, param in inspect.signature(RedisStreamBroker.__init__).parameters.items()
        if param.default is not inspect.Parameter.empty
    }
    return {
        "worker_processes": "1 (--workers 1; supervisor + 1 executing child; default 2)",
        "max_async_tasks": CFG.concurrency,
        "max_async_tasks_default": WorkerArgs.max_async_tasks,
        "max_prefetch": WorkerArgs.max_prefetch,
        "ack_type": str(WorkerArgs.ack_type.value),
        "idle_timeout_ms": broker.idle_timeout,
        "idle_timeout_default_ms": broker_defaults["idle_timeout"],
        "xread_block_ms": broker.block,
        "xread_count": broker.count,
        "unacknowledged_batch_size": broker.unacknowledged_batch_size,
        "unacknowledged_lock_timeout": broker.unacknowledged_lock_timeout,
        "consumer_name": "random uuid4 per worker process (RedisStreamBroker.consumer_name)",
        "redelivery": (
            "taskiq_redis/redis_broker.py RedisStreamBroker.listen(): after each XREADGROUP"
            " that returned messages, XAUTOCLAIM (min_idle_time=idle_timeout) takes over"
            " entries pending on other consumers; an empty read does `continue` first, so"
            " with no new messages arriving nothing is ever claimed"
        ),
        "ack_point": (
            "taskiq/receiver/receiver.py: XACK after the result is saved (ack_type"
            " when_saved, taskiq/cli/worker/args.py WorkerArgs.ack_type)"
        ),
    }


if __name__ == "__main__":
    failover_mode = CFG.workload == "failover"
    sys.exit(
        _common.run_driver(
            CFG,
            body,
            failover_settings() if failover_mode else SETTINGS,
            ["taskiq", "taskiq-redis", "redis", "hiredis"],
            STOP_GRACE_S,
        )
    )
