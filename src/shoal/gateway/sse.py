"""A task's event stream as Server-Sent Events.

Each SSE event's ``id`` is the engine's stream entry id, so a client that reconnects
with ``Last-Event-ID`` (browsers' EventSource do it by themselves) continues right
after the last event it got: nothing twice, nothing skipped, in order — whichever
gateway it reaches and whichever node runs the task now, because the events live in
the engine, not in a process. The stream ends after the task's final ``done`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from shoal.errors import EngineError, ShoalError
from shoal.protocol import Event

KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
RECONNECT_MS = 1000  # what an EventSource waits before reconnecting after a drop
_END = object()

log = logging.getLogger("shoal.gateway")


def format_event(event: Event) -> bytes:
    """One SSE event; msgspec's JSON never contains a raw newline, so ``data`` is one line."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        event.id.encode(),
        event.kind.encode(),
        msgspec.json.encode(event),
    )


def format_error(exc: ShoalError) -> bytes:
    body = msgspec.json.encode({"type": type(exc).__name__, "message": str(exc)})
    return b"event: error\ndata: %s\n\n" % body


async def _pump(events: AsyncIterator[Event], queue: asyncio.Queue[Any]) -> None:
    try:
        async for event in events:
            await queue.put(event)
    except ShoalError as exc:
        await queue.put(exc)
        return
    except Exception as exc:  # not ours to expect: logged, and the stream ends
        log.exception("event stream of a task failed")
        await queue.put(EngineError(f"the event stream failed ({type(exc).__name__})"))
        return
    await queue.put(_END)


async def stream(
    client: Any, task_id: str, after: str | None, on_end: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """The SSE body: events after ``after``, keep-alive comments while idle, and an
    ``error`` event (then the end) if the engine fails mid-stream — the client
    reconnects with Last-Event-ID and loses nothing. ``on_end`` runs when it ends."""
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=1000)
    pump = asyncio.create_task(_pump(client.events(task_id, after), queue))
    try:
        yield b"retry: %d\n\n" % RECONNECT_MS
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is _END:
                return
            if isinstance(item, ShoalError):
                log.warning("event stream of task %s: %s", task_id, item)
                yield format_error(item)
                return
            yield format_event(item)
    finally:
        if on_end is not None:
            on_end()
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
