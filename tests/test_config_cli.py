"""`shoal config get / set / delete / list / history / keys` against the real engine,
run in this process with typer's CliRunner (as tests/test_services_cli.py does)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal import ConfigurationError, Settings
from shoal.cli import app
from shoal.coordination import ConfigConflict
from shoal.coordination.config import ConfigNotSet
from tests.test_services_cli import Ran, ok

runner = CliRunner()


def config(settings: Settings, *args: str) -> Ran:
    """``shoal config ARGS`` on the test's engine and namespace."""
    assert settings.url
    result = runner.invoke(
        app, ["config", *args, "--redis", settings.url, "--namespace", settings.namespace]
    )
    error = None if isinstance(result.exception, SystemExit) else result.exception
    return Ran(result.exit_code, result.stdout, result.stderr, error)


def data(ran: Ran) -> Any:
    return json.loads(ok(ran))


@pytest.mark.parametrize("command", [[], ["get"], ["set"], ["delete"], ["list"], ["history"]])
def test_every_config_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, ["config", *command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_set_get_list_history_and_delete(settings: Settings) -> None:
    said = ok(config(settings, "set", "capability.summarize.concurrency", "4", "--by", "ops"))
    assert said.strip() == "capability.summarize.concurrency = 4 (version 1)"
    got = data(config(settings, "get", "capability.summarize.concurrency", "--json"))
    assert (got["value"], got["version"], got["by"]) == (4, 1, "ops")
    assert ok(config(settings, "get", "capability.summarize.concurrency")).startswith("4\n")
    ok(config(settings, "set", "app.limits", '{"daily": 100}'))
    ok(config(settings, "set", "app.greeting", "hello there"))  # not JSON: the text
    listed = data(config(settings, "list", "app.", "--json"))
    assert [(e["key"], e["value"]) for e in listed] == [
        ("app.greeting", "hello there"),
        ("app.limits", {"daily": 100}),
    ]
    assert "capability.summarize.concurrency" in ok(config(settings, "list"))
    assert (
        ok(config(settings, "delete", "app.greeting")).strip() == "deleted app.greeting (version 4)"
    )
    assert ok(config(settings, "delete", "app.greeting")).strip() == "app.greeting was not set"
    changes = data(config(settings, "history", "--json", "--limit", "2"))
    assert [(c["version"], c["op"], c["key"]) for c in changes] == [
        (4, "delete", "app.greeting"),
        (3, "set", "app.greeting"),
    ]
    assert "capability.summarize.concurrency" in ok(config(settings, "history"))


def test_a_bad_key_value_or_version_is_an_error(settings: Settings) -> None:
    typo = config(settings, "set", "capability.summarize.concurency", "4")
    assert isinstance(typo.error, ConfigurationError) and "unknown config key" in str(typo.error)
    wrong = config(settings, "set", "capability.summarize.concurrency", "four")
    assert isinstance(wrong.error, ConfigurationError) and "whole number" in str(wrong.error)
    ok(config(settings, "set", "app.x", "1"))
    stale = config(settings, "set", "app.x", "2", "--expect-version", "0")
    assert isinstance(stale.error, ConfigConflict)
    unset = config(settings, "get", "app.missing")
    assert isinstance(unset.error, ConfigNotSet)


def test_keys_lists_the_known_settings() -> None:
    said = runner.invoke(app, ["config", "keys"]).stdout
    for pattern in ("capability.<name>.concurrency", "retry.backoff", "breaker.recovery",
                    "log.level", "app.<anything>"):  # fmt: skip
        assert pattern in said
