"""``shoal config``: read and change the live configuration (shoal.coordination.config).

Thin, like every command: each calls ``client.config`` and prints the answer.
A value on the command line is read in the setting's type (``4`` is a whole
number for ``capability.x.concurrency``, ``0.5`` a number for ``retry.backoff``);
an ``app.`` value is read as JSON when it is JSON, else as the text itself.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from shoal.cli_options import AsJson, DataDir, Namespace, Redis, out, print_json, to_data
from shoal.cli_support import client as _client
from shoal.cli_support import run as _run
from shoal.cli_support import ts
from shoal.coordination.config import ConfigChange, ConfigEntry, ConfigNotSet, parse, schema

config_app = typer.Typer(
    help="Read and change the live configuration nodes apply without a restart.",
    no_args_is_help=True,
)

Key = Annotated[str, typer.Argument(help="Setting key, e.g. capability.summarize.concurrency.")]
By = Annotated[str | None, typer.Option("--by", help="Who makes the change (default user@host).")]
ExpectVersion = Annotated[
    int | None,
    typer.Option("--expect-version", help="Only if the key is at this version (0: unset)."),
]


def _value(value: object) -> str:
    return json.dumps(value)


@config_app.command("get")
def get(
    key: Key,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Print a setting's value (as JSON), its version, who set it and when."""

    async def go() -> ConfigEntry | None:
        async with _client(redis, namespace, data_dir) as client:
            return await client.config.entry(key)

    entry = _run(go())
    if entry is None:
        raise ConfigNotSet(f"config key {key!r} is not set (the code's default applies)")
    if as_json:
        print_json(to_data(entry))
        return
    out.print(_value(entry.value), markup=False, highlight=False)
    out.print(f"  version {entry.version}, by {entry.by}, at {ts(entry.at)}", markup=False)


@config_app.command("set")
def set_value(
    key: Key,
    value: Annotated[str, typer.Argument(help="The value, in the setting's type.")],
    expect_version: ExpectVersion = None,
    by: By = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Set a setting; running nodes apply it within moments."""
    typed = parse(key, value)

    async def go() -> ConfigEntry:
        async with _client(redis, namespace, data_dir) as client:
            return await client.config.set(key, typed, by=by, expect_version=expect_version)

    entry = _run(go())
    if as_json:
        print_json(to_data(entry))
        return
    out.print(f"{key} = {_value(entry.value)} (version {entry.version})", markup=False)


@config_app.command("delete")
def delete(
    key: Key,
    expect_version: ExpectVersion = None,
    by: By = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Unset a setting: the code's own default applies again."""

    async def go() -> int | None:
        async with _client(redis, namespace, data_dir) as client:
            return await client.config.delete(key, by=by, expect_version=expect_version)

    version = _run(go())
    if version is None:
        out.print(f"{key} was not set", markup=False)
    else:
        out.print(f"deleted {key} (version {version})", markup=False)


@config_app.command("list")
def list_settings(
    prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "",
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List the settings (under a prefix) with their versions."""

    async def go() -> list[ConfigEntry]:
        async with _client(redis, namespace, data_dir) as client:
            return await client.config.list(prefix)

    entries = _run(go())
    if as_json:
        print_json(to_data(entries))
    elif entries:
        table = Table("key", "value", "version", "by", "at")
        for e in entries:
            table.add_row(e.key, _value(e.value), str(e.version), e.by, ts(e.at))
        out.print(table)
    else:
        out.print("no settings" + (f" under {prefix!r}" if prefix else ""), markup=False)


@config_app.command("history")
def history(
    key: Annotated[str | None, typer.Argument(help="Only this key's changes.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many.", min=1)] = 20,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """The latest changes, newest first."""

    async def go() -> list[ConfigChange]:
        async with _client(redis, namespace, data_dir) as client:
            return await client.config.history(key, limit=limit)

    changes = _run(go())
    if as_json:
        print_json(to_data(changes))
    elif changes:
        table = Table("version", "key", "op", "value", "by", "at")
        for c in changes:
            shown = "" if c.op == "delete" else _value(c.value)
            table.add_row(str(c.version), c.key, c.op, shown, c.by, ts(c.at))
        out.print(table)
    else:
        out.print("no changes", markup=False)


@config_app.command("keys")
def keys() -> None:
    """The settings Shoal knows, with their types and ranges."""
    table = Table("key", "type", "range", "meaning")
    for setting in schema():
        bounds = "" if setting.low is None else f"{setting.low:g}..{setting.high:g}"
        table.add_row(setting.pattern, setting.kind, bounds, setting.help)
    out.print(table)
