"""The `shoal` command, run as a user runs it (a subprocess), against the real engine."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoal import Client, Settings
from tests.agents import Toolbox
from tests.conftest import REPO, node_env, running_node, wait_for_status


async def shoal(
    settings: Settings | None, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", *args,
        cwd=REPO, env=env or (node_env(settings) if settings else dict(os.environ)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "command",
    [[], ["node"], ["submit"], ["task"], ["dlq"], ["dlq", "list"], ["dlq", "redrive"],
     ["engine"], ["engine", "start"], ["engine", "stop"], ["engine", "status"]],
)  # fmt: skip
async def test_every_command_has_help(command: list[str]) -> None:
    code, out, _ = await shoal(None, *command, "--help")
    assert code == 0 and "Usage" in out


async def test_submit_prints_the_id_and_says_when_no_node_hosts_it(
    settings: Settings, client: Client
) -> None:
    code, out, err = await shoal(settings, "submit", "echo", "value=42")
    assert code == 0
    task_id = out.strip()
    assert len(task_id) == 28
    assert "no live node hosts 'echo'" in err
    info = await client.status(task_id)
    assert info.status == "queued"
    assert await client.cancel(task_id) == "cancelled"


async def test_submit_wait_prints_the_result_as_json(settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        code, out, _ = await shoal(settings, "submit", "add", "a=2", "b=40", "--wait")
    assert code == 0
    assert json.loads(out)["sum"] == 42


async def test_submit_wait_of_a_failing_task_exits_3_with_one_line(settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        code, _, err = await shoal(settings, "submit", "permanent", "--wait")
    assert code == 3
    assert "PermanentError: no point retrying" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_task_shows_status_result_attempts_and_events(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("report", steps=2)
        await handle.result(timeout=10)
    code, out, _ = await shoal(settings, "task", handle.id, "--events")
    assert code == 0
    assert "succeeded" in out and '"reported"' in out and "1 of 3" in out
    assert out.count("progress") == 2 and "done" in out
    code, out, _ = await shoal(settings, "task", handle.id, "--json")
    assert json.loads(out)["status"] == "succeeded" and json.loads(out)["result"] == "reported"


async def test_task_of_an_unhosted_capability_says_no_node_hosts_it(
    settings: Settings, client: Client
) -> None:
    handle = await client.submit("nobody_hosts_this")
    code, out, _ = await shoal(settings, "task", handle.id)
    assert code == 0 and "no live node hosts 'nobody_hosts_this' yet" in out


async def test_dlq_list_and_redrive(settings: Settings, client: Client) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("always_fails")
        with pytest.raises(Exception, match="this never works"):
            await handle.result(timeout=10)
        code, out, _ = await shoal(settings, "dlq", "list", "always_fails")
        assert code == 0 and handle.id in out and "ValueError: this never works" in out
        code, out, _ = await shoal(settings, "dlq", "redrive", "always_fails")
        assert code == 0 and "re-queued 1 task(s)" in out and handle.id in out
        with pytest.raises(Exception, match="this never works"):
            await handle.result(timeout=10)
    code, out, _ = await shoal(settings, "dlq", "list", "echo")
    assert code == 0 and "no dead letters" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task", "not-an-id"], "is not a Shoal task id"),
        (["task", "0" * 28], "no task 0000000000000000000000000000"),
        (["submit", "echo", "novalue"], "is not key=value"),
        (["submit", "echo", "--priority", "urgent"], "use one of high, normal, low"),
        (["submit", "bad name"], "capability name 'bad name' is invalid"),
        (["dlq", "redrive", "echo", "0" * 28], "not in the dead-letter queue"),
    ],
)
async def test_bad_input_is_one_readable_line_and_exit_1(
    settings: Settings, args: list[str], message: str
) -> None:
    code, _, err = await shoal(settings, *args)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--app", "no_such_module"], "cannot import app module 'no_such_module'"),
        (["node", "--app", "json"], "module 'json' defines no Agent class"),
        (["node", "--app", "tests.broken_app"], "importing app module 'tests.broken_app' failed"),
    ],
)
async def test_node_with_a_bad_app_says_why_in_one_line(
    settings: Settings, args: list[str], message: str
) -> None:
    code, _, err = await shoal(settings, *args)
    assert code == 1 and message in err
    assert "Traceback" not in err


async def test_node_without_an_engine_says_so_in_one_line() -> None:
    env = {**os.environ, "SHOAL_REDIS_URL": "redis://127.0.0.1:1/0"}
    code, _, err = await shoal(None, "node", "--app", "tests.agents", env=env)
    assert code == 1 and "cannot reach the engine at redis://127.0.0.1:1/0" in err


async def test_unreachable_engine_is_one_line_with_the_masked_url() -> None:
    env = {**os.environ, "SHOAL_REDIS_URL": "redis://:pw@127.0.0.1:1/0"}
    code, _, err = await shoal(None, "submit", "echo", env=env)
    assert code == 1 and "cannot reach the engine at redis://:***@127.0.0.1:1/0" in err
    assert "pw@" not in err


async def test_debug_shows_the_traceback(settings: Settings) -> None:
    code, _, err = await shoal(settings, "--debug", "task", "not-an-id")
    assert code == 1 and "Traceback" in err


async def test_engine_start_status_stop(tmp_path: Path) -> None:
    data = str(tmp_path / "eng")
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_REDIS_URL"}
    code, out, _ = await shoal(None, "engine", "status", "--data-dir", data, env=env)
    assert code == 1 and "no engine running" in out
    code, out, _ = await shoal(None, "engine", "start", "--data-dir", data, env=env)
    assert code == 0 and "engine started: redis://:***@127.0.0.1:" in out
    try:
        code, out, _ = await shoal(None, "engine", "start", "--data-dir", data, env=env)
        assert code == 0 and "already running" in out
        code, out, _ = await shoal(None, "engine", "status", "--data-dir", data, env=env)
        assert code == 0 and "valkey" in out and "***" in out
        code, url, _ = await shoal(None, "engine", "status", "--url", "--data-dir", data, env=env)
        async with Client(url.strip()) as client:
            assert await client.redis.ping()
    finally:
        code, out, _ = await shoal(None, "engine", "stop", "--data-dir", data, env=env)
    assert code == 0 and "engine stopped" in out
    code, out, _ = await shoal(None, "engine", "stop", "--data-dir", data, env=env)
    assert "no engine was running" in out


async def test_cancel_command_cancels_and_reports(settings: Settings, client: Client) -> None:
    handle = await client.submit("echo", value=1)
    code, out, _ = await shoal(settings, "cancel", handle.id)
    assert code == 0 and out.strip() == "cancelled"
    code, out, _ = await shoal(settings, "cancel", handle.id)
    assert code == 0 and "already ended (cancelled)" in out


async def test_task_events_of_a_running_task_print_at_once(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("sleepy", seconds=30)
        await wait_for_status(handle, "running")
        code, out, _ = await shoal(settings, "task", handle.id, "--events")
        await handle.cancel()
    assert code == 0 and "running" in out


async def test_status_lists_nodes_and_queues(settings: Settings, client: Client) -> None:
    await client.submit("echo", value=1)
    async with running_node([Toolbox], settings, name="status-node"):
        code, out, _ = await shoal(settings, "status")
        assert code == 0
        assert "status-node" in out and "alive" in out and "echo" in out
        code, out, _ = await shoal(settings, "status", "--json")
    data = json.loads(out)
    assert [n["id"] for n in data["nodes"]] == ["status-node"]
    assert any(q["capability"] == "echo" for q in data["queues"])
