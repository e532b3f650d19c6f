"""``shoal keys``: create, list and revoke the gateway's API keys.

Thin, like every command: each calls shoal.apikeys.KeyStore and prints the answer.
Errors reach ``shoal.cli.main``, which prints them as one line with an exit code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.table import Table

from shoal.apikeys import SCOPES, ApiKey, CreatedKey, KeyStore
from shoal.cli_options import AsJson, DataDir, Namespace, Redis, out, print_line
from shoal.client import Client
from shoal.settings import Settings

T = TypeVar("T")

keys_app = typer.Typer(help="Create, list and revoke the gateway's API keys.", no_args_is_help=True)


def _with_store(
    redis: str | None,
    namespace: str | None,
    data_dir: Path | None,
    use: Callable[[KeyStore], Awaitable[T]],
) -> T:
    """Connect (flags, then SHOAL_* variables, then defaults), run ``use``, close."""

    async def go() -> T:
        async with Client(settings=Settings.from_env(redis, namespace, data_dir)) as client:
            return await use(KeyStore(client))

    return asyncio.run(go())


def _parse_scopes(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _row(key: ApiKey) -> dict[str, Any]:
    row: dict[str, Any] = msgspec.to_builtins(key)
    return row


def _created(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option("--name", help="What the key is for (need not be unique).")],
    scopes: Annotated[
        str, typer.Option("--scopes", help=f"Comma-separated, some of: {', '.join(SCOPES)}.")
    ],
    rate: Annotated[
        float | None, typer.Option(help="Requests per second (default: the gateway's).")
    ] = None,
    burst: Annotated[
        int | None, typer.Option(help="Requests allowed at once (default: the gateway's).")
    ] = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Create an API key and print its secret token, once: it cannot be shown again."""
    wanted = _parse_scopes(scopes)
    created = _with_store(
        redis, namespace, data_dir, lambda s: s.create(name, wanted, rate=rate, burst=burst)
    )
    if as_json:
        print_line({**_row(created.key), "secret": created.secret})
        return
    _print_created(created)


def _print_created(created: CreatedKey) -> None:
    key = created.key
    out.print(f"created API key {key.id} ({key.name}; scopes {', '.join(key.scopes)})")
    out.out(created.secret, highlight=False)
    out.print("Store this secret now: it cannot be shown again (only its hash is kept).")


@keys_app.command("list")
def list_keys(
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List the API keys (never their secrets)."""
    keys = _with_store(redis, namespace, data_dir, lambda s: s.list())
    if as_json:
        print_line([_row(k) for k in keys])
        return
    if not keys:
        out.print("no API keys (create one with: shoal keys create --name NAME --scopes read)")
        return
    table = Table("id", "name", "scopes", "rate", "burst", "created")
    for k in keys:
        table.add_row(
            k.id,
            k.name,
            ",".join(k.scopes),
            "default" if k.rate is None else f"{k.rate:g}/s",
            "default" if k.burst is None else str(k.burst),
            _created(k.created_at),
        )
    out.print(table)


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id, or its name if no other key has it.")],
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Revoke an API key: it stops working at once, on every gateway."""
    revoked = _with_store(redis, namespace, data_dir, lambda s: s.revoke(key))
    if as_json:
        print_line(_row(revoked))
        return
    out.print(f"revoked API key {revoked.id} ({revoked.name})", markup=False)
