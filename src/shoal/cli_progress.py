"""Progress on stderr for the commands that wait on long work: a bar that follows a
task's ``progress`` events, or a spinner for a wait that reports nothing.

Only on a terminal: when stderr is piped or redirected nothing is drawn, so scripts
and logs get the result alone. The display is transient — it disappears when the
wait ends, leaving the command's answer on stdout as it would be without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from shoal.cli_options import err
from shoal.client import Client, TaskHandle
from shoal.protocol import Event

log = logging.getLogger("shoal.cli")


def bar(console: Console = err) -> Progress:
    """A transient progress display: spinner, description, bar, percentage, time."""
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
        TimeElapsedColumn(), console=console, transient=True,
    )  # fmt: skip


@contextlib.contextmanager
def spinner(text: str, console: Console = err) -> Iterator[None]:
    """A spinner with ``text`` while the block runs (a wait that reports no progress)."""
    if not console.is_terminal:
        yield
        return
    with bar(console) as progress:
        progress.add_task(text, total=None)
        yield


async def wait_for_result(
    client: Client, handle: TaskHandle, timeout: float | None, console: Console = err
) -> Any:
    """The task's result (as ``handle.result``); on a terminal, meanwhile a bar that
    follows the task's progress events."""
    if not console.is_terminal:
        return await handle.result(timeout=timeout)
    with bar(console) as progress:
        row = progress.add_task(f"task {handle.id}", total=None)
        follower = asyncio.create_task(follow_progress(client.events(handle.id), progress, row))
        try:
            return await handle.result(timeout=timeout)
        finally:
            follower.cancel()
            await _finish(follower)


async def follow_progress(events: AsyncIterator[Event], progress: Progress, row: TaskID) -> None:
    """Move the bar as ``progress`` events arrive (``fraction`` of 1, ``message`` as
    its text) until the event stream ends — when the task does."""
    async for event in events:
        if event.kind == "progress" and isinstance(event.data, dict):
            fraction = event.data.get("fraction")
            message = event.data.get("message")
            if isinstance(fraction, int | float):
                progress.update(row, total=1.0, completed=max(0.0, min(1.0, float(fraction))))
            if message:
                progress.update(row, description=str(message))


async def _finish(follower: asyncio.Task[None]) -> None:
    """Await the cancelled follower. A display that failed (say, the engine went away
    while the result wait rides it out) is logged, not raised: the answer is the
    result's, and the wait reports any error of its own."""
    with contextlib.suppress(asyncio.CancelledError):
        try:
            await follower
        except Exception as exc:
            log.debug("progress display stopped: %s", exc)
