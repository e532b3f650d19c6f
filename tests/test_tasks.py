"""The work plane end to end against the real engine, with in-process nodes."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from shoal import (
    Client,
    ConfigurationError,
    EngineUnavailable,
    QueueFull,
    ResultTimeout,
    SerializationError,
    Settings,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    protocol,
)
from shoal.node import Node, NodeConfig
from tests.agents import Other, Toolbox
from tests.conftest import running_node, wait_for_status


@pytest.mark.topology
async def test_async_and_sync_handlers_return_results(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        assert await client.call("echo", value={"a": [1, 2.5, "x", None]}) == {
            "a": [1, 2.5, "x", None]
        }
        added = await client.call("add", a=2, b=3)
        assert added["sum"] == 5
        assert added["thread"].startswith("shoal"), "sync handlers run in the node's thread pool"


@pytest.mark.topology
async def test_status_shows_the_whole_life_of_a_task(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings, name="node-a"):
        handle = await client.submit("echo", value=1)
        assert await handle.result(timeout=10) == 1
        info = await handle.status()
    assert info.status == "succeeded"
    assert info.attempts == 1
    assert info.node == "node-a"
    assert info.created_at <= info.started_at <= info.finished_at  # type: ignore[operator]
    assert info.has_result


async def test_a_records_times_never_go_backwards_when_clocks_disagree(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The submitting client's clock is a minute ahead of the node's (as between two
    machines, or after an NTP step): the record still reads created <= started <=
    finished."""
    real_now_ms = protocol.now_ms
    monkeypatch.setattr(protocol, "now_ms", lambda: real_now_ms() + 60_000)
    handle = await client.submit("echo", value=1)
    monkeypatch.setattr(protocol, "now_ms", real_now_ms)
    async with running_node([Toolbox], settings):
        assert await handle.result(timeout=10) == 1
    info = await handle.status()
    assert info.created_at >= real_now_ms() + 50_000, "the client's clock was used"
    assert info.created_at <= info.started_at <= info.finished_at  # type: ignore[operator]


async def test_waiting_client_that_did_not_submit_is_woken_by_the_event_stream(
    client: Client, settings: Settings
) -> None:
    handle = await client.submit("echo", value="later")
    async with Client(settings=settings) as other:
        waiting = asyncio.create_task(other.result(handle.id, timeout=10))
        await asyncio.sleep(0.05)  # let the waiter block before any node exists
        assert not waiting.done()
        async with running_node([Toolbox], settings):
            assert await waiting == "later"


async def test_sequential_round_trips_are_woken_without_polling(
    client: Client, settings: Settings
) -> None:
    """200 sequential calls: a waiter that polled on a 10 ms+ timer would need > 2 s."""
    async with running_node([Toolbox], settings):
        await client.call("echo", value=0)
        start = time.perf_counter()
        for i in range(200):
            assert await client.call("echo", value=i) == i
        elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"200 round trips took {elapsed:.2f}s"


@pytest.mark.topology
async def test_events_are_ordered_and_resumable_from_an_id(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("report", steps=3)
        assert await handle.result(timeout=10) == "reported"
    events = [e async for e in handle.events()]
    kinds = [e.kind for e in events]
    assert kinds == ["progress", "progress", "progress", "log", "event", "done"]
    assert [e.data["fraction"] for e in events[:3]] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert events[-1].data == {"status": "succeeded"}
    resumed = [e async for e in handle.events(after=events[2].id)]
    assert resumed == events[3:]


async def test_events_from_a_sync_handler_reach_the_stream(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("sync_report")
        await handle.result(timeout=10)
    kinds = [(e.kind, e.data) async for e in handle.events()]
    assert kinds[0] == ("progress", {"fraction": 0.5, "message": "from a thread"})


async def test_following_events_live_ends_with_the_terminal_event(
    client: Client, settings: Settings
) -> None:
    handle = await client.submit("report", steps=2)
    seen: list[str] = []

    async def follow() -> None:
        async for event in handle.events():
            seen.append(event.kind)

    follower = asyncio.create_task(follow())
    async with running_node([Toolbox], settings):
        await asyncio.wait_for(follower, 10)
    assert seen[-1] == "done" and seen.count("progress") == 2


@pytest.mark.topology
async def test_high_priority_task_starts_before_a_thousand_low_ones(
    client: Client, settings: Settings
) -> None:
    low = await client.submit_many("whoami", [{"i": i} for i in range(1000)], priority="low")
    high = await client.submit("whoami", i=-1, priority="high")
    async with running_node([Toolbox], settings, concurrency=1):
        await high.result(timeout=30)
        high_started = (await high.status()).started_at
        await asyncio.gather(*(h.result(timeout=60) for h in low))
        low_started = [(await h.status()).started_at for h in low]
    assert high_started is not None and all(s is not None for s in low_started)
    before = [s for s in low_started if s is not None and s < high_started]
    # Priorities order the queues of one key group, and a node reads the groups in
    # turn: with one group (standalone, Sentinel) no low task starts first; with
    # several (a Cluster) the high one may follow one fetch — here of one task,
    # concurrency=1 — from each other group.
    assert len(before) <= client.keys.groups - 1, (len(before), client.keys.groups)


async def test_delayed_task_runs_after_its_delay_and_not_before(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        submitted = time.time()
        handle = await client.submit("echo", value="late", delay=0.6)
        info = await handle.status()
        assert info.status == "scheduled" and info.scheduled_for is not None
        assert await handle.result(timeout=10) == "late"
        started = (await handle.status()).started_at
    assert started is not None and started / 1000 >= submitted + 0.6 - 0.01


async def test_eta_schedules_at_an_absolute_time(client: Client, settings: Settings) -> None:
    eta = datetime.now(UTC) + timedelta(seconds=0.4)
    async with running_node([Toolbox], settings):
        handle = await client.submit("echo", value=1, eta=eta)
        assert await handle.result(timeout=10) == 1
        started = (await handle.status()).started_at
    assert started is not None and started / 1000 >= eta.timestamp() - 0.01


@pytest.mark.topology
async def test_delayed_tasks_are_released_once_with_several_nodes(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings), running_node([Toolbox], settings):
        handles = await client.submit_many("whoami", [{"i": i} for i in range(50)], delay=0.3)
        results = await asyncio.gather(*(h.result(timeout=10) for h in handles))
        infos = [await h.status() for h in handles]
    assert [r["i"] for r in results] == list(range(50))
    assert all(info.attempts == 1 for info in infos)
    assert len({r["node"] for r in results}) >= 1


async def test_timeout_cancels_a_running_handler_and_counts_as_a_failed_attempt(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("sleepy", seconds=30, timeout=0.2, max_attempts=1)
        with pytest.raises(TaskFailed) as failure:
            await handle.result(timeout=10)
    assert failure.value.error_type == "shoal.errors.TaskTimeout"
    assert "timeout of 0.2s" in failure.value.message
    assert (await handle.status()).status == "dead"


async def test_deadline_passed_before_start_means_the_task_is_not_run(
    client: Client, settings: Settings
) -> None:
    handle = await client.submit("echo", value=1, deadline=0.05)
    await asyncio.sleep(0.1)  # let the deadline pass while no node runs
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskFailed) as failure:
            await handle.result(timeout=10)
    info = await handle.status()
    assert info.status == "expired" and info.attempts == 0 and info.started_at is None
    assert failure.value.status == "expired"


@pytest.mark.topology
async def test_retries_back_off_and_then_succeed(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("flaky", succeed_on=3)
        assert await handle.result(timeout=10) == 3
        info = await handle.status()
    assert info.attempts == 3
    assert [e.message for e in info.errors] == ["attempt 1 fails", "attempt 2 fails"]
    # Equal jitter: the n-th back-off is at least half of base * 2**(n-1) — 25 ms after
    # attempt 1, 50 ms after attempt 2 (1 ms off for millisecond clocks).
    assert info.started_at is not None, "started_at is the last attempt's start"
    first_backoff = info.errors[1].at - info.errors[0].at  # plus attempt 2's own short run
    second_backoff = info.started_at - info.errors[1].at
    assert first_backoff >= 25 - 1
    assert second_backoff >= 50 - 1, "the second back-off is at least half of 2x base"


async def test_task_max_attempts_overrides_the_capability_default(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("flaky", succeed_on=3, max_attempts=2)
        with pytest.raises(TaskFailed) as failure:
            await handle.result(timeout=10)
    assert failure.value.status == "dead"
    assert (await handle.status()).attempts == 2


async def test_retry_exception_asks_for_another_attempt_after_its_delay(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("asks_retry", wait=0.3)
        result = await handle.result(timeout=10)
        info = await handle.status()
    assert result["attempt"] == 2
    assert info.errors[0].type == "shoal.errors.Retry"
    assert result["at"] - info.errors[0].at / 1000 >= 0.29


async def test_non_retryable_error_fails_at_once(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("permanent")
        with pytest.raises(TaskFailed) as failure:
            await handle.result(timeout=10)
    assert failure.value.status == "failed"
    assert failure.value.error_type == "tests.agents.PermanentError"
    assert (await handle.status()).attempts == 1
    assert await client.dead_letters("permanent") == []


async def test_failed_result_carries_type_message_and_traceback_on_request(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("always_fails")
        with pytest.raises(TaskFailed) as failure:
            await handle.result(timeout=10, with_traceback=True)
    assert failure.value.error_type == "ValueError"
    assert failure.value.message == "this never works"
    assert failure.value.remote_traceback and "raise ValueError" in failure.value.remote_traceback
    assert any("remote traceback" in note for note in failure.value.__notes__)


@pytest.mark.topology
async def test_exhausted_task_goes_to_the_dead_letters_and_can_be_redriven(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("always_fails")
        with pytest.raises(TaskFailed):
            await handle.result(timeout=10)
        letters = await client.dead_letters("always_fails")
        assert [letter.task.id for letter in letters] == [handle.id]
        history = letters[0].task.errors
        assert [e.attempt for e in history] == [1, 2]
        assert all(e.message == "this never works" for e in history)
        assert await client.redrive("always_fails") == [handle.id]
        assert await client.dead_letters("always_fails") == []
        with pytest.raises(TaskFailed):
            await handle.result(timeout=10)
        info = await handle.status()
    assert info.status == "dead"
    assert [e.attempt for e in info.errors] == [1, 2, 1, 2], "both rounds' errors are kept"
    kinds = [e.kind async for e in handle.events()]
    # Nobody followed the first run and it emitted nothing, so it left no stream;
    # the redrive starts one and the second end is written to it.
    assert kinds == ["redriven", "done"]


async def test_redrive_of_an_unknown_id_is_refused_clearly(client: Client) -> None:
    with pytest.raises(TaskNotFound, match="not in the dead-letter queue"):
        await client.redrive("always_fails", ["0" * 28])


@pytest.mark.topology
async def test_cancel_a_queued_task(client: Client, settings: Settings) -> None:
    handle = await client.submit("echo", value=1)
    assert await handle.cancel() == "cancelled"
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=10)
        assert await client.call("echo", value=2) == 2  # the skipped entry blocks nothing
    info = await handle.status()
    assert info.status == "cancelled" and info.attempts == 0


async def test_cancel_a_scheduled_task(client: Client, settings: Settings) -> None:
    handle = await client.submit("echo", value=1, delay=0.3)
    assert await handle.cancel() == "cancelled"
    async with running_node([Toolbox], settings):
        await asyncio.sleep(0.5)  # past the due time: it must stay cancelled
        info = await handle.status()
    assert info.status == "cancelled" and info.attempts == 0


@pytest.mark.topology
async def test_cancel_a_running_task_on_another_node(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("sleepy", seconds=30)
        await wait_for_status(handle, "running")
        assert await handle.cancel() == "cancelling"
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=5)
    assert (await handle.status()).status == "cancelled"
    assert await handle.cancel() == "already_cancelled"


async def test_cancelling_a_parent_cancels_the_sub_task_it_awaits(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings, concurrency=4):
        parent = await client.submit("parent_waits")
        child_id = None
        while child_id is None:
            events = await client.redis.keys(client.keys.task("*"))
            for key in events:
                info = await client.status(key.decode().rsplit(":", 1)[1])
                if info.parent == parent.id and info.status == "running":
                    child_id = info.id
            await asyncio.sleep(0.02)  # wait for the child to start
        await parent.cancel()
        with pytest.raises(TaskCancelled):
            await parent.result(timeout=5)
        with pytest.raises(TaskCancelled):
            await client.result(child_id, timeout=5)


@pytest.mark.topology
async def test_sub_tasks_run_through_ctx_call(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings, concurrency=8):
        handle = await client.submit("parent", n=3)
        assert await handle.result(timeout=10) == [0, 1, 2]


@pytest.mark.topology
async def test_idempotency_key_returns_the_same_task(client: Client, settings: Settings) -> None:
    first = await client.submit("echo", value=1, idempotency_key="order-7")
    second = await client.submit("echo", value=2, idempotency_key="order-7")
    assert second.id == first.id and first.is_new and not second.is_new
    async with running_node([Toolbox], settings):
        assert await second.result(timeout=10) == 1
    third = await client.submit("echo", value=3, idempotency_key="order-7")
    assert third.id == first.id, "the key holds for its whole window, also after completion"


async def test_full_queue_refuses_with_queue_full_and_loses_nothing(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        pass  # registers 'bounded' (max_queue_length=5), then goes away
    accepted = await client.submit_many("bounded", [{}] * 5)
    with pytest.raises(QueueFull, match="queue of capability 'bounded' is full"):
        await client.submit("bounded")
    assert len(await client.submit_many("echo", [{"value": 1}] * 10)) == 10  # others unaffected
    async with running_node([Toolbox], settings):
        assert await asyncio.gather(*(h.result(timeout=10) for h in accepted)) == [None] * 5
        await client.submit("bounded")  # room again once the queue drained


async def test_partial_batch_on_a_full_queue_reports_what_was_accepted(
    client: Client, settings: Settings
) -> None:
    small = Client(settings=settings.with_(queue_max_length=3))
    async with small:
        with pytest.raises(QueueFull) as full:
            await small.submit_many("echo", [{"value": i} for i in range(5)])
    accepted = full.value.accepted
    assert len(accepted) == 3
    async with running_node([Toolbox], settings):
        results = [await client.task(h.id).result(timeout=10) for h in accepted]
    assert results == [0, 1, 2]


async def test_non_serialisable_argument_is_refused_at_submit(client: Client) -> None:
    with pytest.raises(SerializationError, match=r"argument 'when' has type builtins\.object"):
        await client.submit("echo", value=1, when=object())


async def test_non_serialisable_result_fails_the_task_without_retries(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskFailed, match="cannot be stored") as failure:
            await client.call("returns_object")
    assert failure.value.status == "failed"


async def test_arguments_that_do_not_fit_the_handler_fail_clearly(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskFailed, match="unexpected keyword argument 'c'"):
            await client.call("add", a=1, b=2, c=3)
        with pytest.raises(TaskFailed, match="missing a required argument: 'b'"):
            await client.call("add", a=1)


async def test_unknown_capability_waits_queued_and_says_no_node_hosts_it(
    client: Client, settings: Settings
) -> None:
    handle = await client.submit("nobody_has_this")
    info = await handle.status()
    assert info.status == "queued" and info.hosted is False
    with pytest.raises(ResultTimeout):
        await handle.result(timeout=0.2)
    async with running_node([Toolbox], settings):
        assert (await client.status((await client.submit("echo")).id)).hosted in (True, None)


async def test_two_agent_types_on_one_node(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox, Other], settings):
        assert await client.call("other") == "other"
        assert await client.call("echo", value=5) == 5


async def test_bad_options_are_refused_with_what_is_allowed(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="use one of high, normal, low"):
        await client.submit("echo", priority="urgent")
    with pytest.raises(ConfigurationError, match="max_attempts"):
        await client.submit("echo", max_attempts=0)
    with pytest.raises(ConfigurationError, match="capability name"):
        await client.submit("no spaces")
    with pytest.raises(ConfigurationError, match="either delay"):
        await client.submit("echo", delay=1, eta=datetime.now(UTC))
    with pytest.raises(ConfigurationError, match="not a Shoal task id"):
        await client.status("nope")
    with pytest.raises(TaskNotFound):
        await client.status("0" * 28)


async def test_sub_tasks_share_the_parent_trace_and_name_their_parent(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings, concurrency=8):
        parent = await client.submit("parent", n=1)
        await parent.result(timeout=10)
        keys = await client.redis.keys(client.keys.task("*"))
        infos = [await client.status(k.decode().rsplit(":", 1)[1]) for k in keys]
    child = next(i for i in infos if i.parent == parent.id)
    parent_info = next(i for i in infos if i.id == parent.id)
    assert parent_info.traceparent and child.traceparent
    assert child.traceparent.split("-")[1] == parent_info.traceparent.split("-")[1]
    assert child.traceparent.split("-")[2] != parent_info.traceparent.split("-")[2]


def test_sync_client_for_scripts(settings: Settings) -> None:
    import threading

    from shoal import connect

    ready = threading.Event()
    stop = threading.Event()

    def serve() -> None:
        async def main() -> None:
            async with running_node([Toolbox], settings):
                ready.set()
                await asyncio.to_thread(stop.wait)

        asyncio.run(main())

    server = threading.Thread(target=serve)
    server.start()
    try:
        assert ready.wait(20)
        with connect(settings.url, namespace=settings.namespace) as c:
            assert c.call("add", a=1, b=2)["sum"] == 3
            handle = c.submit("report", steps=1)
            assert handle.result(timeout=10) == "reported"
            assert [e.kind for e in handle.events()][-1] == "done"
            assert handle.status().status == "succeeded"
            handles = c.submit_many("echo", [{"value": i} for i in range(5)])
            assert [h.result(timeout=10) for h in handles] == list(range(5))
            with pytest.raises(TaskFailed):
                c.call("permanent")
    finally:
        stop.set()
        server.join(30)


async def test_a_task_nobody_follows_leaves_no_event_stream_until_followed(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("echo", value=1)
        assert await handle.result(timeout=10) == 1
    assert await client.redis.exists(client.keys.events(handle.id)) == 0
    start = time.perf_counter()
    events = [e async for e in handle.events()]  # finished: ends at once, no wait
    assert time.perf_counter() - start < 1.0
    assert [(e.kind, e.data) for e in events] == [("done", {"status": "succeeded"})]
    ttl = await client.redis.pttl(client.keys.events(handle.id))
    assert 0 < ttl <= await client.redis.pttl(client.keys.task(handle.id)) + 50


async def test_following_a_quiet_task_gets_its_done_event(
    client: Client, settings: Settings
) -> None:
    handle = await client.submit("echo", value=1)
    follower = asyncio.create_task(_collect(handle.events()))
    async with running_node([Toolbox], settings):
        events = await asyncio.wait_for(follower, 10)
    assert [(e.kind, e.data) for e in events] == [("done", {"status": "succeeded"})]


async def _collect(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


async def test_a_handlers_own_timeout_error_is_recorded_as_itself(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskFailed) as failure:
            await client.call("own_timeout")
    assert failure.value.error_type == "TimeoutError"
    assert failure.value.message == "the upstream API timed out"


async def test_result_after_a_redrive_is_the_new_outcome_not_a_remembered_one(
    client: Client, settings: Settings
) -> None:
    Toolbox.switch = False
    async with running_node([Toolbox], settings):
        handle = await client.submit("switchable")
        await wait_for_status(handle, "dead")
        Toolbox.switch = True
        try:
            assert await client.redrive("switchable") == [handle.id]
            assert await handle.result(timeout=10) == "switched on"
        finally:
            Toolbox.switch = False


async def test_capabilities_of_one_priority_take_turns_on_a_node(
    client: Client, settings: Settings
) -> None:
    busy = await client.submit_many("whoami", [{"i": i} for i in range(40)])
    other = await client.submit("echo", value="not starved")
    async with running_node([Toolbox], settings, concurrency=1):
        await other.result(timeout=30)
        other_started = (await other.status()).started_at
        await asyncio.gather(*(h.result(timeout=30) for h in busy))
        busy_started = sorted([(await h.status()).started_at or 0 for h in busy])
    assert other_started is not None
    assert other_started < busy_started[len(CAPS_ON_TOOLBOX) + 1]


CAPS_ON_TOOLBOX = list(Toolbox.capabilities())


async def test_event_history_reads_without_waiting(client: Client, settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        done = await client.submit("report", steps=2)
        await done.result(timeout=10)
        running = await client.submit("sleepy", seconds=30)
        await wait_for_status(running, "running")
        assert [e.kind for e in await client.event_history(done.id)][-1] == "done"
        assert await client.event_history(running.id) == []  # returns at once
        await running.cancel()
    with pytest.raises(TaskNotFound):
        await client.event_history("0" * 28)


async def test_event_data_that_is_not_msgpack_fails_the_task_clearly(
    client: Client, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        with pytest.raises(TaskFailed, match="event data of type dict cannot be sent") as failure:
            await client.call("bad_event")
    assert failure.value.status == "failed"


def test_engines_older_than_redis_7_are_refused_clearly() -> None:
    from shoal.client import _check_engine_version

    with pytest.raises(EngineUnavailable, match=r"runs Redis 6\.2\.14; Shoal needs Redis >= 7\.0"):
        _check_engine_version({"redis_version": "6.2.14"}, "redis://:pw@h:1/0")
    _check_engine_version({"redis_version": "7.2.4"}, "redis://h:1/0")


@pytest.mark.topology
async def test_a_first_burst_of_concurrent_calls_all_return_through_the_inbox(
    settings: Settings,
) -> None:
    """A fresh client's first 2,000 concurrent calls: every outcome arrives through
    the inboxes (one per key group on a Cluster); none had to be found by the
    periodic recheck of the records, which is what a lost inbox entry costs."""
    async with running_node([Toolbox], settings), Client(settings=settings) as fresh:
        results = await asyncio.wait_for(
            asyncio.gather(*(fresh.call("echo", value=i) for i in range(2000))), 60
        )
        rechecked = fresh.rechecked
    assert results == list(range(2000))
    assert rechecked == 0, f"{rechecked} outcome(s) were lost on their way to the inbox"


async def test_key_groups_are_fixed_per_namespace_and_work_on_one_server(
    settings: Settings,
) -> None:
    """Several key groups on a single server (as on a Cluster): tasks spread over the
    groups and all complete; the count is fixed by the first user, and asking for
    another is refused with a message that says so."""
    grouped = settings.with_(key_groups=4)
    async with running_node([Toolbox], grouped), Client(settings=grouped) as c:
        assert c.keys.groups == 4
        handles = await c.submit_many("echo", [{"value": i} for i in range(2000)])  # 4 chunks
        assert {c.keys.task_group(h.id) for h in handles} == {0, 1, 2, 3}
        assert await asyncio.gather(*(h.result(timeout=30) for h in handles)) == list(range(2000))
    async with Client(settings=settings) as later:  # no setting: takes the namespace's
        assert later.keys.groups == 4
    with pytest.raises(ConfigurationError, match="has 4 hash-tag groups"):
        async with Client(settings=settings.with_(key_groups=8)):
            pass


@pytest.mark.parametrize(
    ("option", "value"),
    [("delay", float("inf")), ("delay", 1e300), ("timeout", float("nan")), ("deadline", 1e12)],
)
async def test_absurd_times_are_refused_before_anything_is_written(
    client: Client, option: str, value: float
) -> None:
    with pytest.raises(ConfigurationError, match=f"{option} must be at most"):
        await client.submit("echo", **{option: value})
    assert (await client.list_tasks()).tasks == ()


async def test_a_lone_surrogate_in_an_argument_is_a_serialization_error(client: Client) -> None:
    with pytest.raises(SerializationError, match="argument 'text'"):
        await client.submit("echo", text="\ud800")


async def test_a_running_task_whose_cancel_message_was_missed_is_cancelled_all_the_same(
    client: Client, settings: Settings
) -> None:
    """The node also reads the 'cancel' flag of its running tasks every couple of
    seconds: here the flag is set with no message published at all."""
    async with running_node([Toolbox], settings):
        handle = await client.submit("sleepy", seconds=30)
        await wait_for_status(handle, "running")
        await client.redis.hset(client.keys.task(handle.id), "cancel", "1")
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=10)


async def test_a_node_whose_every_slot_is_busy_stops_within_its_grace(
    client: Client, settings: Settings
) -> None:
    """Its fetch loop waits for a free slot; stop() must wake it, or the node would
    stop only when the running task ended by itself."""
    node = Node([Toolbox], settings, NodeConfig(concurrency=1, grace_period=0.5))
    running = asyncio.create_task(node.run())
    handle = await client.submit("sleepy", seconds=30)
    await wait_for_status(handle, "running")
    started = time.monotonic()
    node.stop()
    await asyncio.wait_for(running, 10)
    assert time.monotonic() - started < 5
    assert (await handle.status()).status == "queued", "handed back to its queue"


async def test_a_cancel_that_lands_before_the_attempt_starts_still_ends_it(
    client: Client, settings: Settings
) -> None:
    """The cancel message can arrive between the fetch (status 'running') and the
    attempt's first step: cancelling a task that has not started skips its body,
    its bookkeeping with it. The attempt must still end 'cancelled' and free its slot."""
    async with running_node([Toolbox], settings) as node:
        start = node._start

        def start_then_cancel_at_once(job: Any) -> None:
            start(job)
            node._cancel_running(job.task_id)  # before the attempt's task ever ran

        node._start = start_then_cancel_at_once  # type: ignore[method-assign]
        handle = await client.submit("sleepy", seconds=30)
        with pytest.raises(TaskCancelled):
            await handle.result(timeout=5)
        node._start = start  # type: ignore[method-assign]
        assert await client.call("echo", value=1) == 1
        assert not node._running, "the cancelled attempt gave its slot back"
