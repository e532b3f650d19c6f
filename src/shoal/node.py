"""The worker node: pull tasks up to free slots, run them, record results in batches.

The loop is a pull model: a node asks the engine for at most as many tasks as it
has free slots (fetch.lua reads high before normal before low and starts what it
read in the same script), so load balances by itself. When every queue is empty
the node blocks on XREAD from each stream's last id — woken the moment a task is
added, without consuming anything. Results and events are written by one flusher
that drains everything finished since its last round trip in one pipeline, so the
engine sees batches under load and single writes when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.exceptions import NoScriptError

from shoal import protocol
from shoal.agent import Agent, CapabilitySpec, TaskContext
from shoal.client import Client
from shoal.engine import translate
from shoal.errors import ConfigurationError, SerializationError, ShoalError
from shoal.execution import Attempt, Job, Outcome
from shoal.keys import CONSUMER_GROUP, PRIORITIES
from shoal.protocol import ErrorInfo
from shoal.settings import Settings

log = logging.getLogger("shoal.node")

HEARTBEAT_INTERVAL_S = 1.0
RELEASE_INTERVAL_S = 0.25  # longest gap between two looks at due delayed tasks
RELEASE_BATCH = 1000
IDLE_BLOCK_MS = 1000  # upper bound of one blocking wait for work (then re-check stop)
FINISH_CHUNK = 500  # outcomes per finish-script call (keeps each script short)
CANCEL_LISTEN_S = 0.5  # how often the cancel listener looks up to see if it should end


@dataclass
class NodeConfig:
    """How a node runs; validated at construction."""

    concurrency: int = 64
    name: str | None = None
    grace_period: float = 30.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.grace_period < 0:
            raise ConfigurationError(f"grace_period must be >= 0, got {self.grace_period!r}")

    def node_id(self) -> str:
        return self.name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


@dataclass
class _Buffers:
    """Events and outcomes waiting for the flusher's next round trip."""

    events: list[tuple[str, str, bytes, int]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    flushed: asyncio.Future[None] | None = None


class Node:
    """Hosts agent types and runs their capabilities' tasks."""

    def __init__(
        self,
        agents: list[type[Agent]],
        settings: Settings | None = None,
        config: NodeConfig | None = None,
    ) -> None:
        from shoal.app import capability_table

        self.settings = settings or Settings.from_env()
        self.config = config or NodeConfig()
        self.node_id = self.config.node_id()
        table = capability_table(agents)
        self._instances = {agent: agent() for agent in set(table.values())}
        self._specs: dict[str, tuple[CapabilitySpec, Agent]] = {
            name: (agent.capabilities()[name], self._instances[agent])
            for name, agent in table.items()
        }
        self.client = Client(settings=self.settings)
        self._queues = [
            self.client.keys.queue(cap, prio) for prio in PRIORITIES for cap in self._specs
        ]
        self._running: dict[str, Attempt] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._buffers = _Buffers()
        self._dirty = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()  # stop pulling work, drain
        self._closing = asyncio.Event()  # drained: background loops end by themselves
        self._idle_read: asyncio.Future[Any] | None = None  # the blocking wait for work
        self._turn = 0  # rotates which capability is read first (see _queue_order)
        self._executor = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="shoal")
        self._loop_thread = 0
        self.completed = 0

    @property
    def capabilities(self) -> list[str]:
        return sorted(self._specs)

    @property
    def keys(self) -> Any:
        return self.client.keys

    # --- lifecycle --------------------------------------------------------------

    def stop(self) -> None:
        """Ask the node to drain and stop (safe from a signal handler)."""
        self._stopping.set()
        if self._idle_read is not None:
            # call_soon: the read's first step (already scheduled) runs first, so the
            # cancel never hits a coroutine that has not started (which would warn).
            asyncio.get_running_loop().call_soon(self._idle_read.cancel)

    async def run(self) -> None:
        """Register, consume until stop() is called, then drain and deregister."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self.client.connect()
        try:
            await self._register()
            log.info("node %s hosting %s", self.node_id, ", ".join(self.capabilities))
            # Background loops end when _closing is set rather than by cancellation:
            # asyncio.wait_for on 3.11 (used inside redis-py) can swallow a cancel.
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_loop())
                group.create_task(self._release_loop())
                group.create_task(self._cancel_listener())
                group.create_task(self._flush_loop())
                try:
                    await self._fetch_loop()
                    await self._drain()
                finally:
                    self._closing.set()
                    self._dirty.set()
        finally:
            await self._deregister()
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self.client.close()

    async def _register(self) -> None:
        r = self.client.redis
        async with self.client.errors():
            for queue in self._queues:
                with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: exists already
                    await r.xgroup_create(queue, CONSUMER_GROUP, id="0", mkstream=True)
            pipe = r.pipeline(transaction=False)
            for name, (spec, _) in self._specs.items():
                pipe.sadd(self.keys.capabilities, name)
                pipe.hset(self.keys.capability(name), mapping=_capability_fields(spec))
                for stale in ("max_attempts", "timeout", "queue_max"):
                    if stale not in _capability_fields(spec):
                        pipe.hdel(self.keys.capability(name), stale)
            await pipe.execute()
            await self._heartbeat()

    async def _deregister(self) -> None:
        with contextlib.suppress(ShoalError, redis.RedisError):
            async with self.client.errors():
                pipe = self.client.redis.pipeline(transaction=False)
                pipe.zrem(self.keys.nodes, self.node_id)
                for name in self._specs:
                    pipe.zrem(self.keys.hosts(name), self.node_id)
                pipe.delete(self.keys.node(self.node_id))
                await pipe.execute()

    async def _drain(self) -> None:
        """Stop pulling; let running tasks finish within the grace period, then hand
        the rest back to the queue (re-queued at once, the attempt not counted)."""
        pending = {a.task for a in self._running.values() if a.task is not None}
        if pending:
            log.info(
                "draining %d running task(s), grace %.1fs", len(pending), self.config.grace_period
            )
            _, late = await asyncio.wait(pending, timeout=self.config.grace_period)
            for attempt in list(self._running.values()):
                if attempt.task is not None and attempt.task in late:
                    attempt.handed_back = True
                    attempt.task.cancel()
            if late:
                await asyncio.wait(late)
        await self._flush_once()

    # --- heartbeat --------------------------------------------------------------

    async def _heartbeat(self) -> None:
        now = protocol.now_ms()
        pipe = self.client.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.nodes, {self.node_id: now})
        for name in self._specs:
            pipe.zadd(self.keys.hosts(name), {self.node_id: now})
        pipe.hset(self.keys.node(self.node_id), mapping={
            "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": now,
            "capabilities": ",".join(self.capabilities), "concurrency": self.config.concurrency,
            "in_flight": len(self._running), "completed": self.completed,
            "weight": self.config.weight,
        })  # fmt: skip
        await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        while not await self._until(self._closing, timeout=HEARTBEAT_INTERVAL_S):
            try:
                async with self.client.errors():
                    await self._heartbeat()
            except ShoalError as exc:
                log.warning("heartbeat failed: %s", exc)

    # --- pulling work -------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        expired = protocol.encode(
            ErrorInfo(
                "shoal.errors.DeadlineExceeded", "the deadline passed before the task started"
            )
        )
        while not self._stopping.is_set():
            free = self.config.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._until(self._slot_freed)
                continue
            queues = self._queue_order()
            try:
                started, consumed, last_ids = await self._fetch(queues, free, expired)
            except ShoalError as exc:
                log.warning("fetching work failed: %s; retrying", exc)
                await self._until(self._stopping, timeout=0.5)
                continue
            for row in started:
                self._start(Job.from_reply(row))
            if consumed == 0:
                await self._wait_for_work(queues, last_ids)

    def _queue_order(self) -> list[str]:
        """Priorities in order; within one, the capabilities take turns going first,
        so a busy capability cannot starve the others hosted by this node."""
        self._turn += 1
        caps = list(self._specs)
        shift = self._turn % len(caps)
        caps = caps[shift:] + caps[:shift]
        return [self.keys.queue(cap, prio) for prio in PRIORITIES for cap in caps]

    async def _fetch(
        self, queues: list[str], count: int, expired: bytes
    ) -> tuple[list[Any], int, list[bytes]]:
        args = [
            self.keys.prefix, CONSUMER_GROUP, self.node_id, count, protocol.now_ms(),
            int(self.settings.retention * 1000), expired,
        ]  # fmt: skip
        async with self.client.errors():
            started, consumed, last_ids = await self.client.scripts.fetch(queues, args)
        return started, int(consumed), last_ids

    async def _wait_for_work(self, queues: list[str], last_ids: list[bytes]) -> None:
        """Block until any of ``queues`` gets an entry past ``last_ids`` (or stop)."""
        streams = dict(zip(queues, last_ids, strict=True))
        self._idle_read = asyncio.ensure_future(
            self.client.blocking.xread(streams, count=1, block=IDLE_BLOCK_MS)
        )
        try:
            await self._idle_read  # stop() cancels it
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
        except redis.RedisError as exc:
            log.warning("waiting for work failed: %s", translate(exc, self.client.url))
            await self._until(self._stopping, timeout=0.5)
        finally:
            self._idle_read = None

    async def _until(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return event.is_set()

    # --- running ------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        spec, agent = self._specs[job.capability]
        ctx = TaskContext(
            self, job.task_id, job.capability, job.attempt, job.traceparent, self._flushed
        )
        attempt = Attempt(job, spec, agent, ctx)
        self._running[job.task_id] = attempt
        attempt.task = asyncio.create_task(
            self._run_attempt(attempt), name=f"shoal-task-{job.task_id}"
        )

    async def _run_attempt(self, attempt: Attempt) -> None:
        try:
            outcome = await attempt.run(self._executor, self.node_id)
        except BaseException as exc:
            log.exception("task %s crashed the runner", attempt.job.task_id)
            outcome = attempt._failure(exc, self.node_id)
        finally:
            self._running.pop(attempt.job.task_id, None)
            self._slot_freed.set()
        self._buffers.outcomes.append(outcome)
        self._dirty.set()

    # --- events and results ---------------------------------------------------------

    def emit_event(self, task_id: str, kind: str, data: Any) -> None:
        """Buffer an event for the flusher; callable from handler threads too."""
        try:
            encoded = protocol.encode(data)
        except (TypeError, OverflowError, ValueError) as exc:
            raise SerializationError(
                f"event data of type {type(data).__name__} cannot be sent ({exc}); events "
                "carry msgpack data"
            ) from None
        item = (task_id, kind, encoded, protocol.now_ms())
        if threading.get_ident() == self._loop_thread:
            self._buffer_event(item)
        else:
            self.loop.call_soon_threadsafe(self._buffer_event, item)

    def _buffer_event(self, item: tuple[str, str, bytes, int]) -> None:
        self._buffers.events.append(item)
        self._dirty.set()

    def _flushed(self) -> asyncio.Future[None] | None:
        """The future the next flush completes (None off the loop thread)."""
        if threading.get_ident() != self._loop_thread:
            return None
        if self._buffers.flushed is None:
            self._buffers.flushed = self.loop.create_future()
        return self._buffers.flushed

    async def _flush_loop(self) -> None:
        while not self._closing.is_set():
            await self._dirty.wait()
            self._dirty.clear()
            await self._flush_once()

    async def _flush_once(self) -> None:
        buffers, self._buffers = self._buffers, _Buffers()
        if not buffers.events and not buffers.outcomes:
            if buffers.flushed is not None and not buffers.flushed.done():
                buffers.flushed.set_result(None)
            return
        try:
            await self._write(buffers)
        except ShoalError as exc:
            log.error("recording %d outcome(s) failed: %s; will retry", len(buffers.outcomes), exc)
            self._requeue_buffers(buffers)
            await self._until(self._stopping, timeout=0.5)
            return
        self.completed += len(buffers.outcomes)
        if buffers.flushed is not None and not buffers.flushed.done():
            buffers.flushed.set_result(None)

    def _requeue_buffers(self, failed: _Buffers) -> None:
        """Put unwritten events and outcomes back in front, in order, for the next try."""
        self._buffers.events[:0] = failed.events
        self._buffers.outcomes[:0] = failed.outcomes
        if failed.flushed is not None and self._buffers.flushed is None:
            self._buffers.flushed = failed.flushed
        self._dirty.set()

    async def _write(self, buffers: _Buffers) -> None:
        """Events first, then the outcomes, in one pipeline (one round trip)."""
        pipe = self.client.redis.pipeline(transaction=False)
        for task_id, kind, data, at in buffers.events:
            pipe.xadd(self.keys.events(task_id), {"k": kind, "d": data, "t": at})
        head: list[Any] = [
            self.keys.prefix, CONSUMER_GROUP, protocol.now_ms(),
            int(self.settings.retention * 1000),
        ]  # fmt: skip
        calls = []
        for start in range(0, len(buffers.outcomes), FINISH_CHUNK):
            args = list(head)
            for outcome in buffers.outcomes[start : start + FINISH_CHUNK]:
                args += outcome.script_fields()
            self.client.scripts.finish.queue(pipe, [self.keys.delayed], args)
            calls.append(args)
        async with self.client.errors():
            replies = await pipe.execute(raise_on_error=False)
            for args, reply in zip(calls, replies[len(replies) - len(calls) :], strict=True):
                if isinstance(reply, NoScriptError):
                    await self.client.scripts.finish([self.keys.delayed], args)  # reloads it
            failures = [
                r for r in replies if isinstance(r, Exception) and not isinstance(r, NoScriptError)
            ]
            if failures:
                raise failures[0]

    # --- delayed tasks and cancellation ------------------------------------------------

    async def _release_loop(self) -> None:
        """Move due delayed tasks into their queues. Every node runs this; the script
        makes each release happen once."""
        while not self._closing.is_set():
            try:
                async with self.client.errors():
                    released, next_due = await self.client.scripts.release(
                        [self.keys.delayed], [self.keys.prefix, protocol.now_ms(), RELEASE_BATCH]
                    )
            except ShoalError as exc:
                log.warning("releasing delayed tasks failed: %s", exc)
                released, next_due = 0, -1
            if released >= RELEASE_BATCH:
                continue
            wait = RELEASE_INTERVAL_S
            if next_due >= 0:
                wait = min(wait, max(0.0, (next_due - protocol.now_ms()) / 1000))
            await self._until(self._closing, timeout=wait)  # until the next due task

    async def _cancel_listener(self) -> None:
        """Cancel running handlers whose cancellation was asked (pub/sub; the record's
        'cancel' flag makes the outcome 'cancelled' even if this message is missed)."""
        pubsub = self.client.blocking.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.keys.cancel_channel)
            while not self._closing.is_set():
                message = await pubsub.get_message(timeout=CANCEL_LISTEN_S)
                if message is not None:
                    self._cancel_running(message["data"].decode())
        except redis.RedisError as exc:
            log.warning("cancel listener stopped: %s", translate(exc, self.client.url))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    def _cancel_running(self, task_id: str) -> None:
        attempt = self._running.get(task_id)
        if attempt is not None and attempt.task is not None:
            attempt.ctx.cancel_requested = True
            attempt.task.cancel()


def _capability_fields(spec: CapabilitySpec) -> dict[str, Any]:
    fields: dict[str, Any] = {"handler": spec.method_name}
    if spec.max_attempts is not None:
        fields["max_attempts"] = spec.max_attempts
    if spec.timeout is not None:
        fields["timeout"] = repr(float(spec.timeout))
    if spec.max_queue_length is not None:
        fields["queue_max"] = spec.max_queue_length
    return fields


def run_node(agents: list[type[Agent]], settings: Settings, config: NodeConfig) -> None:
    """Run a node in this process until SIGINT/SIGTERM, which drain it."""

    async def main() -> None:
        node = Node(agents, settings, config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        await node.run()

    asyncio.run(main())
