"""The options every ``shoal`` command takes, and the consoles they print to — one
definition shared by shoal.cli and its sub-apps (which it imports, so they cannot
import it back)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

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
