"""Durable sagas: steps in order, compensations in reverse, resumed after the
coordinating node is killed (real processes, real engine)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from playwright.async_api import expect
from typer.testing import CliRunner

from shoal import Client, ConfigurationError, Saga, SagaFailed, SagaNotFound, SagaStep
from shoal.cli import app
from shoal.coordination.saga_coordinator import Coordinator, StaleCoordinator
from shoal.errors import ResultTimeout, SerializationError
from shoal.settings import Settings
from tests.conftest import eventually, node_process, running_node
from tests.gateways import serving
from tests.saga_app import Steps, Wallet, done_key, gate_key, started_key
from tests.test_dashboard import CHROMIUM, dashboard
from tests.test_gateway_api import error_of, http


async def done(client: Client) -> list[str]:
    return [d.decode() for d in await client.redis.lrange(done_key(client.keys.prefix), 0, -1)]


async def open_gate(client: Client, name: str) -> None:
    await client.redis.rpush(gate_key(client.keys.prefix, name), "open")


def booking(*items: str, failing: str | None = None) -> Saga:
    saga = Saga("booking")
    for item in items:
        saga.step("reserve", {"item": item}, name=item, compensate="release", key_arg="key")
    if failing:
        saga.step("explode", {"item": failing}, name=failing, compensate="release")
    return saga


async def test_a_saga_runs_its_steps_in_order_and_returns_their_results(
    client: Client, settings: Settings
) -> None:
    saga = booking("flight", "hotel").step("combine", {"item": "trip"}, results_arg="earlier")
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        results = await handle.result(timeout=20)
    assert results == {
        "flight": {"item": "flight", "key": f"{handle.id}:0"},
        "hotel": {"item": "hotel", "key": f"{handle.id}:1"},
        "combine": ["flight", "hotel"],  # the results of the steps before it
    }
    assert await done(client) == ["reserve:flight", "reserve:hotel", "combine:trip"]
    info = await handle.status()
    assert info.status == "succeeded" and [s.status for s in info.steps] == ["succeeded"] * 3
    assert [e.event for e in info.log] == [
        "created", "coordinating", "step_started", "step_succeeded", "step_started",
        "step_succeeded", "step_started", "step_succeeded", "succeeded",
    ]  # fmt: skip


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
        status = await client.status(info.steps[0].compensation_task)
    assert status.parent == info.coordinator  # (the dashboard shows steps under it)
    key = f"{handle.id}:0"
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
    key = f"{handle.id}:0"
    assert state == {"seen": [f"credit:{key}", f"debit:{key}"], "balance": 0}
    assert (await handle.status()).steps[0].result == 10


async def test_a_compensation_that_keeps_failing_leaves_the_saga_stuck_not_skipped(
    client: Client, settings: Settings
) -> None:
    saga = Saga("stuck", compensation_attempts=3)
    saga.step("reserve", {"item": "a"}, name="a", compensate="release")
    saga.step("reserve", {"item": "b"}, name="b", compensate="refuse")
    saga.step("explode", {"item": "c"}, name="c")
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.status == "compensation_failed"
    # b's compensation was tried 3 times; a's was never run after it: nothing is
    # skipped, the saga stops where an operator must look
    assert await done(client) == ["reserve:a", "reserve:b"] + ["refuse:b"] * 3
    info = await handle.status()
    assert [s.status for s in info.steps] == ["succeeded", "compensation_failed", "failed"]
    assert info.error is not None and "compensation of step 'b' failed" in info.error
    assert [s.status for s in await client.sagas.list(status="compensation_failed")] == [
        "compensation_failed"
    ]


async def test_cancelling_a_saga_cancels_its_running_step_and_rolls_back(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step("gated", {"item": "b", "gate": "never"}, compensate="release")
    saga.step("reserve", {"item": "c"})
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        await eventually(
            lambda: client.redis.lrange(started_key(client.keys.prefix), 0, -1), "step b runs"
        )
        assert await handle.cancel() == "cancelling"
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
        assert await handle.cancel() == "already_cancelled"
    assert failed.value.status == "cancelled"
    assert await done(client) == ["reserve:a", "release:a"]  # b never completed, c never ran
    info = await handle.status()
    assert info.cancel_requested and [s.status for s in info.steps] == [
        "compensated", "failed", "pending"
    ]  # fmt: skip


async def test_a_saga_past_its_timeout_is_rolled_back(client: Client, settings: Settings) -> None:
    saga = Saga("slow", timeout=0.5).step("reserve", {"item": "a"}, compensate="release")
    saga.step("gated", {"item": "b", "gate": "never"})
    async with running_node([Steps], settings):
        handle = await client.sagas.start(saga)
        with pytest.raises(SagaFailed) as failed:
            await handle.result(timeout=20)
    assert failed.value.status == "compensated" and "timeout" in failed.value.message
    assert await done(client) == ["reserve:a", "release:a"]


async def test_a_step_of_a_capability_no_node_ever_hosted_fails_the_saga(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step("no_such_capability", {"x": 1}, name="ghost")
    async with running_node([Steps], settings):
        with pytest.raises(SagaFailed) as failed:
            await (await client.sagas.start(saga)).result(timeout=20)
    assert failed.value.step == "ghost" and "NotHosted" in failed.value.message
    assert await done(client) == ["reserve:a", "release:a"]


async def test_starting_with_a_saga_id_twice_starts_it_once(
    client: Client, settings: Settings
) -> None:
    async with running_node([Steps], settings):
        first = await client.sagas.start(booking("a"), saga_id="order-42")
        again = await client.sagas.start(booking("a"), saga_id="order-42")
        assert (first.is_new, again.is_new) == (True, False)
        assert await again.result(timeout=20) == {"a": {"item": "a", "key": "order-42:0"}}
    assert await done(client) == ["reserve:a"]
    listed = await client.sagas.list()
    assert [(s.id, s.status) for s in listed] == [("order-42", "succeeded")]


async def test_a_superseded_coordinator_cannot_write_to_the_log(client: Client) -> None:
    handle = await client.sagas.start(booking("a"))  # no node: it stays pending
    with pytest.raises(ResultTimeout):
        await handle.wait(timeout=0.2)

    def run(token: int) -> Coordinator:
        return Coordinator(client, handle.id, token=token, node="n", task_id="t", traceparent=None)

    await run(5)._log("resumed")
    with pytest.raises(StaleCoordinator):
        await run(4)._log("resumed")  # a paused node's run, woken after a takeover
    assert [e.event for e in (await handle.status()).log] == ["created", "resumed"]


async def test_bad_definitions_fail_at_once_saying_what_to_do(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="no steps"):
        await client.sagas.start(Saga("empty"))
    with pytest.raises(ConfigurationError, match="two steps are named 'reserve'"):
        Saga("twice").step("reserve").step("reserve")
    with pytest.raises(SerializationError):
        Saga("bad").step("reserve", {"item": object()})
    with pytest.raises(ConfigurationError, match="clashes with the task option"):
        SagaStep(capability="reserve", key_arg="timeout")
    with pytest.raises(ConfigurationError, match="capability name"):
        Saga("bad").step("not a capability")
    with pytest.raises(
        ConfigurationError, match=r"Unexpected keyword argument 'compensation'.*compensate_args"
    ):
        Saga("bad").step("reserve", compensation="release")
    with pytest.raises(ConfigurationError, match="saga timeout"):
        Saga("bad", timeout=0)
    with pytest.raises(SagaNotFound):
        await client.sagas.get("nope")


async def test_the_saga_resumes_on_another_node_when_its_coordinator_is_killed(
    client: Client, settings: Settings
) -> None:
    """SIGKILL the node coordinating the saga while a step runs: the other node takes
    the coordination over from the log; each step completes exactly once and the
    compensations run in reverse when the last step fails."""
    saga = booking("a")
    saga.step("gated", {"item": "b", "gate": "g"}, name="b", compensate="release",
              compensate_args={"item": "b"})  # fmt: skip
    saga.step("reserve", {"item": "c"}, name="c", compensate="release")
    saga.step("explode", {"item": "d"}, name="d")
    with (
        node_process(settings, "tests.saga_app", "--name", "n1") as n1,
        node_process(settings, "tests.saga_app", "--name", "n2") as n2,
    ):
        await client.wait_for_hosts("shoal.saga", 2, timeout=30)
        handle = await client.sagas.start(saga)
        await eventually(
            lambda: client.redis.lrange(started_key(client.keys.prefix), 0, -1), "step b runs"
        )
        coordinator = (await handle.status()).coordinator
        assert coordinator is not None
        doomed = (await client.status(coordinator)).node
        victim, survivor = (n1, "n2") if doomed == "n1" else (n2, "n1")
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
    started = [e.step for e in info.log if e.event == "step_started"]
    assert started == [0, 1, 2, 3]  # the resumed coordinator did not submit b again


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


# --- the HTTP API -------------------------------------------------------------------------


async def test_the_http_api_lists_shows_and_cancels_sagas(
    client: Client, settings: Settings
) -> None:
    saga = booking("a").step("gated", {"item": "b", "gate": "shut"}, compensate="release")
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
            await saga_row.locator('button[data-step="a"]').click()
            await expect(page.locator("#detail-id")).to_have_text(step_task or "?")
            part = page.locator("#detail .saga-part")
            await expect(part).to_contain_text("compensation of step a (compensated)")
            await expect(part).to_contain_text("step 'b' failed")
            await board.screenshot("saga")
