"""The agent host: a node's side of the agent plane.

For the partitions this node holds leases on (leases.py), the host reads their
mailboxes in arrival order and hands each message to its agent's *activation*: the
agent's own instance with its state, loaded from the engine on first use. An
activation runs one turn at a time, so each agent sees its messages in order and
needs no locks; different agents run concurrently up to the node's concurrency.

A turn's effects — the saved state, the task outcome or request reply, and the
deletion of its mailbox entry — are committed together by turn_end.lua, and only
if the node still holds the partition's lease. So after a failover the new owner
finds exactly the messages whose turns never committed, and runs them again
(at-least-once) under a larger fencing token; a paused old owner's late commit is
refused and changes nothing.

Idle activations are deactivated: the least recently used beyond
``max_active_agents``, and any idle longer than ``idle_after``. The node's active
agents are published to ``active:<node>`` about once a second for the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from shoal import protocol
from shoal.agent import Agent, MessageSpec, TaskContext, current_context
from shoal.batching import Coalescer
from shoal.channels import ShardSubscription
from shoal.engine import translate
from shoal.errors import EngineError, EngineUnavailable, SerializationError, ShoalError
from shoal.execution import Attempt, Job, Outcome, error_info, failure_outcome
from shoal.leases import Change, LeaseKeeper, Partition
from shoal.observability import metrics
from shoal.observability.hooks import TurnWatch
from shoal.protocol import ErrorInfo
from shoal.resilience import Backoff

if TYPE_CHECKING:
    from shoal.node import Node

T = TypeVar("T")
log = logging.getLogger("shoal.agents")

READ_BATCH = 500  # mailbox entries per XREAD and stream, at most
READ_MIN_PER_STREAM = 16
READ_BLOCK_MS = 1000
DIRECTORY_EVERY_S = 1.0
LEASE_WATCH_S = 0.1
EVENTS_WAIT_S = 5.0  # a turn waits this long at most for its events to be written


@dataclass(slots=True)
class Message:
    """One mailbox entry (or a broadcast) for one agent."""

    part: Partition
    entry_id: str  # '' for a broadcast, which is not in any mailbox
    kind: str  # task | msg | pub | del | bcast
    agent_id: str
    task_id: str = ""
    payload: bytes = b""
    sender: str | None = None
    reply: str = ""
    correlation: str = ""
    topic: str | None = None
    traceparent: str | None = None

    @classmethod
    def from_entry(cls, part: Partition, entry_id: bytes, f: dict[bytes, bytes]) -> Message:
        def text(name: bytes) -> str | None:
            value = f.get(name)
            return value.decode() if value else None

        return cls(
            part=part,
            entry_id=entry_id.decode(),
            kind=f.get(b"k", b"msg").decode(),
            agent_id=f[b"a"].decode(),
            task_id=text(b"i") or "",
            payload=f.get(b"d", b""),
            sender=text(b"s"),
            reply=text(b"r") or "",
            correlation=text(b"c") or "",
            topic=text(b"o"),
            traceparent=text(b"t"),
        )


@dataclass(slots=True)
class Activation:
    """An agent active on this node: its instance, saved state and pending messages."""

    agent_id: str
    part: Partition
    agent: Agent | None = None
    saved: bytes = b""  # the state as last committed (msgpack); b"" when none
    queue: deque[Message] = field(default_factory=deque)
    running: bool = False
    turn: asyncio.Task[Any] | None = None
    abandoned: bool = False
    activated_at: int = 0
    last_message_at: int = 0
    last_commit: asyncio.Future[int] | None = None  # the latest turn's commit
    token: int = 0  # the partition lease it was activated under


@dataclass
class _PartitionState:
    token: int
    last_id: str = "0-0"
    releasing: bool = False
    in_flight: int = 0  # entries read whose turns have not committed yet
    settled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(slots=True)
class _Commit:
    """One turn's effects, in turn_end.lua's field order."""

    part: Partition
    token: int
    entry_id: str
    agent_id: str
    state_op: str = ""
    state: bytes = b""
    task_id: str = ""
    outcome: str = ""
    payload: bytes = b""
    due_ms: int = 0
    reply: str = ""
    correlation: str = ""
    reply_status: str = ""

    def fields(self) -> list[Any]:
        return [
            self.part[0], self.part[1], self.token, self.entry_id, self.agent_id,
            self.state_op, self.state, self.task_id, self.outcome, self.payload, self.due_ms,
            self.reply, self.correlation, self.reply_status,
        ]  # fmt: skip


class AgentHost:
    """Runs the addressed agents of one node (see the module docstring)."""

    def __init__(self, node: Node, types: list[type[Agent]]) -> None:
        self.node = node
        self.client = node.client
        self.types = {t.agent_type: t for t in types}
        config = node.config
        self.max_active = config.max_active_agents
        self.idle_after = config.idle_after
        self._concurrency = config.concurrency
        self._turns_running = 0
        self._ready: deque[Activation] = deque()  # activations with messages, waiting for a slot
        self._buffer_limit = max(1000, 8 * config.concurrency)
        self._parts: dict[Partition, _PartitionState] = {}
        self._mailboxes: dict[str, Partition] = {}
        self.activations: OrderedDict[str, Activation] = OrderedDict()
        self.running_tasks: dict[str, Attempt] = {}
        self._buffered = 0
        self._room = asyncio.Event()
        # per key group: a blocking read covers one slot, so each group has a reader
        self._ownership_changed: dict[int, asyncio.Event] = {}
        self._reads: dict[int, asyncio.Future[Any]] = {}
        self._stopping = False
        self._handing_back = False  # draining past the grace period: start no more turns
        self._evicting = False
        self._dirty: set[str] = set()  # agent ids whose directory entry changed
        self._gone: set[str] = set()  # agent ids deactivated since the last publish
        self._published: set[str] = set()  # agent ids in this node's active:<node> hash
        self._handovers: set[asyncio.Task[None]] = set()
        self.partitions = 0
        self.keeper: LeaseKeeper | None = None
        self.turns = 0
        self._load = Coalescer("loading agent state", self._load_batch)
        self._begin = Coalescer("starting agent tasks", self._begin_batch)
        # A commit that fails is tried again, whatever the engine said (out of memory,
        # read-only replica, ...): dropping it would let the agent's next turn commit
        # over it, and the message would run again later, out of order.
        self._commit = Coalescer(
            "committing agent turns", self._commit_batch, retry_on=(EngineUnavailable, EngineError)
        )

    # --- lifecycle -------------------------------------------------------------------

    @property
    def keys(self) -> Any:
        """The client's key layout (known once it connected: the group count)."""
        return self.node.keys

    async def start(self) -> None:
        """Before the node's loops: learn the partition count, start the lease keeper."""
        self.partitions = await self.client.partitions()
        loop = asyncio.get_running_loop()
        config = self.node.config

        def notify(change: Change) -> None:
            loop.call_soon_threadsafe(self._on_change, change)

        self.keeper = LeaseKeeper(
            self.client.url, self.keys, self.node.node_id, sorted(self.types), self.partitions,
            lease_time=config.lease_time or config.dead_after, interval=config.heartbeat_interval,
            dead_after=config.dead_after, notify=notify,
        )  # fmt: skip
        self.keeper.start()

    async def run(self, closing: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as group:
            for key_group in range(self.keys.groups):
                group.create_task(self._read_loop(key_group, closing))
            group.create_task(self._housekeeping(closing))
            group.create_task(self._broadcast_listener(closing))
            group.create_task(self._watch_leases(closing))

    async def drain(self, grace: float) -> None:
        """Stop reading; let read messages finish within ``grace``; give up the rest
        (they stay in the mailboxes); release every lease so others take over now."""
        self._stopping = True
        if self.keeper is not None:
            self.keeper.pause_acquiring()
        self._wake_reader()
        await self._leave_placement()
        parts = set(self._parts)
        settled = [self._parts[p].settled.wait() for p in parts if self._parts[p].in_flight]
        if settled:
            log.info(
                "agents: finishing the turns of %d partition(s), grace %.1fs", len(settled), grace
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*settled)
        await self._hand_back_running_tasks()
        for act in list(self.activations.values()):
            if act.queue or act.running:
                self._abandon(act)  # its messages stay in the mailbox for the next owner
            else:
                await self._deactivate(act)
        released = len(self._parts)
        await self._release(set(self._parts))
        log.info("released %d partition(s)", released)
        if self.keeper is not None:
            self.keeper.stop()
        await self._publish_directory(final=True)

    async def _hand_back_running_tasks(self) -> None:
        """Addressed tasks still running after the grace period are stopped and handed
        back: queued again in place (their mailbox entry stays, so they keep their
        order), the attempt not counted — as a draining node does with capability tasks."""
        self._handing_back = True
        attempts = list(self.running_tasks.values())
        drives = set()
        for attempt in attempts:
            attempt.handed_back = True
            if attempt.task is not None:
                attempt.task.cancel()
                drives.add(attempt.task)
        if not drives:
            return
        log.info("handing %d unfinished agent task(s) back", len(drives))
        await asyncio.wait(drives, timeout=5)
        commits = [
            act.last_commit
            for attempt in attempts
            if (act := self.activations.get(attempt.ctx.agent_id or "")) and act.last_commit
        ]
        if commits:
            await asyncio.wait(commits, timeout=5)

    async def _leave_placement(self) -> None:
        """Stop counting as a host of its types, so the other nodes plan without this
        one and take each partition as soon as it is released (not only after the
        node deregisters). The heartbeat re-adds a node's types from its record, so
        the record's list is emptied too."""
        node_id = self.node.node_id
        try:
            async with self.client.errors():
                pipe = self.client.redis.pipeline(transaction=True)
                pipe.hset(self.keys.node(node_id), "agent_types", "")
                for agent_type in self.types:
                    pipe.zrem(self.keys.agent_hosts(agent_type), node_id)
                await pipe.execute()
        except ShoalError as exc:
            log.warning("leaving agent placement failed (others wait for the leases): %s", exc)

    def load(self) -> dict[str, Any]:
        """What the heartbeat reports about agents (read from the heartbeat thread)."""
        return {"active_agents": len(self.activations), "partitions": len(self._parts),
                "turns": self.turns}  # fmt: skip

    # --- ownership ---------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        if change.lost:
            self._lose(change.lost)
        metrics.partitions_changed("acquired", change.acquired)
        for part, token in change.acquired.items():
            self._parts[part] = _PartitionState(token)
            self._mailboxes[self.keys.mailbox(*part)] = part
            log.debug("acquired %s/%d (token %d)", part[0], part[1], token)
        if self._stopping and change.acquired:  # acquired just as the drain began
            task = asyncio.ensure_future(self._release(set(change.acquired)))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        wanted_gone = {
            p
            for p in change.unwanted
            if p in self._parts and not self._parts[p].releasing and not self._stopping
        }
        if wanted_gone:
            log.info("handing %d partition(s) over to other nodes", len(wanted_gone))
        for part in wanted_gone:
            self._parts[part].releasing = True
            task = asyncio.ensure_future(self._hand_over(part))
            self._handovers.add(task)
            task.add_done_callback(self._handovers.discard)
        if change:
            self._wake_reader()

    def _lose(self, parts: set[Partition]) -> None:
        """The lease is gone (or may be): stop at once; nothing more of ours commits."""
        for part in parts:
            state = self._parts.pop(part, None)
            if state is None:
                continue
            metrics.partitions_changed("lost", [part])
            state.settled.set()  # a hand-over waiting for it has nothing left to do
            self._mailboxes.pop(self.keys.mailbox(*part), None)
            log.warning("partition %s/%d lost: its turns stop here", part[0], part[1])
        for act in [a for a in self.activations.values() if a.part in parts]:
            self._abandon(act)
        if self.keeper is not None:
            self.keeper.forget(parts)
        self._wake_reader()

    def _abandon(self, act: Activation) -> None:
        act.abandoned = True
        self._buffered -= len(act.queue)
        act.queue.clear()
        if act.turn is not None:
            act.turn.cancel()
        self._remove(act)

    async def _hand_over(self, part: Partition) -> None:
        """Rebalancing gave the partition to another node: finish what was read,
        deactivate its agents, then release the lease."""
        state = self._parts.get(part)
        if state is None:
            return
        if state.in_flight:
            await state.settled.wait()
        if self._parts.get(part) is not state:
            return  # lost meanwhile
        for act in [a for a in self.activations.values() if a.part == part]:
            await self._deactivate(act)
        await self._release({part})

    async def _release(self, parts: set[Partition]) -> None:
        """Give the leases up. The keeper forgets them first, so a renewal racing with
        the release is not mistaken for a lost lease."""
        owned = {p: self._parts[p].token for p in parts if p in self._parts}
        if not owned:
            return
        if self.keeper is not None:
            self.keeper.forget(set(owned))
        metrics.partitions_changed("released", owned)
        for part in owned:
            self._parts.pop(part, None)
            self._mailboxes.pop(self.keys.mailbox(*part), None)
        for act in [a for a in self.activations.values() if a.part in owned]:
            self._abandon(act)  # still busy (e.g. a broadcast turn): not ours any more
        by_group: dict[int, list[Any]] = {}
        for (agent_type, p), token in owned.items():
            by_group.setdefault(self.keys.partition_group(p), []).extend(
                ["release", agent_type, p, token]
            )
        try:
            for key_group, ops in by_group.items():
                args = [self.keys.group_prefix(key_group), self.node.node_id, 1, protocol.now_ms()]
                async with self.client.errors():
                    await self.client.scripts.lease([self.keys.lease_tokens(key_group)], args + ops)
        except ShoalError as exc:
            log.warning(
                "releasing %d partition(s) failed (they expire instead): %s", len(owned), exc
            )
        if self.keeper is not None:
            self.keeper.poke()
        log.debug("released %d partition(s)", len(owned))

    # --- reading mailboxes ---------------------------------------------------------------

    def _wake_reader(self) -> None:
        for changed in self._ownership_changed.values():
            changed.set()
        for read in self._reads.values():
            if not read.done():
                asyncio.get_running_loop().call_soon(read.cancel)

    async def _read_loop(self, key_group: int, closing: asyncio.Event) -> None:
        """Read the mailboxes of the owned partitions of one key group."""
        backoff = Backoff()
        groups = self.keys.groups
        changed = self._ownership_changed.setdefault(key_group, asyncio.Event())
        while not closing.is_set() and not self._stopping:
            streams = {
                self.keys.mailbox(*part): state.last_id
                for part, state in self._parts.items()
                if not state.releasing and part[1] % groups == key_group
            }
            # the buffer's room is shared among the groups' readers
            room = (self._buffer_limit - self._buffered) // groups
            if not streams or room <= 0:
                changed.clear()
                self._room.clear()
                waiters = [asyncio.ensure_future(e.wait()) for e in (changed, self._room)]
                waiters.append(asyncio.ensure_future(closing.wait()))
                _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for waiter in pending:
                    waiter.cancel()
                continue
            changed.clear()
            read = self._reads[key_group] = asyncio.ensure_future(
                self.client.blocking.xread(
                    # COUNT is per stream: the room is shared among the streams (at
                    # least a few each, so one busy partition is not read 1 by 1;
                    # the buffer may overshoot by that much, still bounded)
                    streams,
                    count=max(READ_MIN_PER_STREAM, min(READ_BATCH, room // len(streams))),
                    block=READ_BLOCK_MS,
                )
            )
            try:
                reply = await read
            except asyncio.CancelledError:
                if closing.is_set() or self._stopping:
                    return
                continue  # ownership changed: read again from the new set
            except redis.RedisError as exc:
                delay = backoff.next_delay()
                log.warning(
                    "reading mailboxes failed: %s; retrying in %.2fs",
                    translate(exc, self.client.url),
                    delay,
                )
                await asyncio.sleep(delay)  # back-off while the engine is away
                continue
            finally:
                self._reads.pop(key_group, None)
            backoff.reset()
            for stream, entries in reply or ():
                self._take(stream.decode(), entries)

    def _take(self, stream: str, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        part = self._mailboxes.get(stream)
        state = self._parts.get(part) if part else None
        if part is None or state is None or state.releasing:
            return  # no longer ours: the next owner reads these from the start
        for entry_id, fields in entries:
            state.last_id = entry_id.decode()
            try:
                message = Message.from_entry(part, entry_id, fields)
            except (KeyError, UnicodeDecodeError):
                log.error("dropping malformed mailbox entry %s in %s", entry_id, stream)
                self._commit(_Commit(part, state.token, entry_id.decode(), ""))
                continue
            state.in_flight += 1
            state.settled.clear()
            self._buffered += 1
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        act = self.activations.get(message.agent_id)
        if act is None:
            act = Activation(message.agent_id, message.part)
            self.activations[message.agent_id] = act
        act.queue.append(message)
        if not act.running:
            self._schedule(act)

    # --- turns ------------------------------------------------------------------------------

    def _schedule(self, act: Activation) -> None:
        """Give an activation with messages a turn slot now, or a place in line.
        (A slot count and a line instead of a semaphore: no task exists, and none
        waits, for an activation that cannot run yet.)"""
        act.running = True
        if self._turns_running < self._concurrency and not self._handing_back:
            self._start_drive(act)
        else:
            self._ready.append(act)

    def _start_drive(self, act: Activation) -> None:
        self._turns_running += 1
        asyncio.ensure_future(self._drive(act)).add_done_callback(_log_crash)

    def _pump(self) -> None:
        """Start activations waiting in line while there are free slots."""
        while self._ready and self._turns_running < self._concurrency and not self._handing_back:
            act = self._ready.popleft()
            if act.abandoned or not act.queue:
                act.running = False
                continue
            self._start_drive(act)

    async def _drive(self, act: Activation) -> None:
        """Run the activation's queued messages one at a time, in order, holding one
        turn slot; when others wait for a slot, it goes back in line after each turn."""
        in_line = False
        backoff = Backoff()
        try:
            while act.queue and not act.abandoned and not self._handing_back:
                message = act.queue[0]
                lease = self.keeper.valid(message.part) if self.keeper else None
                state = self._parts.get(message.part)
                if lease is None or state is None or lease.token != state.token:
                    self._lose({message.part})
                    return
                if act.token != state.token:
                    # first turn under this lease: an instance from an earlier
                    # ownership may hold state older than the saved one
                    act.agent, act.token = None, state.token
                act.turn = asyncio.current_task()
                try:
                    await self._turn(act, message, state.token)
                except asyncio.CancelledError:
                    if not act.abandoned:
                        raise
                    return
                except Exception as exc:
                    # An engine error while loading or starting (or a bug): the
                    # message stays first in line and is tried again after a pause.
                    delay = backoff.next_delay()
                    log.warning(
                        "turn of %s failed (%s: %s); trying again in %.2fs",
                        act.agent_id, type(exc).__name__, exc, delay,
                        exc_info=not isinstance(exc, ShoalError),
                    )  # fmt: skip
                    await asyncio.sleep(delay)  # back-off before the same message again
                    continue
                finally:
                    act.turn = None
                backoff.reset()
                if act.queue and act.queue[0] is message:
                    act.queue.popleft()
                    self._buffered -= 1
                    if self._buffered < self._buffer_limit:
                        self._room.set()
                if self._ready and act.queue:  # others wait: take turns
                    self._ready.append(act)
                    in_line = True
                    return
        finally:
            self._turns_running -= 1
            if not in_line:
                act.running = False
            self._pump()
            self._after_turns()

    async def _turn(self, act: Activation, message: Message, token: int) -> None:
        """One turn. Engine errors while loading or starting propagate (the caller
        tries the message again); a failure of the agent's own code fails the turn."""
        activation_error: Exception | None = None
        if act.agent is None:
            try:
                await self._activate(act)
            except ShoalError:
                raise
            except Exception as exc:  # the class's __init__, or a state it cannot load
                log.exception("activating %s failed", act.agent_id)
                activation_error = exc
        act.last_message_at = protocol.now_ms()
        self.activations.move_to_end(act.agent_id)
        self._dirty.add(act.agent_id)
        commit = _Commit(message.part, token, message.entry_id, act.agent_id)
        ok: bool | None = True
        if message.kind == "task":
            ok = await self._task_turn(act, message, token, commit, activation_error)
        elif activation_error is not None:
            ok = self._failed_message(act, message, token, commit, activation_error)
        elif message.kind == "del":
            assert act.agent is not None
            had_state = bool(act.agent.__dict__["_shoal_state"]) or bool(act.saved)
            act.agent.__dict__["_shoal_state"] = {}
            commit.reply, commit.correlation = message.reply, message.correlation
            commit.reply_status, commit.payload = "replied", protocol.encode_result(had_state)
        else:
            ok = await self._message_turn(act, message, token, commit)
        self.turns += 1
        metrics.agent_turn(act.agent_id.partition("/")[0], message.kind)
        if ok is None:
            return  # the partition was lost before the task could start: commit nothing
        self._settle_state(act, commit, ok)
        if self.keeper is None or self.keeper.valid(message.part) is None:
            # The lease may have moved while the turn ran (e.g. the process was
            # paused): write nothing; the engine would refuse it anyway.
            self._lose({message.part})
            return
        act.last_commit = self._commit(commit)
        act.last_commit.add_done_callback(lambda fut: self._committed(message, token, fut))

    async def _activate(self, act: Activation) -> None:
        cls = self.types[act.agent_id.partition("/")[0]]
        raw = await self._load((act.part, act.agent_id))
        state = protocol.decode(raw) if raw else {}
        if not isinstance(state, dict):
            raise SerializationError(f"the saved state of {act.agent_id} is not a dict")
        agent = cls()
        agent.__dict__["_shoal_id"] = act.agent_id
        agent.__dict__["_shoal_state"] = state
        act.agent, act.saved = agent, raw or b""
        act.activated_at = protocol.now_ms()
        metrics.AGENT_ACTIVATIONS.labels(cls.agent_type).inc()
        try:
            await _call(agent.on_activate)
        except Exception:
            log.exception("%s.on_activate failed for %s", cls.__qualname__, act.agent_id)

    async def _task_turn(
        self,
        act: Activation,
        message: Message,
        token: int,
        commit: _Commit,
        activation_error: Exception | None = None,
    ) -> bool | None:
        """Start and run an addressed task. True/False: it succeeded/failed (a failed
        turn's state changes are undone); None: this node no longer holds the lease."""
        verdict = await self._begin((message, token))
        if verdict[0] == b"stale":
            self._lose({message.part})
            return None
        if verdict[0] != b"run":
            return True  # nothing to run: the entry is just deleted
        _, cap, args, attempt, max_att, timeout, parent, trace, by = verdict
        capability = cap.decode()
        spec = self.types[act.agent_id.partition("/")[0]].capabilities().get(capability)
        job = Job(
            queue=self.keys.mailbox(*message.part), entry_id=message.entry_id,
            task_id=message.task_id, capability=capability, args=args, attempt=int(attempt),
            max_attempts=int(max_att), timeout=float(timeout) if timeout else None,
            parent=parent.decode() or None, traceparent=trace.decode() or None, token=token,
            submitted_by=by.decode() or None,
        )  # fmt: skip
        commit.task_id = message.task_id
        if spec is None:
            outcome = Outcome(job, "failed", protocol.encode(ErrorInfo(
                "shoal.errors.UnknownAgentType",
                f"agent type {act.agent_id.partition('/')[0]!r} on node {self.node.node_id} "
                f"has no capability {capability!r}", attempt=job.attempt, node=self.node.node_id,
            )))  # fmt: skip
        elif activation_error is not None or act.agent is None:
            failure = activation_error or ShoalError(f"{act.agent_id} is not activated")
            outcome = failure_outcome(job, spec, failure, self.node.node_id)
        else:
            ctx = self._context(act, message, token, job=job)
            attempt_run = Attempt(job, spec, act.agent, ctx)
            attempt_run.task = asyncio.current_task()
            self.running_tasks[job.task_id] = attempt_run
            try:
                result = await attempt_run.run(self.node._executor, self.node.node_id)
            finally:
                self.running_tasks.pop(job.task_id, None)
            await self._events_written(ctx)
            outcome = result or Outcome(job, "requeue")
            if not spec.is_async and outcome.kind in ("cancelled", "requeue", "retry", "dead"):
                self._drop_instance(act, outcome)
        commit.outcome, commit.payload, commit.due_ms = (
            outcome.kind,
            outcome.payload,
            outcome.due_ms,
        )
        if outcome.kind == "requeue":  # handed back by a draining node (see drain)
            commit.outcome, commit.entry_id = "handback", ""
        return outcome.kind == "ok"  # a cancelled or failed turn's state changes are undone

    async def _events_written(self, ctx: TaskContext) -> None:
        """Wait (bounded) until the turn's events are in the engine. The turn's
        commit — its outcome and the task's 'done' event — is written by
        turn_end.lua, apart from the recorder's batches: without this wait it can
        overtake the last events, and a follower stops before them."""
        pending = ctx.pending_events
        if pending is None and ctx.emitted and self.node.recorder.has_pending:
            pending = self.node.recorder.flushed()  # a sync handler emitted from its thread
        if pending is not None and not pending.done():
            await asyncio.wait({pending}, timeout=EVENTS_WAIT_S)

    def _drop_instance(self, act: Activation, outcome: Outcome) -> None:
        """A sync handler's thread cannot be stopped: after a timeout or cancel it may
        still run and write to the instance. The next turn gets a fresh instance from
        the saved state, so nothing that thread does is ever saved."""
        if outcome.kind != "retry" or b"TaskTimeout" in outcome.payload:
            act.agent = None

    def _failed_message(
        self, act: Activation, message: Message, token: int, commit: _Commit, exc: Exception
    ) -> bool:
        if not message.reply:
            log.error("agent %s could not handle a message: %s", act.agent_id, exc)
        job = Job("", message.entry_id, "", "", b"", 1, 1, None, None, None, token)
        commit.reply, commit.correlation = message.reply, message.correlation
        commit.reply_status = "failed"
        commit.payload = protocol.encode(error_info(exc, job, self.node.node_id))
        return False

    async def _message_turn(
        self, act: Activation, message: Message, token: int, commit: _Commit
    ) -> bool:
        assert act.agent is not None
        cls = type(act.agent)
        spec: MessageSpec | None
        if message.kind == "pub":
            spec = cls.subscriptions().get(message.topic or "")
        else:
            spec = cls.message_handler()
        ctx = self._context(act, message, token)
        commit.reply, commit.correlation = message.reply, message.correlation
        watch = TurnWatch(message.kind, self.node.node_id, ctx)  # its span, if tracing is on
        try:
            if spec is None:
                what = f"topic {message.topic!r}" if message.kind == "pub" else "messages"
                raise ShoalError(f"agent type {cls.agent_type!r} does not handle {what}")
            body = protocol.decode(message.payload) if message.payload else None
            current = current_context.set(ctx)
            try:
                method = getattr(act.agent, spec.method_name)
                result = await _call(
                    method, body, run_sync=self.node._executor if not spec.is_async else None
                )
            finally:
                current_context.reset(current)
            commit.reply_status, commit.payload = "replied", protocol.encode_result(result)
            watch.end(None)
            return True
        except Exception as exc:
            if not message.reply:
                log.exception("agent %s failed to handle a message", act.agent_id)
            watch.end(exc)
            job = Job("", message.entry_id, "", "", b"", 1, 1, None, None, None, token)
            commit.reply_status = "failed"
            commit.payload = protocol.encode(error_info(exc, job, self.node.node_id))
            return False

    def _context(
        self, act: Activation, message: Message, token: int, job: Job | None = None
    ) -> TaskContext:
        return TaskContext(
            self.node, job.task_id if job else "", job.capability if job else "",
            job.attempt if job else 1, message.traceparent, self.node.recorder.flushed, token,
            agent_id=act.agent_id, sender=message.sender, topic=message.topic,
            submitted_by=job.submitted_by if job else None,
        )  # fmt: skip

    def _settle_state(self, act: Activation, commit: _Commit, ok: bool) -> None:
        """Save the state if the turn changed it; a failed turn's changes are undone."""
        if act.agent is None:
            return  # not activated (or dropped after a sync handler timed out)
        if not ok:
            act.agent.__dict__["_shoal_state"] = protocol.decode(act.saved) if act.saved else {}
            return
        state = act.agent.__dict__["_shoal_state"]
        try:
            blob = protocol.encode(state) if state else b""
        except (TypeError, OverflowError, ValueError) as exc:
            log.error(
                "agent %s: its state cannot be saved (%s); values must be msgpack data; "
                "the turn's changes are undone", act.agent_id, exc,
            )  # fmt: skip
            act.agent.__dict__["_shoal_state"] = protocol.decode(act.saved) if act.saved else {}
            failure = protocol.encode(ErrorInfo(
                "shoal.errors.SerializationError",
                f"the agent's state cannot be saved ({exc}); state values must be msgpack data",
                node=self.node.node_id, at=protocol.now_ms(),
            ))  # fmt: skip
            if commit.reply and commit.reply_status == "replied":
                commit.reply_status, commit.payload = "failed", failure
            if commit.task_id and commit.outcome == "ok":
                commit.outcome, commit.payload = "failed", failure  # final: retrying cannot help
            return
        if blob != act.saved:
            commit.state_op, commit.state = ("set", blob) if blob else ("delete", b"")
            act.saved = blob

    def _committed(self, message: Message, token: int, fut: asyncio.Future[int]) -> None:
        state = self._parts.get(message.part)
        if state is None or state.token != token:
            return  # a commit of an earlier ownership: that one is over already
        if fut.cancelled() or fut.exception() is not None:
            exc = None if fut.cancelled() else fut.exception()
            log.error("committing a turn of %s failed: %s", message.agent_id, exc)
            self._lose({message.part})
        elif not fut.result():
            log.warning(
                "turn of %s refused: partition %s/%d belongs to another node now",
                message.agent_id, *message.part,
            )  # fmt: skip
            self._lose({message.part})
        if state is not None and message.entry_id:
            state.in_flight -= 1
            if state.in_flight <= 0:
                state.in_flight = 0
                state.settled.set()

    # --- batches -------------------------------------------------------------------------

    async def _load_batch(self, items: list[tuple[Partition, str]]) -> list[bytes | None]:
        async with self.client.errors():
            pipe = self.client.blocking.pipeline(transaction=False)
            for part, agent_id in items:
                pipe.hget(self.keys.state(*part), agent_id)
            return await pipe.execute()  # type: ignore[no-any-return]

    async def _begin_batch(self, items: list[tuple[Message, int]]) -> list[list[Any]]:
        async def begin(key_group: int, batch: list[tuple[Message, int]]) -> list[Any]:
            args: list[Any] = [
                self.keys.group_prefix(key_group), protocol.now_ms(),
                int(self.client.settings.retention * 1000), _EXPIRED, self.node.node_id,
            ]  # fmt: skip
            for message, token in batch:
                args += [message.part[0], message.part[1], token, message.task_id]
            async with self.client.errors():
                verdicts: list[Any] = await self.client.scripts.turn_begin(
                    [self.keys.delayed(key_group)], args, on=self.client.blocking
                )
            return verdicts

        return await self._per_group(items, lambda item: item[0].part[1], begin)

    async def _commit_batch(self, items: list[_Commit]) -> list[int]:
        async def commit(key_group: int, batch: list[_Commit]) -> list[Any]:
            args: list[Any] = [
                self.keys.group_prefix(key_group), protocol.now_ms(),
                int(self.client.settings.retention * 1000), self.node.node_id,
            ]  # fmt: skip
            for item in batch:
                args += item.fields()
            async with self.client.errors():
                committed: list[Any] = await self.client.scripts.turn_end(
                    [self.keys.delayed(key_group)], args, on=self.client.blocking
                )
            return committed

        return await self._per_group(items, lambda item: item.part[1], commit)

    async def _per_group(
        self,
        items: list[T],
        partition: Callable[[T], int],
        run: Callable[[int, list[T]], Awaitable[list[Any]]],
    ) -> list[Any]:
        """Run a batch script once per key group (a script runs in one slot), the
        groups concurrently, and give the replies back in the items' order."""
        groups = self.keys.groups
        if groups == 1:
            return await run(0, items)
        positions: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            positions.setdefault(partition(item) % groups, []).append(index)
        replies = await asyncio.gather(
            *(run(g, [items[i] for i in idx]) for g, idx in positions.items())
        )
        out: list[Any] = [None] * len(items)
        for idx, reply in zip(positions.values(), replies, strict=True):
            for i, value in zip(idx, reply, strict=True):
                out[i] = value
        return out

    # --- deactivation, directory, broadcasts ----------------------------------------------

    def _after_turns(self) -> None:
        if len(self.activations) > self.max_active and not self._evicting:
            self._evicting = True
            asyncio.ensure_future(self._evict()).add_done_callback(_log_crash)

    async def _evict(self) -> None:
        """Deactivate least recently used idle agents until at most ``max_active``
        remain. One evictor at a time; it walks the LRU order from the oldest, so it
        looks at about as many activations as it evicts."""
        try:
            while (excess := len(self.activations) - self.max_active) > 0:
                victims: list[Activation] = []
                for act in self.activations.values():
                    if not act.running and not act.queue:
                        victims.append(act)
                        if len(victims) >= excess:
                            break
                if not victims:
                    return  # every one is busy: try again after the next turns
                slow = [act for act in victims if not self._deactivate_at_once(act)]
                if slow:
                    await asyncio.gather(*(self._deactivate(act) for act in slow))
        finally:
            self._evicting = False

    def _deactivate_at_once(self, act: Activation) -> bool:
        """The common case without awaiting anything: no on_deactivate of its own (so
        no state change to save) and its last commit is done. True if it is gone."""
        plain = act.agent is None or type(act.agent).on_deactivate is Agent.on_deactivate
        committed = act.last_commit is None or act.last_commit.done()
        if plain and committed and not act.running and not act.queue and not act.abandoned:
            self._remove(act)
            return True
        return False

    async def _deactivate(self, act: Activation) -> None:
        """Deactivate an idle agent: on_deactivate, then save its state, and only
        then forget it — so a message arriving meanwhile re-activates it from the
        saved state, never from an older one. (The activation counts as running
        meanwhile: messages for it queue up.)"""
        if (
            act.running
            or act.queue
            or act.abandoned
            or self.activations.get(act.agent_id) is not act
        ):
            return
        act.running = True
        try:
            state = self._parts.get(act.part)
            if act.agent is not None and state is not None and act.token == state.token:
                try:
                    await _call(act.agent.on_deactivate)
                except Exception:
                    log.exception("on_deactivate failed for %s", act.agent_id)
                commit = _Commit(act.part, state.token, "", act.agent_id)
                self._settle_state(act, commit, ok=True)
                if commit.state_op:
                    act.last_commit = self._commit(commit)
            if act.last_commit is not None:
                with contextlib.suppress(Exception):
                    await act.last_commit
        finally:
            act.running = False
        if act.abandoned:
            return
        if act.queue:  # messages arrived meanwhile: activate it afresh for them
            act.agent = None
            self._schedule(act)
        else:
            self._remove(act)

    def _remove(self, act: Activation) -> None:
        if self.activations.get(act.agent_id) is act:
            del self.activations[act.agent_id]
            self._dirty.discard(act.agent_id)
            self._gone.add(act.agent_id)
            if act.activated_at:  # it got as far as being activated
                metrics.AGENT_DEACTIVATIONS.labels(act.agent_id.partition("/")[0]).inc()

    async def _housekeeping(self, closing: asyncio.Event) -> None:
        """Deactivate agents idle past ``idle_after``; publish the directory."""
        while not await _wait(closing, DIRECTORY_EVERY_S):
            cutoff = protocol.now_ms() - int(self.idle_after * 1000)
            for act in list(self.activations.values()):
                if act.last_message_at >= cutoff:
                    break  # LRU order: the rest were used more recently
                await self._deactivate(act)
            try:
                await self._publish_directory()
            except ShoalError as exc:
                log.warning("publishing the active agents failed: %s", exc)

    async def _watch_leases(self, closing: asyncio.Event) -> None:
        """Stop every partition whose lease may have run out, even while the keeper's
        thread is stuck waiting for the engine (turns check before they start; this
        also stops the ones running)."""
        while not await _wait(closing, LEASE_WATCH_S):
            if self.keeper is None:
                continue
            expired = {p for p in self._parts if self.keeper.valid(p) is None}
            if expired:
                self._lose(expired)

    async def _publish_directory(self, final: bool = False) -> None:
        key = self.keys.active(self.node.node_id)
        if final:
            with contextlib.suppress(ShoalError):
                async with self.client.errors():
                    await self.client.redis.delete(key)
            return
        dirty, gone = self._dirty, self._gone
        if not dirty and not gone:
            return
        self._dirty, self._gone = set(), set()
        mapping = {}
        for agent_id in dirty:
            act = self.activations.get(agent_id)
            if act is not None:
                mapping[agent_id] = protocol.encode([act.activated_at, act.last_message_at])
        gone = (gone - mapping.keys()) & self._published  # never published: nothing to remove
        try:
            async with self.client.errors():
                pipe = self.client.redis.pipeline(transaction=False)
                if mapping:
                    pipe.hset(key, mapping=mapping)
                if gone:
                    pipe.hdel(key, *gone)
                await pipe.execute()
        except ShoalError:
            self._dirty |= dirty  # try again next round
            self._gone |= gone
            raise
        self._published = (self._published - gone) | mapping.keys()

    async def _broadcast_listener(self, closing: asyncio.Event) -> None:
        backoff = Backoff()
        while not closing.is_set() and not self._stopping:
            subscription = ShardSubscription(self.client.blocking, [self.keys.broadcast_channel])
            try:
                await subscription.open()
                backoff.reset()
                while not closing.is_set() and not self._stopping:
                    data = await subscription.next(timeout=0.5)
                    if data is not None:
                        self._on_broadcast(data)
            except redis.RedisError as exc:
                log.warning("broadcast listener: %s; reconnecting", translate(exc, self.client.url))
                await _wait(closing, backoff.next_delay())
            finally:
                await subscription.close()

    def _on_broadcast(self, data: bytes) -> None:
        try:
            agent_type, payload, sender = protocol.decode(data)
        except (ValueError, TypeError):
            log.error("ignoring a malformed broadcast")
            return
        if self._buffered >= self._buffer_limit:
            # broadcasts are ephemeral by contract: under a backlog they are dropped
            # rather than let memory grow without bound
            log.warning(
                "dropping a broadcast to %s: %d messages wait here", agent_type, self._buffered
            )
            return
        for act in list(self.activations.values()):
            if (
                act.agent is not None
                and act.agent_id.startswith(agent_type + "/")
                and not act.abandoned
            ):
                message = Message(
                    act.part, "", "bcast", act.agent_id, payload=payload, sender=sender
                )
                self._buffered += 1
                act.queue.append(message)
                if not act.running:
                    self._schedule(act)


_EXPIRED = protocol.encode(
    ErrorInfo("shoal.errors.DeadlineExceeded", "the deadline passed before the task started")
)


async def _call(method: Callable[..., Any], *args: Any, run_sync: Any = None) -> Any:
    """Call a handler or hook that may be sync or async (sync ones in ``run_sync``,
    an executor, when given — handlers may block; hooks are expected to be quick)."""
    if run_sync is not None and not inspect.iscoroutinefunction(method):
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, method, *args)
        return await loop.run_in_executor(run_sync, call)
    result = method(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


def _log_crash(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("agent host task crashed", exc_info=exc)
