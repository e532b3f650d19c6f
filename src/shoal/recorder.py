"""The node's recorder: events and outcomes buffered and written in batches.

One flusher writes everything finished since its last round trip in one pipeline:
first the events (through the fenced events script), then the outcomes (through
the finish script, at most FINISH_CHUNK per call). Under load that batches; when
idle each outcome is written at once. A failed write keeps the buffers, in order,
and is retried with back-off — an outcome is never dropped because the engine was
away for a while.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import NoScriptError

from shoal import protocol, replication
from shoal.client import Client
from shoal.errors import SerializationError, ShoalError
from shoal.execution import Outcome
from shoal.keys import CONSUMER_GROUP
from shoal.observability import metrics
from shoal.resilience import Backoff

log = logging.getLogger("shoal.node")

FINISH_CHUNK = 500  # outcomes per finish-script call (keeps each script short)


@dataclass
class _Buffers:
    events: list[tuple[str, int, str, bytes, int]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    flushed: asyncio.Future[None] | None = None


class Recorder:
    """Buffers a node's events and outcomes and writes them in batches."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._buffers = _Buffers()
        self._dirty = asyncio.Event()
        self._backoff = Backoff()
        self.recorded = 0  # outcomes written
        self.refused_events = 0  # events of superseded attempts (fencing)
        self.unreplicated = 0  # flushes whose WAIT counted fewer replicas than asked
        self.pending_since: float | None = None  # monotonic time of the oldest unwritten item

    # --- producers ------------------------------------------------------------------

    def add_outcome(self, outcome: Outcome) -> None:
        self._buffers.outcomes.append(outcome)
        self._mark()

    def emit_event(self, task_id: str, token: int, kind: str, data: Any) -> None:
        """Buffer an event; callable from handler threads too."""
        try:
            encoded = protocol.encode(data)
        except (TypeError, OverflowError, ValueError) as exc:
            raise SerializationError(
                f"event data of type {type(data).__name__} cannot be sent ({exc}); events "
                "carry msgpack data"
            ) from None
        item = (task_id, token, kind, encoded, protocol.now_ms())
        if threading.get_ident() == self._loop_thread:
            self._buffer_event(item)
        else:
            self._loop.call_soon_threadsafe(self._buffer_event, item)

    def _buffer_event(self, item: tuple[str, int, str, bytes, int]) -> None:
        self._buffers.events.append(item)
        self._mark()

    def _mark(self) -> None:
        if self.pending_since is None:
            self.pending_since = time.monotonic()
        self._dirty.set()

    @property
    def has_pending(self) -> bool:
        """Whether anything is buffered and not yet written."""
        return bool(self._buffers.events or self._buffers.outcomes)

    def flushed(self) -> asyncio.Future[None] | None:
        """The future the next flush completes (None off the loop thread)."""
        if threading.get_ident() != self._loop_thread:
            return None
        if self._buffers.flushed is None:
            self._buffers.flushed = self._loop.create_future()
        return self._buffers.flushed

    # --- the flusher ----------------------------------------------------------------

    async def run(self, closing: asyncio.Event) -> None:
        """Flush whenever something is buffered, until ``closing`` (then once more)."""
        while not closing.is_set():
            await self._dirty.wait()
            self._dirty.clear()
            await self.flush()
        await self.flush()

    def wake(self) -> None:
        self._dirty.set()

    async def flush(self) -> bool:
        """Write what is buffered; False (buffers kept) if the engine is away."""
        buffers, self._buffers = self._buffers, _Buffers()
        if buffers.events or buffers.outcomes:
            try:
                await self._write(buffers)
            except ShoalError as exc:
                self._keep(buffers)
                delay = self._backoff.next_delay()
                log.error(
                    "recording %d outcome(s) failed: %s; retrying in %.2fs",
                    len(buffers.outcomes), exc, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)  # back-off before the engine is tried again
                self._dirty.set()
                return False
            self._backoff.reset()
            self.recorded += len(buffers.outcomes)
        if not self._buffers.events and not self._buffers.outcomes:
            self.pending_since = None
        if buffers.flushed is not None and not buffers.flushed.done():
            buffers.flushed.set_result(None)
        return True

    def _script_calls(self, buffers: _Buffers) -> list[tuple[Any, int, list[Any]]]:
        """(script, key group, arguments) of each call: events and outcomes grouped
        by their task's key group (a script runs inside one slot)."""
        client, keys = self._client, self._client.keys
        calls: list[tuple[Any, int, list[Any]]] = []  # (script, key group, arguments)
        events: dict[int, list[Any]] = {}
        for task_id, token, kind, data, at in buffers.events:
            events.setdefault(keys.task_group(task_id), []).extend([task_id, token, kind, data, at])
        for group, fields in sorted(events.items()):
            calls.append((client.scripts.events, group, [keys.group_prefix(group), *fields]))
        outcomes: dict[int, list[Any]] = {}
        for outcome in buffers.outcomes:
            outcomes.setdefault(keys.task_group(outcome.job.task_id), []).append(outcome)
        now, retention_ms = protocol.now_ms(), int(client.settings.retention * 1000)
        for group, batch in sorted(outcomes.items()):
            head: list[Any] = [keys.group_prefix(group), CONSUMER_GROUP, now, retention_ms]
            for start in range(0, len(batch), FINISH_CHUNK):
                args = list(head)
                for outcome in batch[start : start + FINISH_CHUNK]:
                    args += outcome.script_fields()
                calls.append((client.scripts.finish, group, args))
        return calls

    def _check_acks(self, replies: list[Any], replicas: int) -> None:
        """Results are recorded on the primary whatever the replicas say (undoing them
        would lose more): a short count is logged and counted, not raised."""
        try:
            replication.check_acks(replies, replicas, "recorded results")
        except ShoalError as exc:
            self.unreplicated += 1
            log.warning("%s", exc)

    def _keep(self, failed: _Buffers) -> None:
        """Put unwritten events and outcomes back in front, in order, for the next try."""
        self._buffers.events[:0] = failed.events
        self._buffers.outcomes[:0] = failed.outcomes
        if failed.flushed is None:
            return
        newer = self._buffers.flushed
        self._buffers.flushed = failed.flushed
        if newer is not None:  # both wait for the same next flush now
            failed.flushed.add_done_callback(lambda _: _complete(newer))

    async def _write(self, buffers: _Buffers) -> None:
        """Events first, then outcomes, in one pipeline (one round trip).

        Both scripts are idempotent for a retry after a lost reply: the finish
        script refuses an outcome already recorded (its task is no longer running
        that attempt); events of a batch that was written but whose reply was lost
        would be written twice — the one duplication a retry can cause.
        """
        client, keys = self._client, self._client.keys
        calls = self._script_calls(buffers)
        outcomes = {keys.task_group(o.job.task_id) for o in buffers.outcomes}
        acks = client.settings.ack_replicas if outcomes else 0
        async with client.errors():
            pipe = client.blocking.pipeline(transaction=False)  # one flusher: bounded
            for script, group, args in calls:
                script.queue(pipe, [keys.delayed(group)], args)
            waits = 0
            if acks:
                shard_keys = [keys.delayed(group) for group in outcomes]
                waits = replication.queue_waits(
                    pipe, client.blocking, shard_keys, acks, client.settings.ack_timeout
                )
            replies = await pipe.execute(raise_on_error=False)
            if waits:
                self._check_acks(replies[-waits:], acks)
                replies = replies[:-waits]
            for (script, group, args), reply in zip(calls, replies, strict=True):
                if isinstance(reply, NoScriptError):  # engine restarted: load, run again
                    reply = await script([keys.delayed(group)], args, on=client.blocking)
                if isinstance(reply, Exception):
                    raise reply
                if script is client.scripts.events:
                    self.refused_events += int(reply)
                elif refused := _outcomes_in(args) - int(reply):  # finish: counts recorded ones
                    metrics.DUPLICATE_OUTCOMES.inc(refused)


def _outcomes_in(finish_args: list[Any]) -> int:
    """How many outcomes a finish-script call carries (4 head fields, then 8 each)."""
    return (len(finish_args) - 4) // 8


def _complete(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
