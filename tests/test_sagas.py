"""Durable sagas: steps in order, compensations in reverse, driven by each node's
SagaRunner (no task slot) and resumed from the log when the runner's node dies,
stops or is paused past its lock (real processes, real engine)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from playwright.async_api import expect
from typer.testing import CliRunner

from shoal import Client, ConfigurationError, Saga, SagaFailed, SagaNotFound, SagaStep
from shoal.cli import app
from shoal.coordination.lock import holder_of
from shoal.coordination.saga_coordinator import Coordinator, StaleCoordinator
from shoal.coordination.saga_runner import SagaRunner
from shoal.errors import SerializationError
from shoal.options import TaskOptions
from shoal.settings import Settings
from tests.conftest import REPO, eventually, node_env, node_process, running_node, stop_process
from tests.gateways import serving
from tests.saga_app import Steps, Wallet, done_key, fixed_key, gate_key, started_key
from tests.test_dashboard import CHROMIUM, dashboard
from tests.test_gateway_api import error_of, http


async def done(client: Client) -> list[str]:
    return [d.decode() for d in await client.redis.lrange(done_key(client.keys.prefix), 0, -1)]


async def open_gate(client: Client, name: str) -> None:
    await client.redis.rpush(gate_key(client.keys.prefix, name), "open")


async def step_runs(client: Client) -> Any:
    return await eventually(
        lambda: client.redis.lrange(started_key(client.keys.prefix), 0, -1), "the step runs"
    )


def booking(*items: str, failing: str | None = None) -> Saga:
    saga = Saga("booking")
    for item in items:
        saga.step("reserve", {"item": item}, name=item, compensate="release", key_arg="key")
    if failing:
        saga.step("explode", {"item": failing}, name=failing, compensate="release")
    return saga


@contextlib.asynccontextmanager
async def saga_runner(
    client: Client, name: str = "r1", **options: Any
) -> AsyncIterator[SagaRunner]:
    """A SagaRunner on this loop (as a node runs one), stopped on exit."""
    sagas, stopping = SagaRunner(client, name, **options), asyncio.Event()
    task = asyncio.create_task(sagas.run(stopping))
    try:
        yield sagas
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


@contextlib.contextmanager
def runner_process(settings: Settings, name: str) -> Iterator[subprocess.Popen[str]]:
    """tests/saga_procs.py: a SagaRunner alone in its own process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.saga_procs", name], cwd=REPO, env=node_env(settings),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        stop_process(proc)  # type: ignore[arg-type]
        if proc.stdout is not None:
            proc.stdout.close()


async def test_a_node_with_one_slot_runs_a_saga_its_steps_in_order_with_their_results(
    client: Client, settings: Settings
) -> None:
    """The saga's driver takes no task slot: concurrency=1 is enough for it and its
    steps (a coordinator task waiting on its step would hold the only slot)."""
    saga = booking("flight", "hotel").step("combine", {"item": "trip"}, results_arg="earlier")
    async with running_node([Steps], settings, concurrency=1):
        handle = await client.sagas.start(saga)
        results = await handle.result(timeout=20)
    assert results == {
        "flight": {"item": "flight", "key": f"saga:{handle.id}:0"},
        "hotel": {"item": "hotel", "key": f"saga:{handle.id}:1"},
        "combine": ["flight", "hotel"],  # the results of the steps before it
    }
    assert await done(client) == ["reserve:flight", "reserve:hotel", "combine:trip"]
    info = await handle.status()
    assert info.status == "succeeded" and [s.status for s in info.steps] == ["succeeded"] * 3
    assert [e.event for e in info.log] == [
        "created", "coordinating",
        *["step_submitting", "step_started", "step_succeeded"] * 3, "succeeded",
    ]  # fmt: skip
    # the task id logged before the submit is the step's task
    assert [e.task for e in info.log if e.event == "step_submitting"] == [
        s.task for s in info.steps
    ]
    assert info.coordinator is not None  # the node whose runner drove it
    record_key, _, _, active, _ = client.keys.saga(handle.id)
    assert 0 < await client.redis.pttl(record_key) <= settings.retention * 1000
    assert await client.redis.zscore(active, handle.id) is None


async def test_many_sagas_at_once_on_a_small_node(client: Client, settings: Settings) -> None:
    """Twelve 3-step sagas, one slot, a runner capped at 3 sagas: all complete."""
    async with running_node([Steps], settings, concurrency=1, max_sagas=3) as node:
        handles = [await client.sagas.start(booking(f"a{n}", f"b{n}", f"c{n}")) for n in range(12)]
        results = await asyncio.gather(*(h.result(timeout=40) for h in handles))
        assert node.in_flight == 0
    assert [sorted(r) for r in results] == [[f"a{n}", f"b{n}", f"c{n}"] for n in range(12)]
    assert sorted(await done(client)) == sorted(f"reserve:{x}{n}" for n in range(12) for x in "abc")


@pytest.mark.topology
async def test_a_failing_step_compensates_the_completed_steps_in_reverse(
    client: Client, settings: Settings
) -> None:
    saga = booking("a", "b").step("reserve", {"item": "c"}, name="c")  # c: nothing to undo
    saga.step("explode", {"item": "d"}, name="d", compensate="release")
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.status == "compensated" and failed.value.step == "d"
    assert "d cannot be booked" in failed.value.message
    # the failed step is not compensated (it did not complete); a, b in reverse
    assert await done(client) == [
        "reserve:a", "reserve:b", "reserve:c", "release:b", "release:a",
    ]  # fmt: skip
    info = await handle.status()
    assert [s.status for s in info.steps] == ["compensated", "compensated", "succeeded", "failed"]
    assert info.error is not None and "step 'd' failed" in info.error


async def test_a_compensation_receives_the_steps_key_and_result(
    client: Client, settings: Settings
) -> None:
    saga = Saga("undo-args").step(
        "reserve", {"item": "x"}, compensate="release", key_arg="key", results_arg="seen"
    )
    saga.step("explode", {"item": "y"})
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed):
            await handle.result(timeout=20)
        info = await handle.status()
        assert info.steps[0].compensation_task is not None
        undo = await client.result(info.steps[0].compensation_task)
    key = f"saga:{handle.id}:0"
    assert undo == {"key": key, "seen": {"reserve": {"item": "x", "key": key}}}


async def test_a_step_can_be_an_agent_call_compensated_on_the_same_agent(
    client: Client, settings: Settings
) -> None:
    saga = Saga("pay").step(
        "credit", {"amount": 10}, agent="wallet/w1", compensate="debit", key_arg="key"
    )
    saga.step("explode", {"item": "x"})
    async with running_node([Steps, Wallet], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed):
            await handle.result(timeout=20)
        state = await client.agent_state("wallet/w1")
    key = f"saga:{handle.id}:0"
    assert state == {"seen": [f"credit:{key}", f"debit:{key}"], "balance": 0}
    assert (await handle.status()).steps[0].result == 10


async def test_a_failing_compensation_leaves_the_saga_stuck_visible_until_retried(
    client: Client, settings: Settings
) -> None:
    saga = Saga("stuck", compensation_attempts=2)
    saga.step("reserve", {"item": "a"}, name="a", compensate="release")
    saga.step("reserve", {"item": "b"}, name="b", compensate="mend")
    saga.step("explode", {"item": "c"}, name="c")
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
        assert failed.value.status == "compensation_failed"
        # a's compensation never ran after b's failed: nothing skipped, the saga stops
        assert await done(client) == ["reserve:a", "reserve:b"]
        info = await handle.status()
        assert [s.status for s in info.steps] == ["succeeded", "compensation_failed", "failed"]
        assert info.error is not None and "compensation of step 'b' failed" in info.error
        record_key, _, _, active, _ = client.keys.saga(handle.id)
        assert await client.redis.pttl(record_key) == -1  # kept until an operator acts
        assert await client.redis.zscore(active, handle.id) is None  # no runner drives it
        listed = await client.sagas.list(status="compensation_failed")
        assert [(s.id, s.steps[1].status) for s in listed] == [(handle.id, "compensation_failed")]
        with pytest.raises(ConfigurationError, match="only a saga stuck"):
            await client.sagas.retry_compensation((await client.sagas.start(booking("z"))).id)
        # the operator fixes the cause and retries: b's compensation, then a's
        await client.redis.set(fixed_key(client.keys.prefix), "1")
        assert await client.sagas.retry_compensation(handle.id) == "retrying"
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.status == "compensated"
    assert (await done(client))[-2:] == ["mend:b", "release:a"]
    assert await client.redis.pttl(record_key) > 0  # ended: expires after the retention


async def test_a_cancel_while_a_step_runs_compensates_the_step_if_it_completed_anyway(
    client: Client, settings: Settings
) -> None:
    """The step's handler does its side effect although its task is cancelled (its
    task ends 'cancelled'): its outcome is unknown, so it is compensated."""
    saga = booking("a").step("stubborn", {"item": "b", "gate": "never"}, name="b",
                             compensate="release", compensate_args={"item": "b"})  # fmt: skip
    saga.step("reserve", {"item": "c"}, name="c")
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        await step_runs(client)
        assert await handle.cancel() == "cancelling"
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
        assert await handle.cancel() == "already_cancelled"
    assert failed.value.status == "cancelled" and failed.value.step == "b"
    assert await done(client) == ["reserve:a", "stubborn:b", "release:b", "release:a"]
    info = await handle.status()
    assert info.cancel_requested and [s.status for s in info.steps] == [
        "compensated", "compensated", "pending",
    ]  # fmt: skip
    assert "step_unknown" in [e.event for e in info.log if e.step == 1]


async def test_a_cancel_during_compensation_changes_nothing(
    client: Client, settings: Settings
) -> None:
    saga = Saga("late").step(
        "reserve", {"item": "a"}, compensate="gated", compensate_args={"item": "a", "gate": "u"}
    )
    saga.step("explode", {"item": "b"})
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        await step_runs(client)  # the compensation waits at its gate
        assert await handle.cancel() == "cancelling"
        await open_gate(client, "u")
        info = await handle.wait(timeout=20)
    assert info.status == "compensated" and info.cancel_requested  # it failed first
    assert info.error is not None and "step 'explode' failed" in info.error
    assert await done(client) == ["reserve:a", "gated:a"]


async def test_a_saga_past_its_timeout_is_rolled_back(client: Client, settings: Settings) -> None:
    saga = Saga("slow", timeout=0.5).step("reserve", {"item": "a"}, compensate="release")
    saga.step("gated", {"item": "b", "gate": "never"})
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.status == "compensated" and "timeout" in failed.value.message
    assert await done(client) == ["reserve:a", "release:a"]


async def test_capabilities_no_node_ever_hosted_fail_the_saga(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step("no_such_capability", {"x": 1}, name="ghost")
    unhosted_undo = Saga("u").step("reserve", {"item": "u"}, compensate="no_such_undo")
    async with running_node([Steps], settings):
        with pytest.raises(SagaFailed) as failed:
            await (await client.sagas.start(saga)).result(timeout=20)
        with pytest.raises(SagaFailed) as undo:
            await (await client.sagas.start(unhosted_undo)).result(timeout=20)
    assert failed.value.step == "ghost" and "NotHosted" in failed.value.message
    # a compensation nobody hosts: the saga fails before its first step runs
    assert undo.value.step == "reserve" and "no_such_undo" in undo.value.message
    assert await done(client) == ["reserve:a", "release:a"]


async def test_starting_with_a_saga_id_twice_starts_it_once(
    client: Client, settings: Settings
) -> None:
    async with running_node([Steps], settings):
        first = await client.sagas.start(booking("a"), saga_id="order-42")
        again = await client.sagas.start(booking("a"), saga_id="order-42")
        assert (first.is_new, again.is_new) == (True, False)
        assert await again.result(timeout=20) == {"a": {"item": "a", "key": "saga:order-42:0"}}
    assert await done(client) == ["reserve:a"]
    listed = await client.sagas.list()
    assert [(s.id, s.status) for s in listed] == [("order-42", "succeeded")]


async def test_bad_definitions_fail_at_once_saying_what_to_do(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="no steps"):
        await client.sagas.start(Saga("empty"))
    with pytest.raises(ConfigurationError, match="two steps are named 'reserve'"):
        Saga("twice").step("reserve").step("reserve")
    with pytest.raises(SerializationError):
        Saga("bad").step("reserve", {"item": object()})
    with pytest.raises(ConfigurationError, match="clashes with the task option"):
        SagaStep(capability="reserve", key_arg="timeout")
    with pytest.raises(ConfigurationError, match="also one of the step's compensate_args"):
        SagaStep(capability="reserve", compensate_args={"key": 1}, key_arg="key")
    with pytest.raises(ConfigurationError, match="key_arg and results_arg are the same"):
        SagaStep(capability="reserve", key_arg="k", results_arg="k")
    with pytest.raises(ConfigurationError, match="capability name"):
        Saga("bad").step("not a capability")
    with pytest.raises(
        ConfigurationError, match=r"Unexpected keyword argument 'compensation'.*compensate_args"
    ):
        Saga("bad").step("reserve", compensation="release")
    with pytest.raises(ConfigurationError, match="saga timeout"):
        Saga("bad", timeout=0)
    with pytest.raises(ConfigurationError, match="saga id"):
        await client.sagas.start(booking("a"), saga_id="x:0")  # ':' is the keys' separator
    with pytest.raises(SagaNotFound):
        await client.sagas.get("nope")


# --- resuming ----------------------------------------------------------------------------


async def crashed_after_submitting(client: Client, saga: Saga, *, submit: bool) -> tuple[str, str]:
    """A saga whose runner logged step 0's task id (``step_submitting``), then — if
    ``submit`` — submitted that task, then died (its lock released, as a lapse would).
    The saga's id and the step's task id."""
    handle = await client.sagas.start(saga)
    lock = client.lock(f"saga:{handle.id}", ttl=3, wait=0, holder="crashed")
    token = await lock.acquire()
    run = Coordinator(client, handle.id, token=token, node="crashed")
    await run._log("coordinating", status="running")
    task_id = client.keys.new_task_id(0 if client.keys.groups == 1 else 1)
    await run._log("step_submitting", step=0, task=task_id, running=task_id)
    if submit:
        step = saga.steps[0]
        args = {**step.args, "key": f"saga:{handle.id}:0"}
        await client.submit_arguments(step.capability, args, TaskOptions.build(), _task_id=task_id)
    await lock.release()
    return handle.id, task_id


async def test_a_runner_resumes_a_step_logged_before_its_submit_and_runs_it_once(
    client: Client, settings: Settings
) -> None:
    """The crash window between logging a step's task id and logging it started:
    the resumed runner finds the task by its logged id (submitted or not)."""
    async with running_node([Steps], settings, run_sagas=False):
        ran, ran_task = await crashed_after_submitting(client, booking("a", "b"), submit=True)
        await eventually(lambda: client.redis.lrange(done_key(client.keys.prefix), 0, -1))
        never, never_task = await crashed_after_submitting(client, booking("x", "y"), submit=False)
        async with saga_runner(client):
            first = await client.sagas.result(ran, timeout=20)
            second = await client.sagas.result(never, timeout=20)
    assert sorted(first) == ["a", "b"] and sorted(second) == ["x", "y"]
    assert sorted(await done(client)) == ["reserve:a", "reserve:b", "reserve:x", "reserve:y"]
    assert (await client.sagas.get(ran)).steps[0].task == ran_task
    assert (await client.sagas.get(never)).steps[0].task == never_task  # submitted with it


async def test_a_cancel_in_the_crash_window_finds_the_step_and_compensates_it(
    client: Client, settings: Settings
) -> None:
    async with running_node([Steps], settings, run_sagas=False):
        saga_id, task_id = await crashed_after_submitting(client, booking("a", "b"), submit=True)
        await client.result(task_id, timeout=10)  # the step completed meanwhile
        assert await client.sagas.cancel(saga_id) == "cancelling"
        async with saga_runner(client):
            with pytest.raises(SagaFailed) as failed:
                await client.sagas.result(saga_id, timeout=20)
    assert failed.value.status == "cancelled"
    assert await done(client) == ["reserve:a", "release:a"]  # found, and undone
    info = await client.sagas.get(saga_id)
    assert [s.status for s in info.steps] == ["compensated", "pending"]


async def test_a_step_whose_task_record_expired_is_maybe_done_and_compensated(
    settings: Settings,
) -> None:
    """A runner resuming after the step's task record expired cannot know the
    outcome (nor resubmit: it may have run): the step counts as done."""
    short = dataclasses.replace(settings, retention=1.5)
    async with Client(settings=short) as client, running_node([Steps], short, run_sagas=False):
        saga_id, task_id = await crashed_after_submitting(client, booking("a", "b"), submit=True)
        await client.result(task_id, timeout=10)
        task_key = client.keys.task(task_id)
        await eventually(
            lambda: _gone(client, task_key), "the step's task record expires", timeout=10
        )
        async with saga_runner(client):
            info = await client.sagas.wait(saga_id, timeout=20)
        assert await done(client) == ["reserve:a", "release:a"]  # b never ran
    assert info.status == "compensated" and info.error is not None
    assert "may have run" in info.error
    assert [s.status for s in info.steps] == ["compensated", "pending"]
    assert [e.step for e in info.log if e.event == "step_unknown"] == [0]


async def _gone(client: Client, key: str) -> bool:
    return not await client.redis.exists(key)


async def test_the_saga_resumes_on_another_node_when_its_runners_node_is_killed(
    client: Client, settings: Settings
) -> None:
    """SIGKILL the node holding the saga's lock while a step runs: the other node's
    runner takes the saga over when the lock lapses; each step completes exactly
    once and the compensations run in reverse when the last step fails."""
    saga = booking("a")
    saga.step("gated", {"item": "b", "gate": "g"}, name="b", compensate="release",
              compensate_args={"item": "b"})  # fmt: skip
    saga.step("reserve", {"item": "c"}, name="c", compensate="release")
    saga.step("explode", {"item": "d"}, name="d")
    with (
        node_process(settings, "tests.saga_app", "--name", "n1") as n1,
        node_process(settings, "tests.saga_app", "--name", "n2") as n2,
    ):
        await client.wait_for_hosts("gated", 2, timeout=30)
        handle = await client.sagas.start(saga)
        await step_runs(client)
        holder = await holder_of(client, f"saga:{handle.id}")
        assert holder is not None and holder.holder in ("n1", "n2")
        victim, survivor = (n1, "n2") if holder.holder == "n1" else (n2, "n1")
        victim.send_signal(signal.SIGKILL)
        victim.wait()

        async def resumed() -> Any:
            log = (await handle.status()).log
            return [e for e in log if e.event == "resumed" and e.node == survivor]

        await eventually(resumed, "the survivor resumes the saga", timeout=20)
        await open_gate(client, "g")
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=30)
    assert failed.value.status == "compensated" and failed.value.step == "d"
    assert await done(client) == [
        "reserve:a", "gated:b", "reserve:c", "release:c", "release:b", "release:a",
    ]  # fmt: skip
    info = await handle.status()
    assert [e.step for e in info.log if e.event == "step_submitting"] == [0, 1, 2, 3]
    assert [e.step for e in info.log if e.event == "step_started"] == [0, 1, 2, 3]


async def test_a_paused_runner_whose_lock_was_taken_over_is_refused_and_stops(
    client: Client, settings: Settings
) -> None:
    """SIGSTOP the runner driving a saga past its lock's ttl: another runner takes
    the lock (a larger fencing token) and finishes the saga; the paused one, woken,
    writes nothing more and stops driving it."""
    saga = booking("a").step("gated", {"item": "b", "gate": "p"}, name="b")
    async with running_node([Steps], settings, run_sagas=False):
        with runner_process(settings, "r1") as r1:
            handle = await client.sagas.start(saga)
            await step_runs(client)
            first = await holder_of(client, f"saga:{handle.id}")
            assert first is not None and first.holder == "r1"
            r1.send_signal(signal.SIGSTOP)
            try:
                with runner_process(settings, "r2"):
                    taken = await eventually(
                        lambda: holder_of(client, f"saga:{handle.id}"), "r2 takes it", 15
                    )
                    while taken.holder != "r2":
                        taken = await eventually(lambda: holder_of(client, f"saga:{handle.id}"))
                    assert taken.token > first.token
                    await open_gate(client, "p")
                    assert sorted(await handle.result(timeout=20)) == ["a", "b"]
            finally:
                r1.send_signal(signal.SIGCONT)
            assert r1.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(r1.stdout.readline), 15)
            assert handle.id in line and ("lost" in line or "took over" in line or "ended" in line)
    info = await handle.status()
    taken_at = next(i for i, e in enumerate(info.log) if e.event == "resumed")
    assert {e.node for e in info.log[taken_at:] if e.node} == {"r2"}
    assert await done(client) == ["reserve:a", "gated:b"]
    with pytest.raises(StaleCoordinator):  # and the log itself refuses its token
        await Coordinator(client, handle.id, token=first.token, node="r1")._log("resumed")


async def test_a_stopping_runner_hands_its_sagas_over_at_once(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step("gated", {"item": "b", "gate": "h"}, name="b")
    async with running_node([Steps], settings, run_sagas=False):
        async with saga_runner(client, "first") as first:
            handle = await client.sagas.start(saga)
            await step_runs(client)
            assert handle.id in first.driving
        assert await holder_of(client, f"saga:{handle.id}") is None  # released, not lapsed
        async with saga_runner(client, "second"):
            await eventually(lambda: holder_of(client, f"saga:{handle.id}"), "taken at once", 2)
            await open_gate(client, "h")
            assert sorted(await handle.result(timeout=20)) == ["a", "b"]
    assert await done(client) == ["reserve:a", "gated:b"]


# --- the CLI ------------------------------------------------------------------------------

runner = CliRunner()


def sagas_cli(settings: Settings, *args: str) -> Result:
    """``shoal sagas ARGS`` in this process, on the test's engine and namespace."""
    assert settings.url
    return runner.invoke(
        app, ["sagas", *args, "--redis", settings.url, "--namespace", settings.namespace]
    )


async def test_shoal_sagas_list_and_show_tell_each_sagas_steps_and_log(
    client: Client, settings: Settings
) -> None:
    async with running_node([Steps], settings):
        ok = await client.sagas.start(booking("a"), saga_id="fine")
        await ok.wait(timeout=20)
        bad = await client.sagas.start(booking("x", failing="y"), saga_id="broken")
        await bad.wait(timeout=20)
    listed = await asyncio.to_thread(sagas_cli, settings, "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [(s["id"], s["status"]) for s in json.loads(listed.stdout)] == [
        ("broken", "compensated"), ("fine", "succeeded"),
    ]  # fmt: skip
    only = await asyncio.to_thread(sagas_cli, settings, "list", "--status", "succeeded")
    assert "fine" in only.stdout and "broken" not in only.stdout
    shown = await asyncio.to_thread(sagas_cli, settings, "show", "broken", "--json")
    data = json.loads(shown.stdout)
    assert [s["status"] for s in data["steps"]] == ["compensated", "failed"]
    assert [e["event"] for e in data["log"]][-3:] == [
        "compensation_started", "compensation_succeeded", "compensated",
    ]  # fmt: skip
    table = await asyncio.to_thread(sagas_cli, settings, "show", "broken")
    assert table.exit_code == 0, table.output
    assert "compensated" in table.stdout and "y cannot be booked" in table.stdout
    missing = await asyncio.to_thread(sagas_cli, settings, "show", "nope")
    assert isinstance(missing.exception, SagaNotFound)
    again = await asyncio.to_thread(sagas_cli, settings, "cancel", "fine")
    assert again.exit_code == 0 and again.stdout.strip() == "already_succeeded"
    cancel_missing = await asyncio.to_thread(sagas_cli, settings, "cancel", "nope")
    assert isinstance(cancel_missing.exception, SagaNotFound)
    not_stuck = await asyncio.to_thread(sagas_cli, settings, "retry-compensation", "broken")
    assert isinstance(not_stuck.exception, ConfigurationError)
    assert "compensated, not compensation_failed" in str(not_stuck.exception)


# --- the HTTP API -------------------------------------------------------------------------


async def test_the_http_api_lists_shows_and_cancels_sagas(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step(
        "gated", {"item": "b", "gate": "shut"}, compensate="release", compensate_args={"item": "b"}
    )
    async with running_node([Steps], settings), serving(settings) as url, http(url) as api:
        handle = await client.sagas.start(saga, saga_id="via-http")
        await eventually(
            lambda: client.redis.lrange(started_key(client.keys.prefix), 0, -1), "step b runs"
        )
        listed = (await api.get("/v1/sagas", params={"status": "running"})).json()
        assert [(s["id"], s["step"], s["log"]) for s in listed] == [("via-http", 1, [])]
        shown = (await api.get("/v1/sagas/via-http")).json()
        assert [s["status"] for s in shown["steps"]] == ["succeeded", "running"]
        assert shown["log"][0]["event"] == "created"
        cancel = await api.post("/v1/sagas/via-http/cancel")
        assert cancel.json() == {"outcome": "cancelling"}
        assert (await handle.wait(timeout=20)).status == "cancelled"
        again = await api.post("/v1/sagas/via-http/cancel")
        assert again.json() == {"outcome": "already_cancelled"}
        error_of(await api.get("/v1/sagas/nope"), 404, "SagaNotFound")
        retry = await api.post("/v1/sagas/via-http/retry-compensation")
        error_of(retry, 422, "ConfigurationError")
        error_of(await api.post("/v1/sagas/nope/retry-compensation"), 404, "SagaNotFound")
        assert (await api.get("/v1/sagas", params={"status": "sideways"})).status_code == 422


# --- the dashboard ------------------------------------------------------------------------


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser at {CHROMIUM}")
async def test_the_dashboard_shows_sagas_and_a_step_tasks_saga(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    async with running_node([Steps], settings), serving(settings) as url:
        handle = await client.sagas.start(booking("a", failing="b"), saga_id="dash")
        info = await handle.wait(timeout=20)
        step_task = info.steps[0].compensation_task
        async with dashboard(url, tmp_path) as board:
            page = board.page
            saga_row = page.locator('#sagas-body tr[data-saga-id="dash"]')
            await expect(saga_row).to_have_attribute("data-status", "compensated")
            await expect(saga_row).to_contain_text("a: compensated")
            await expect(saga_row).to_contain_text("b: failed")
            pill_b = saga_row.locator(".pill", has_text="b: failed")
            await expect(pill_b).to_have_attribute("title", re.compile("b cannot be booked"))
            await saga_row.locator('button[data-step="a"]').click()
            await expect(page.locator("#detail-id")).to_have_text(step_task or "?")
            part = page.locator("#detail .saga-part")
            await expect(part).to_contain_text("compensation of step a (compensated)")
            await expect(part).to_contain_text("step 'b' failed")
            await board.screenshot("saga")
