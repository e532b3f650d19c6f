"""`shoal call`, `tasks`, `task --follow`, `status --watch`, `dlq list` of every
capability, `bench`, the progress display, and where option values come from
(flag > SHOAL_<COMMAND>_<OPTION> > shoal.toml > default) — run as a user runs them
(subprocesses) against the real engine."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.console import Console

from shoal import Client, Settings
from shoal.cli import app
from shoal.cli_bench import table
from shoal.cli_progress import bar, follow_progress, wait_for_result
from tests.agents import Toolbox
from tests.conftest import REPO, node_env, running_node
from tests.stateful import Counter, Relay
from tests.test_cli import shoal


@pytest.mark.parametrize(
    "command", [["call"], ["tasks"], ["status"], ["bench"], ["dlq", "list"], ["cancel"]]
)
async def test_new_commands_have_help(command: list[str]) -> None:
    code, out, _ = await shoal(None, *command, "--help")
    assert code == 0 and "Usage" in out and "--json" in out


def test_every_engine_command_takes_the_same_engine_options() -> None:
    """--redis, --namespace and --data-dir, with the same help, on every command that
    talks to the engine; --json with the same help wherever it exists."""
    seen = 0
    for path, command in _commands(typer.main.get_command(app)):
        options = {p.name: p for p in command.params if p.param_type_name == "option"}
        if path[0] in ("engine", "down", "logs"):  # local processes and files: --data-dir
            assert "redis" not in options and "data_dir" in options
            continue
        if path == ("config", "keys"):  # the settings Shoal knows: nothing to ask the engine
            assert "redis" not in options
            continue
        for name, flag, text in (
            ("redis", "--redis", "Engine URL (default: embedded)."),
            ("namespace", "--namespace", "Key namespace."),
            ("data_dir", "--data-dir", "Embedded engine's directory."),
        ):
            if path == ("demo",) and name == "namespace":  # a fresh one unless given
                assert flag in options[name].opts and "fresh" in options[name].help
                continue
            assert flag in options[name].opts and options[name].help == text, path
        if "as_json" in options:
            assert options["as_json"].help == "Print JSON (for scripts) instead of text.", path
            seen += 1
    assert seen >= 14


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under ``group`` with its path of names (``("dlq", "list")``)."""
    found = []
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            found += _commands(command, (*path, name))
        else:
            found.append(((*path, name), command))
    return found


async def test_call_prints_the_result_and_exits_3_or_4(settings: Settings, client: Client) -> None:
    async with running_node([Toolbox], settings):
        code, out, err = await shoal(settings, "call", "add", "a=2", "b=40")
        assert code == 0 and json.loads(out)["sum"] == 42 and err == ""
        code, out, _ = await shoal(settings, "call", "add", "a=1", "b=1", "--json")
        data = json.loads(out)
        assert data["result"]["sum"] == 2 and len(data["id"]) == 28
        code, _, err = await shoal(settings, "call", "permanent", "--max-attempts", "1")
        assert code == 3 and "PermanentError: no point retrying" in err
        code, _, err = await shoal(
            settings, "call", "sleepy", "seconds=30", "--wait-timeout", "0.2"
        )
        assert code == 4 and "has no result after 0.2s" in err
        await client.cancel(err.split()[2])  # "error: task <id> has no result …"


async def test_call_takes_an_agent_and_handler_arguments_named_like_options(
    settings: Settings, client: Client
) -> None:
    async with running_node([Counter, Relay], settings):
        code, out, _ = await shoal(settings, "call", "increment", "by=5", "--agent", "counter/c")
        assert code == 0 and json.loads(out) == 5
        code, out, _ = await shoal(
            settings, "call", "slow_append", "item=priority", "--agent", "counter/c"
        )
        assert code == 0 and json.loads(out) == 1
    assert await client.agent_state("counter/c") == {"n": 5, "seen": ["priority"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["call", "echo", "oops"], "argument 'oops' is not key=value"),
        (["call", "echo", "a=1", "a=2"], "argument 'a' is given twice"),
        (["call", "echo", "--agent", "nokey"], "agent id 'nokey' is not 'type/key'"),
        (["call", "echo", "--agent", "nosuch/a"], "no node has hosted agent type 'nosuch'"),
        (["call", "echo", "--priority", "urgent"], "use one of high, normal, low"),
        (["call", "bad name"], "capability name 'bad name' is invalid"),
        (["tasks", "--status", "finished"], "status 'finished' is not one of: scheduled"),
        (["tasks", "--capability", "nosuch"], "no capability 'nosuch' in namespace"),
        (["tasks", "--capability", "Bad Cap"], "capability name 'Bad Cap' is invalid"),
        (["tasks", "--cursor", "nope"], "'nope' is not a Shoal task id"),
        (["tasks", "--limit", "5000"], "limit must be within 1..1000"),
        (["task", "0" * 28, "--follow"], "no task 0000000000000000000000000000"),
        (["dlq", "list", "nosuch"], "no capability 'nosuch' in namespace"),
        (["cancel", "0" * 28, "--json"], "no task 0000000000000000000000000000"),
    ],
)
async def test_bad_input_to_the_new_commands_is_one_line_and_exit_1(
    settings: Settings, args: list[str], message: str
) -> None:
    code, out, err = await shoal(settings, *args)
    assert code == 1 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and out == ""


async def test_tasks_lists_filters_and_pages(settings: Settings, client: Client) -> None:
    async with running_node([Toolbox], settings):
        done = [await client.submit("add", a=i, b=0) for i in range(3)]
        for handle in done:
            await handle.result(timeout=10)
    waiting = await client.submit("echo", value=1)
    code, out, _ = await shoal(settings, "tasks", "--json")
    page = json.loads(out)
    assert [t["id"] for t in page["tasks"]] == [waiting.id, *[h.id for h in reversed(done)]]
    assert page["next"] is None
    code, out, _ = await shoal(settings, "tasks", "--status", "queued")
    assert code == 0 and waiting.id in out and done[0].id not in out
    code, out, _ = await shoal(settings, "tasks", "--capability", "add", "--limit", "2", "--json")
    page = json.loads(out)
    assert [t["id"] for t in page["tasks"]] == [done[2].id, done[1].id] and page["next"]
    code, out, _ = await shoal(settings, "tasks", "--capability", "add", "--cursor", page["next"])
    assert code == 0 and done[0].id in out and done[1].id not in out
    code, out, _ = await shoal(settings, "tasks", "--limit", "1", "--all", "--json")
    assert len(json.loads(out)["tasks"]) == 4
    code, out, _ = await shoal(settings, "tasks", "--capability", "add", "--limit", "1")
    assert code == 0 and f"(more: shoal tasks --cursor {done[2].id}, or --all)" in out
    code, out, _ = await shoal(settings, "tasks", "--capability", "echo", "--status", "failed")
    assert code == 0 and out.strip() == "no tasks of capability 'echo' in status 'failed'"


async def test_task_follow_streams_until_the_end_and_prints_the_outcome(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("report", steps=2)
        code, out, _ = await shoal(settings, "task", handle.id, "--follow")
        assert code == 0 and out.count("progress") == 2
        assert out.strip().splitlines()[-1] == f'task {handle.id} succeeded: "reported"'
        code, out, _ = await shoal(settings, "task", handle.id, "--follow", "--json")
        lines = [json.loads(line) for line in out.splitlines()]
        assert [e["kind"] for e in lines[:-1]] == ["progress", "progress", "log", "event", "done"]
        assert lines[-1]["status"] == "succeeded" and lines[-1]["result"] == "reported"
        failing = await client.submit("permanent", max_attempts=1)
        code, out, _ = await shoal(settings, "task", failing.id, "--follow")
        assert code == 0 and out.strip().splitlines()[-1].startswith(f"task {failing.id} failed: ")
    code, out, _ = await shoal(settings, "task", handle.id, "--events", "--json")
    assert [e["kind"] for e in json.loads(out)["events"]][-1] == "done"


async def test_status_watch_refreshes_until_ctrl_c_and_exits_0(settings: Settings) -> None:
    for extra in (["--json"], []):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal.cli", "status", "--watch", "0.1", *extra,
            cwd=REPO, env=node_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_default_sigint,
        )  # fmt: skip
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        second = await asyncio.wait_for(proc.stdout.readline(), 30)
        if extra:  # one JSON document a line, one line a refresh
            assert json.loads(first)["nodes"] == [] and json.loads(second)["nodes"] == []
        else:  # off a terminal: one view after the other, each under a time line
            assert "Ctrl-C to stop" in first.decode() and "no nodes" in second.decode()
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err


def _default_sigint() -> None:
    """A child of a process that ignores SIGINT would inherit that; a user's shell
    delivers Ctrl-C to a command that handles it by default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_status_watch_alone_takes_the_default_interval(settings: Settings) -> None:
    code, _, err = await shoal(settings, "status", "--watch", "0")
    assert code == 2 and "0.1" in err  # below the minimum: a usage error
    from shoal.cli_status import optional_watch_value

    assert optional_watch_value(["status", "--watch"]) == ["status", "--watch", "2"]
    assert optional_watch_value(["status", "--watch", "-n", "x"])[:3] == ["status", "--watch", "2"]
    assert optional_watch_value(["status", "--watch", "5"]) == ["status", "--watch", "5"]


async def test_dlq_list_without_capability_lists_every_one(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        dead = [
            await client.submit("always_fails", max_attempts=1),
            await client.submit("flaky", succeed_on=9, max_attempts=1),
        ]
        for handle in dead:
            with pytest.raises(Exception):  # noqa: B017, PT011 - either error ends it
                await handle.result(timeout=10)
    code, out, _ = await shoal(settings, "dlq", "list")
    assert code == 0 and "always_fails" in out and "attempt 1 fails" in out
    code, out, _ = await shoal(settings, "dlq", "list", "--json")
    assert sorted(e["task"]["id"] for e in json.loads(out)) == sorted(h.id for h in dead)
    code, out, _ = await shoal(settings, "dlq", "list", "--limit", "1", "--json")
    assert len(json.loads(out)) == 1
    code, out, _ = await shoal(settings, "dlq", "redrive", "flaky", "--json")
    assert json.loads(out) == [dead[1].id]


async def test_progress_follows_the_tasks_progress_events(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("report", steps=3)
        progress = bar(Console(file=io.StringIO()))
        row = progress.add_task("task", total=None)
        await asyncio.wait_for(follow_progress(client.events(handle.id), progress, row), 10)
        assert progress.tasks[0].completed == 1.0 and progress.tasks[0].description == "step 3"
        terminal = Console(file=io.StringIO(), force_terminal=True)
        again = await client.submit("report", steps=1)
        assert await wait_for_result(client, again, 10, console=terminal) == "reported"


async def test_bench_measures_throughput_and_round_trips(settings: Settings) -> None:
    code, out, err = await shoal(
        settings, "bench", "--tasks", "50", "--nodes", "2", "--round-trips", "5",
        "--requests", "3", "--concurrency", "16", "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert [(r["nodes"], r["tasks"]) for r in result["throughput"]] == [(1, 50), (2, 50)]
    assert all(r["tasks_per_s"] > 0 for r in result["throughput"])
    assert result["task_round_trip"]["n"] == 5 and result["task_round_trip"]["p99_ms"] > 0
    assert result["agent_request"]["n"] == 3 and result["agent_request"]["p50_ms"] > 0
    rendered = io.StringIO()
    Console(file=rendered, width=200).print(table(result))
    text = rendered.getvalue()
    assert "throughput, 2 node(s)" in text and "tasks/s" in text and "p99" in text


# --- where an option's value comes from ---------------------------------------------------


async def _limit_used(settings: Settings, tmp_path: Path, env: dict[str, str], *flags: str) -> int:
    """How many tasks `shoal tasks --json` listed (the limit in effect: 4 exist)."""
    code, out, err = await shoal(
        settings, "tasks", "--json", *flags, env={**node_env(settings), **env}, cwd=tmp_path
    )
    assert code == 0, err
    return len(json.loads(out)["tasks"])


async def test_option_values_come_from_flag_then_env_then_file_then_default(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    for i in range(4):
        await client.submit("echo", value=i)
    assert await _limit_used(settings, tmp_path, {}) == 4  # the default, 50
    (tmp_path / "shoal.toml").write_text("[tasks]\nlimit = 1\n")  # ./shoal.toml
    assert await _limit_used(settings, tmp_path, {}) == 1
    env = {"SHOAL_TASKS_LIMIT": "2"}
    assert await _limit_used(settings, tmp_path, env) == 2
    assert await _limit_used(settings, tmp_path, env, "--limit", "3") == 3
    other = tmp_path / "other.toml"  # --config names another file
    other.write_text('limit = 3\nnamespace = "nowhere"\n[tasks]\nlimit = 2\n')
    os.remove(tmp_path / "shoal.toml")
    flags = ("--namespace", settings.namespace)
    code, out, err = await shoal(
        settings, "--config", str(other), "tasks", "--json", *flags, cwd=tmp_path
    )
    assert code == 0 and len(json.loads(out)["tasks"]) == 2, err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[tasks]\nlimt = 1\n",
            "unknown setting 'limt' in [tasks]; allowed there: all, capability, cursor",
        ),
        ("[taks]\nlimit = 1\n", "unknown setting 'taks' in the top level; allowed there:"),
        ("colour = 1\n", "unknown top-level setting(s) colour; options any command takes:"),
        ("[tasks\n", "is not valid TOML"),
    ],
)
async def test_a_bad_config_file_is_one_line_naming_what_is_allowed(
    settings: Settings, tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "shoal.toml"
    path.write_text(text)
    code, _, err = await shoal(settings, "--config", str(path), "tasks")
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1


async def test_a_missing_config_file_is_an_error(settings: Settings, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    code, _, err = await shoal(settings, "--config", missing, "tasks")
    assert code == 1 and f"config file {missing!r} does not exist" in err
    env = {**node_env(settings), "SHOAL_CONFIG": missing}
    code, _, err = await shoal(settings, "tasks", env=env)
    assert code == 1 and "does not exist" in err


async def test_completion_is_offered(settings: Settings) -> None:
    code, out, _ = await shoal(None, "--help")
    assert code == 0 and "--install-completion" in out and "--show-completion" in out
    env = {**os.environ, "SHELL": "/bin/bash"}
    code, out, _ = await shoal(None, "--show-completion", env=env)
    assert code == 0 and "complete -o default -F" in out
