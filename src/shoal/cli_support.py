"""What every ``shoal`` command module needs besides its options: a client, a way to
run a coroutine, parsers for command-line values and short renderings of times and
sizes. Shared by shoal.cli and its command modules (which it imports, so they cannot
import it back)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from shoal.client import Client
from shoal.errors import ConfigurationError
from shoal.settings import Settings

T = TypeVar("T")


def settings(redis: str | None, namespace: str | None, data_dir: Path | None) -> Settings:
    return Settings.from_env(redis, namespace, data_dir)


def client(redis: str | None, namespace: str | None, data_dir: Path | None) -> Client:
    """The client every command uses: flags, then SHOAL_* variables, then defaults."""
    return Client(settings=settings(redis, namespace, data_dir))


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def ts(ms: int | None) -> str:
    """An epoch-ms time as ISO 8601 UTC, to the millisecond; ``-`` for none."""
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def ago(ms: int | None, now_ms: int) -> str:
    """How long ago an epoch-ms time was, shortly: 4.2s, 3m12s, 5h03m or 2d04h ago."""
    if ms is None:
        return "-"
    elapsed = max(0, now_ms - ms) / 1000
    if elapsed < 60:
        return f"{elapsed:.1f}s ago"
    s = int(elapsed)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h ago"


def size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def parse_message(text: str) -> Any:
    """A message given on the command line: JSON (a bare word is not taken as text)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(
            f'message {text!r} is not JSON ({exc}); pass JSON, e.g. \'{{"text": "hi"}}\', '
            "'3', or '\"hi\"' for a string"
        ) from None


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON is taken as JSON, else as text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigurationError(
                f"argument {pair!r} is not key=value with a valid name (e.g. text=hello n=3)"
            )
        if key in kwargs:
            raise ConfigurationError(f"argument {key!r} is given twice")
        try:
            kwargs[key] = json.loads(raw)
        except ValueError:
            kwargs[key] = raw
    return kwargs
