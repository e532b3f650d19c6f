"""Structured logs: a node process's JSON lines carry the ids of the work that logged;
levels filter; bad settings fail loudly."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from shoal import Client, Settings
from shoal.errors import ConfigurationError
from shoal.observability.logs import configure_logging
from tests.conftest import REPO, node_env, node_process


async def node_log(client: Client, settings: Settings, *log_args: str) -> dict[str, Any]:
    """Run tasks and a message on a node process of tests.logs_app and return its
    stderr lines (read after it exits: the exit is the signal that all is written)
    with the ids of the work."""
    with node_process(
        settings, "tests.logs_app", "--name", "logger", *log_args, stderr=subprocess.PIPE
    ) as node:
        await client.wait_for_hosts("chatty")
        chatty = await client.submit("chatty", word="hi")
        assert await chatty.result(timeout=10) == "hi"
        sync = await client.submit("chatty_sync", word="ho")
        assert await sync.result(timeout=10) == "ho"
        assert await client.request("talker/t", "psst", timeout=10) == "heard"
        node.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(node.communicate, None, 30)
        assert node.returncode == 0, err.decode()
    traceparent = (await chatty.status()).traceparent
    assert traceparent
    return {
        "lines": err.decode().splitlines(),
        "chatty": chatty.id,
        "sync": sync.id,
        "trace_id": traceparent.split("-")[1],
    }


def by_message(records: list[dict[str, Any]], message: str) -> dict[str, Any]:
    found = [r for r in records if r["message"] == message]
    assert len(found) == 1, f"{len(found)} lines say {message!r}"
    return found[0]


async def test_a_nodes_json_lines_carry_the_task_agent_node_and_trace_ids(
    client: Client, settings: Settings
) -> None:
    run = await node_log(client, settings, "--log-level", "info", "--log-format", "json")
    records = [json.loads(line) for line in run["lines"]]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= r.keys() for r in records)

    said = by_message(records, "chatty says hi")
    assert said["level"] == "info" and said["logger"] == "tests.logs_app"
    assert said["task_id"] == run["chatty"] and said["trace_id"] == run["trace_id"]
    assert said["node_id"] == "logger" and "agent_id" not in said and "exc" not in said
    assert said["ts"].endswith("+00:00") and said["ts"][:4].isdigit()

    caught = by_message(records, "chatty caught it")
    assert caught["level"] == "error" and caught["task_id"] == run["chatty"]
    assert caught["exc"].startswith("Traceback") and "ValueError: bad hi" in caught["exc"]

    assert by_message(records, "sync chatty says ho")["task_id"] == run["sync"], "in a thread too"
    heard = by_message(records, "talker heard psst")
    assert heard["agent_id"] == "talker/t" and heard["node_id"] == "logger"
    assert "task_id" not in heard, "a message is not a task"

    joined = next(r for r in records if r["message"].startswith("node logger joined"))
    assert joined["node_id"] == "logger" and "task_id" not in joined
    assert all(r.get("node_id") == "logger" for r in records), "every line names the node"


async def test_the_level_filters_what_a_node_logs(client: Client, settings: Settings) -> None:
    run = await node_log(client, settings, "--log-level", "warning", "--log-format", "json")
    records = [json.loads(line) for line in run["lines"]]
    messages = {r["message"] for r in records}
    assert "chatty warns hi" in messages and "chatty says hi" not in messages
    assert {r["level"] for r in records} <= {"warning", "error", "critical"}


def test_a_bad_level_or_format_is_refused_with_the_valid_names(settings: Settings) -> None:
    for option, value, valid in (
        ("--log-level", "loud", "debug, info, warning, error, critical"),
        ("--log-format", "xml", "json, text, auto"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "shoal.cli", "node", "--app", "tests.logs_app", option, value],
            cwd=REPO, env=node_env(settings), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 1
        assert f"{value!r} is not one of {valid}" in done.stderr
    with pytest.raises(ConfigurationError, match="log level 'loud'"):
        configure_logging("loud")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """configure_logging changes the root logger: put it back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_json_off_a_terminal_and_text_on_one(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_LOG_FORMAT", raising=False)
    monkeypatch.delenv("SHOAL_LOG_LEVEL", raising=False)
    piped, terminal = io.StringIO(), Terminal()
    configure_logging(stream=piped)
    logging.getLogger("shoal.test").info("to a pipe")
    configure_logging(stream=terminal)  # replaces the handler it installed before
    logging.getLogger("shoal.test").info("to a terminal")
    assert json.loads(piped.getvalue())["message"] == "to a pipe", "only the first line there"
    assert terminal.getvalue().rstrip().endswith("INFO shoal.test: to a terminal")


def test_the_environment_sets_level_and_format_when_not_given(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_LOG_FORMAT", "text")
    monkeypatch.setenv("SHOAL_LOG_LEVEL", "warning")
    out = io.StringIO()
    configure_logging(stream=out)
    logging.getLogger("shoal.test").info("filtered")
    logging.getLogger("shoal.test").warning("kept")
    assert out.getvalue().rstrip().endswith("WARNING shoal.test: kept")
    assert "filtered" not in out.getvalue()
    configure_logging("debug", "json", stream=out)  # arguments win over the environment
    assert root_logger.level == logging.DEBUG
