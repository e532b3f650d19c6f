"""The options every ``shoal`` command takes, and the consoles they print to — one
definition shared by shoal.cli and its sub-apps (which it imports, so they cannot
import it back)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.console import Console

# Piped output is not wrapped at 80 columns, so ids and errors stay on one line.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Redis = Annotated[
    str | None,
    typer.Option("--redis", envvar="SHOAL_REDIS_URL", help="Engine URL (default: embedded)."),
]
Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", envvar="SHOAL_NAMESPACE", help="Key namespace.")
]
DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="SHOAL_DATA_DIR", help="Embedded engine's directory."),
]
LogLevel = Annotated[
    str | None,
    typer.Option(
        envvar="SHOAL_LOG_LEVEL", help="debug, info, warning, error or critical [default: info]."
    ),
]
LogFormat = Annotated[
    str | None,
    typer.Option(
        envvar="SHOAL_LOG_FORMAT",
        help="json, text or auto: text on a terminal, JSON lines otherwise [default: auto].",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of text.")]
Limit = Annotated[int, typer.Option("--limit", help="At most this many.", min=1)]


def print_line(value: Any) -> None:
    """One line of JSON, exactly as it is: no rich markup, emoji codes or wrapping
    (``[true]`` would otherwise be read as markup, and a long result wrapped)."""
    out.out(json.dumps(value, default=repr), highlight=False)


def print_json(value: Any) -> None:
    """A JSON document, indented (and coloured on a terminal). Rich's JSON renderable
    neither reads markup nor wraps lines, so the text stays valid JSON."""
    out.print_json(json.dumps(value, default=repr))


def to_data(value: Any) -> Any:
    """A msgspec struct (or a list of them) as plain JSON-able data."""
    return msgspec.to_builtins(value)


# --- the options of a task, shared by `shoal submit` and `shoal call` ---------------------

Priority = Annotated[str, typer.Option(help="high, normal or low.")]
Delay = Annotated[float | None, typer.Option(help="Run after this many seconds.")]
Timeout = Annotated[float | None, typer.Option(help="Running-time limit, seconds.")]
Deadline = Annotated[
    float | None, typer.Option(help="Do not start later than this many seconds from now.")
]
MaxAttempts = Annotated[int | None, typer.Option(help="Attempts before dead-letter.")]
IdempotencyKey = Annotated[str | None, typer.Option(help="Same key, same task.")]
AgentId = Annotated[
    str | None,
    typer.Option("--agent", help="Send the task to this agent, type/key (its state, in order)."),
]
WaitTimeout = Annotated[
    float | None, typer.Option(help="Give up waiting after this many seconds (exit code 4).")
]
Arguments = Annotated[
    list[str] | None, typer.Argument(help="Handler arguments as key=value (JSON values).")
]
