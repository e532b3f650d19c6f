"""`shoal services register / list / status / deregister` against the real engine.

Run in this process (typer's CliRunner, with SHOAL_* variables read as `shoal`
reads them) to stay fast; one test runs the real `shoal` process, for the one-line
error and exit code that `shoal.cli.main` makes of a failure."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from shoal import Client, Settings
from shoal.cli import app
from shoal.config_file import ENV_PREFIX
from shoal.errors import ConfigurationError, ShoalError
from shoal.probes import Probe, probe_configs
from shoal.registry import UnknownService
from tests.test_cli import shoal

runner = CliRunner()


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str
    error: BaseException | None  # what `shoal` would print as "error: ..."


def services(settings: Settings, *args: str, env: dict[str, str] | None = None) -> Ran:
    """``shoal services ARGS`` in this process, on the test's engine and namespace."""
    assert settings.url
    result = runner.invoke(
        app, [*_config(args), "services", *_rest(args), "--redis", settings.url,
              "--namespace", settings.namespace],
        env=env, auto_envvar_prefix=ENV_PREFIX,
    )  # fmt: skip
    error = None if isinstance(result.exception, SystemExit) else result.exception
    return Ran(result.exit_code, result.stdout, result.stderr, error)


def _config(args: tuple[str, ...]) -> list[str]:
    return list(args[:2]) if args[:1] == ("--config",) else []


def _rest(args: tuple[str, ...]) -> list[str]:
    return list(args[2:]) if args[:1] == ("--config",) else list(args)


def ok(ran: Ran) -> str:
    assert ran.code == 0 and ran.error is None, (ran, ran.error)
    return ran.out


def data(ran: Ran) -> Any:
    return json.loads(ok(ran))


@pytest.mark.parametrize(
    "command", [[], ["register"], ["list"], ["deregister"], ["status"], ["probe"]]
)
def test_every_services_command_has_help(command: list[str]) -> None:
    result = runner.invoke(app, ["services", *command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout


def test_register_list_status_and_deregister(settings: Settings) -> None:
    said = ok(services(settings, "register", "llm", "http://127.0.0.1:9001/", "--zone", "eu",
                       "--weight", "2", "--meta", "model=qwen",
                       "--meta", "note=[bold]a=b"))  # fmt: skip
    assert said.splitlines() == [
        "registered llm instance 127.0.0.1:9001: http://127.0.0.1:9001",
        "  zone eu, weight 2, status up, static, metadata model=qwen, note=[bold]a=b",
    ]
    ok(services(settings, "register", "llm", "http://127.0.0.1:9002", "--id", "b"))
    ok(services(settings, "register", "tools", "http://127.0.0.1:7000", "--status", "starting"))

    table = ok(services(settings, "list"))
    assert "expires in" in table and "breaker" in table
    row = next(line for line in table.splitlines() if "127.0.0.1:9001 " in line)
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells == ["llm", "127.0.0.1:9001", "http://127.0.0.1:9001", "eu", "2", "up",
                     "closed", "-", "static", "model=qwen, note=[bold]a=b"]  # fmt: skip
    assert "tools" in table and "starting" in table

    changed = data(services(settings, "status", "llm", "b", "draining", "--json"))
    assert changed["id"] == "b" and changed["status"] == "draining"
    said = ok(services(settings, "status", "llm", "b", "up"))
    assert said.strip() == "llm instance b is now up (effective status up: in rotation)"

    assert ok(services(settings, "deregister", "llm", "b")).strip() == (
        "deregistered llm instance b"
    )
    assert [i["id"] for i in data(services(settings, "list", "llm", "--json"))] == [
        "127.0.0.1:9001"
    ]


def test_list_filters_and_prints_describe_as_json(settings: Settings) -> None:
    ok(services(settings, "register", "llm", "http://127.0.0.1:9001", "--id", "a",
                "--zone", "eu", "--meta", "model=qwen"))  # fmt: skip
    ok(services(settings, "register", "llm", "http://127.0.0.1:9002", "--id", "b",
                "--zone", "us", "--status", "degraded"))  # fmt: skip
    everything = data(services(settings, "list", "--json"))
    assert [i["id"] for i in everything] == ["a", "b"]
    assert everything[0] == {
        "service": "llm", "id": "a", "url": "http://127.0.0.1:9001", "zone": "eu",
        "weight": 1.0, "metadata": {"model": "qwen"}, "status": "up", "reported_status": "up",
        "static": True, "ttl": None, "expires_at_ms": None, "breaker": "closed", "probe": None,
        "window_calls": 0, "window_failures": 0, "consecutive_failures": 0,
    }  # fmt: skip
    for flags, ids in (
        (["--zone", "us"], ["b"]),
        (["--status", "degraded"], ["b"]),
        (["--meta", "model=qwen"], ["a"]),
        (["--meta", "model=qwen", "--zone", "us"], []),
    ):
        assert [i["id"] for i in data(services(settings, "list", "llm", *flags, "--json"))] == ids
    said = ok(services(settings, "list", "--zone", "mars"))
    assert said.strip() == "no instances match zone mars"


def test_a_ttl_registration_warns_and_expires_unless_registered_again(
    settings: Settings,
) -> None:
    ran = services(settings, "register", "llm", "http://127.0.0.1:9001", "--ttl", "1", "--json")
    registered = data(ran)
    assert registered["ttl"] == 1.0 and registered["static"] is False
    assert "warning: llm instance 127.0.0.1:9001 disappears 1s from now unless something " \
        "heartbeats it (running this command again does)" in ran.err  # fmt: skip
    time.sleep(0.6)
    ok(services(settings, "register", "llm", "http://127.0.0.1:9001", "--ttl", "1"))  # heartbeat
    time.sleep(0.6)
    table = ok(services(settings, "list", "llm"))
    row = next(line for line in table.splitlines() if "9001" in line)
    assert re.search(r"│ 0\.\ds +│", row), row  # expires in well under a second: the ttl's rest
    time.sleep(0.6)
    assert ok(services(settings, "list")).strip() == (
        "no services registered (register one: shoal services register NAME URL)"
    )


@pytest.mark.parametrize(
    ("args", "kind", "message"),
    [
        (["register", "llm", "http://x:1", "--ttl", "5", "--static"], ConfigurationError,
         "give --ttl SECONDS (the instance expires unless heartbeated) or --static"),
        (["register", "llm", "http://x:1", "--ttl", "0.5"], ConfigurationError,
         "ttl must be within 1..86400 seconds"),
        (["register", "llm", "ftp://x:1"], ConfigurationError,
         "instance URL 'ftp://x:1' is invalid: give http(s)://host[:port][/base-path]"),
        (["register", "bad name", "http://x:1"], ConfigurationError, "service name 'bad name'"),
        (["register", "llm", "http://x:1", "--meta", "model"], ConfigurationError,
         "--meta 'model' is not key=value (e.g. --meta model=qwen --meta gpu=a100)"),
        (["register", "llm", "http://x:1", "--meta", "a=1", "--meta", "a=2"],
         ConfigurationError, "--meta 'a' is given twice"),
        (["register", "llm", "http://x:1", "--weight", "0"], ConfigurationError,
         "weight must be a number in (0, 1000], got 0.0"),
        (["deregister", "llm", "nope"], UnknownService,
         "service 'llm' has no instance 'nope' in namespace"),
        (["status", "llm", "nope", "draining"], UnknownService,
         "service 'llm' has no instance 'nope'"),
        (["list", "nosuch"], UnknownService,
         "no instance of service 'nosuch' is registered in namespace"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(
    settings: Settings, args: list[str], kind: type[ShoalError], message: str
) -> None:
    ran = services(settings, *args)
    assert isinstance(ran.error, kind) and message in str(ran.error), ran
    assert ran.out == ""


def test_a_status_not_in_the_list_is_a_usage_error(settings: Settings) -> None:
    ran = services(settings, "status", "llm", "a", "busy")
    said = " ".join(ran.err.replace("│", " ").split())  # unboxed, unwrapped
    assert ran.code == 2 and "'busy' is not one of 'starting', 'up', 'degraded'" in said


def test_options_come_from_the_environment_and_the_config_file(
    settings: Settings, tmp_path: Path
) -> None:
    config = tmp_path / "shoal.toml"
    config.write_text('[services.register]\nweight = 3\nzone = "file"\n')
    env = {"SHOAL_SERVICES_REGISTER_ZONE": "env"}
    ran = services(settings, "--config", str(config), "register", "llm", "http://x:1", "--json",
                   env=env)  # fmt: skip
    assert (data(ran)["zone"], data(ran)["weight"]) == ("env", 3.0)


async def test_shoal_prints_one_error_line_and_exits_1(settings: Settings) -> None:
    code, out, err = await shoal(settings, "services", "deregister", "llm", "nope")
    assert code == 1 and out == ""
    assert err == (
        f"error: service 'llm' has no instance 'nope' in namespace {settings.namespace!r}: "
        "nothing to deregister (see: shoal services list llm)\n"
    )


def test_probe_turns_probing_on_and_off(settings: Settings) -> None:
    on = data(services(settings, "probe", "llm", "--path", "/ready", "--interval", "2",
                       "--fall", "4", "--json"))  # fmt: skip
    assert on == {
        "service": "llm",
        "probe": {"path": "/ready", "interval": 2.0, "timeout": 0.5, "fall": 4, "rise": 2},
    }
    assert asyncio.run(_configs(settings)) == {"llm": Probe("/ready", 2.0, 0.5, 4, 2)}
    bad = services(settings, "probe", "llm", "--timeout", "5")
    assert isinstance(bad.error, ConfigurationError) and "at most the interval" in str(bad.error)
    assert "not probed any more" in ok(services(settings, "probe", "llm", "--off"))
    assert asyncio.run(_configs(settings)) == {}


async def _configs(settings: Settings) -> dict[str, Probe]:
    async with Client(settings=settings) as client:
        return await probe_configs(client)
