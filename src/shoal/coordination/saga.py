"""Durable sagas: a sequence of steps, each a Shoal task with a compensation.

``handle = await client.sagas.start(saga)`` runs the steps in order; when one fails
(or the saga is cancelled, or runs past its timeout) the compensations of the steps
that completed — or may have — run in reverse, and ``await handle.result()`` raises
SagaFailed.

Who drives a saga: not a task. Every node runs a SagaRunner
(shoal.coordination.saga_runner) beside its task slots; a runner takes a saga by
taking the Lock ``saga:<id>`` and drives it until it ends, its node stops, or the
lock is lost. A dead node's lock lapses after its ttl and another runner takes
the saga over. Steps are ordinary tasks the runner submits, so a saga never
holds a task slot while it waits (a node with concurrency 1 runs sagas too).

What makes a resumed runner safe is the saga's **log** (a stream) and its
**record** (a hash), written together by saga.lua:

* every transition is logged before the runner acts on it, and a resumed runner
  replays the log (``replay``) and continues from it;
* a step's task id is made by the runner and logged (``step_submitting``) *before*
  the task is submitted with that id: a resumed runner always knows the task and
  awaits it (the submit script skips an id that exists, so submitting again is
  harmless) — a step is never run twice by the saga (the task itself is
  at-least-once, like every Shoal task: hence the key handed to the handler);
* every write carries the fencing token of the runner's lock, and saga.lua refuses
  a token lower than the highest it saw for the saga: a runner that lost its lock
  (paused past the ttl, then superseded) is refused and stops; a write to an ended
  saga is refused too.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import keyword
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from shoal import protocol
from shoal.errors import (
    ConfigurationError,
    ResultTimeout,
    SagaFailed,
    SagaNotFound,
    SerializationError,
    TaskNotFound,
)
from shoal.keys import validate_capability

if TYPE_CHECKING:
    from shoal.client import Client

TERMINAL = frozenset({"succeeded", "compensated", "cancelled", "compensation_failed"})
ACTIVE = ("pending", "running", "compensating")
STATUSES = (*ACTIVE, *sorted(TERMINAL))
WAIT_BLOCK_MS = 5000  # longest block on a saga's log before its status is read again
MAX_STEPS = 1000
LIST_SCAN = 20  # a status-filtered listing looks at this many sagas per one asked for

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # no ':': step keys are saga:<id>:<i>


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ConfigurationError(
            f"{what} {value!r:.80} is invalid: start with a letter or '_', then up to 127 "
            "letters, digits, '_', '.' or '-'"
        )
    return value


def validate_saga_id(saga_id: Any) -> str:
    if not isinstance(saga_id, str) or not _ID_RE.match(saga_id):
        raise ConfigurationError(
            f"saga id {saga_id!r:.80} is invalid: 1-128 letters, digits, '_', '.' or '-'"
        )
    return saga_id


def _positive(value: Any, what: str, *, whole: bool = False) -> None:
    kinds = int if whole else int | float
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise ConfigurationError(
            f"{what} must be a {'whole ' if whole else ''}number > 0, got {value!r}"
        )


def _arg_name(value: Any, what: str, *arg_sets: Mapping[str, Any] | None) -> None:
    """``key_arg``/``results_arg`` name a handler parameter the runner fills in."""
    from shoal.agent import TASK_OPTIONS  # (shoal.agent imports this package)

    if value is None:
        return
    if not isinstance(value, str) or not value.isidentifier() or keyword.iskeyword(value):
        raise ConfigurationError(f"{what} must be a parameter name, got {value!r}")
    if value in TASK_OPTIONS:
        raise ConfigurationError(f"{what} {value!r} clashes with the task option of that name")
    for args, whose in zip(arg_sets, ("args", "compensate_args"), strict=False):
        if args is not None and value in args:
            raise ConfigurationError(f"{what} {value!r} is also one of the step's {whose}")


class SagaStep(msgspec.Struct, frozen=True, kw_only=True):
    """One step: run ``capability`` with ``args``; to undo it, ``compensate`` with
    ``compensate_args`` (default: the step's own args).

    ``agent="type/key"`` sends both to that agent instead (an agent call).
    ``key_arg`` names a parameter that receives the step's idempotency key
    (``saga:<saga id>:<step index>``, the same for the step and its compensation,
    unique per saga and step), so a handler can deduplicate its side effects;
    ``results_arg`` one that receives the results of the steps completed before
    (``{step name: result}``; for the compensation, the step's own result
    included, unless its outcome is unknown). ``timeout``/``max_attempts``
    are the step task's options.
    """

    capability: str
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    compensate: str | None = None
    compensate_args: dict[str, Any] | None = None
    name: str = ""
    agent: str | None = None
    timeout: float | None = None
    max_attempts: int | None = None
    key_arg: str | None = None
    results_arg: str | None = None

    def __post_init__(self) -> None:
        validate_capability(self.capability)
        if self.compensate is not None:
            validate_capability(self.compensate)
        for what, value in (("args", self.args), ("compensate_args", self.compensate_args)):
            if value is not None and not (
                isinstance(value, dict) and all(isinstance(k, str) for k in value)
            ):
                raise ConfigurationError(
                    f"step {self.capability!r}: {what} must be a dict of keyword arguments"
                )
            if value is not None:
                protocol.encode_arguments(value)  # SerializationError naming the culprit
        if not self.name:
            msgspec.structs.force_setattr(self, "name", self.capability)
        _name(self.name, "step name")
        if self.agent is not None:
            protocol.AgentId.parse(self.agent)
        _positive(self.timeout, f"step {self.name!r}: timeout")
        _positive(self.max_attempts, f"step {self.name!r}: max_attempts", whole=True)
        where = (self.args, self.compensate_args)
        _arg_name(self.key_arg, f"step {self.name!r}: key_arg", *where)
        _arg_name(self.results_arg, f"step {self.name!r}: results_arg", *where)
        if self.key_arg is not None and self.key_arg == self.results_arg:
            raise ConfigurationError(f"step {self.name!r}: key_arg and results_arg are the same")

    def undo_args(self) -> dict[str, Any]:
        return dict(self.args if self.compensate_args is None else self.compensate_args)


class Saga:
    """A saga definition: a name and its steps, in order.

    >>> saga = (Saga("trip")
    ...         .step("book_flight", {"to": "OSL"}, compensate="cancel_flight")
    ...         .step("book_hotel", {"city": "Oslo"}, compensate="cancel_hotel"))

    ``timeout`` bounds the forward run (seconds from the start): past it, the
    running step is cancelled and the completed ones are compensated.
    ``compensation_attempts`` is each compensation task's max_attempts (retried
    with its capability's back-off); one that still fails leaves the saga
    ``compensation_failed`` — stopped, visible, never skipped.
    """

    def __init__(
        self,
        name: str,
        steps: Iterable[SagaStep] = (),
        *,
        timeout: float | None = None,
        compensation_attempts: int = 5,
    ) -> None:
        self.name = _name(name, "saga name")
        self.steps: list[SagaStep] = []
        _positive(timeout, "saga timeout")
        _positive(compensation_attempts, "compensation_attempts", whole=True)
        self.timeout = None if timeout is None else float(timeout)
        self.compensation_attempts = compensation_attempts
        for step in steps:
            self.add(step)

    def add(self, step: SagaStep) -> Saga:
        if not isinstance(step, SagaStep):
            raise ConfigurationError(f"saga {self.name!r}: steps are SagaStep, got {step!r:.80}")
        if any(s.name == step.name for s in self.steps):
            raise ConfigurationError(
                f"saga {self.name!r}: two steps are named {step.name!r}; give one another "
                "name= (results are passed on by step name)"
            )
        if len(self.steps) >= MAX_STEPS:
            raise ConfigurationError(f"saga {self.name!r}: at most {MAX_STEPS} steps")
        self.steps.append(step)
        return self

    def step(self, capability: str, args: dict[str, Any] | None = None, /, **options: Any) -> Saga:
        """Append a step (the options are SagaStep's); returns the saga, to chain."""
        try:
            step = SagaStep(capability=capability, args=args or {}, **options)
        except SerializationError:
            raise
        except TypeError as exc:  # an unknown option
            allowed = ", ".join(
                f for f in SagaStep.__struct_fields__ if f not in ("capability", "args")
            )
            raise ConfigurationError(
                f"saga {self.name!r}: {exc} (a step's options: {allowed})"
            ) from None
        return self.add(step)

    def encode(self) -> bytes:
        if not self.steps:
            raise ConfigurationError(f"saga {self.name!r} has no steps: add one with .step()")
        return protocol.encode(
            {
                "name": self.name, "steps": self.steps, "timeout": self.timeout,
                "compensation_attempts": self.compensation_attempts,
            }
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> Saga:
        raw = msgspec.msgpack.decode(data, type=_Definition)
        return cls(
            raw.name, raw.steps, timeout=raw.timeout,
            compensation_attempts=raw.compensation_attempts,
        )  # fmt: skip


class _Definition(msgspec.Struct):
    name: str
    steps: list[SagaStep]
    timeout: float | None
    compensation_attempts: int


# --- reading a saga: its log replayed ---------------------------------------------------


class SagaEntry(msgspec.Struct, frozen=True):
    """One transition in a saga's log."""

    id: str
    event: str
    step: int | None
    task: str | None
    detail: Any
    node: str | None
    at: int  # ms since the epoch (the engine's clock)


class SagaStepInfo(msgspec.Struct):
    """A step as the log tells it. ``status``: pending, running, succeeded, failed,
    unknown (its outcome is unknown: it may have succeeded, so it is compensated),
    compensating, compensated or compensation_failed. A listing (``list``) fills in
    all but ``result``; ``get`` everything."""

    name: str
    capability: str
    compensate: str | None
    agent: str | None
    status: str = "pending"
    task: str | None = None
    result: Any = None
    error: Any = None
    compensation_task: str | None = None
    compensation_error: Any = None


class SagaInfo(msgspec.Struct):
    """A saga: its summary, its steps and (from ``get``) its log."""

    id: str
    name: str
    status: str
    created_at: int
    updated_at: int
    step: int  # the index of the step it is at (-1 before the first)
    cancel_requested: bool
    coordinator: str | None  # the node whose runner drives (or last drove) it
    error: str | None
    steps: list[SagaStepInfo]
    log: list[SagaEntry] = msgspec.field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def entry_from_stream(entry_id: bytes, fields: dict[bytes, bytes]) -> SagaEntry:
    step, task, detail = fields.get(b"s", b""), fields.get(b"t", b""), fields.get(b"d", b"")
    return SagaEntry(
        id=entry_id.decode(),
        event=fields[b"e"].decode(),
        step=int(step) if step else None,
        task=task.decode() or None,
        detail=protocol.decode(detail) if detail else None,
        node=fields.get(b"n", b"").decode() or None,
        at=int(fields.get(b"at", b"0")),
    )


class Replayed(msgspec.Struct):
    """A saga's state after its log: the steps, and why it compensates (None while
    it runs forward; 'failure', 'cancel' or 'timeout' once it compensates)."""

    steps: list[SagaStepInfo]
    cause: str | None = None
    started: set[int] = msgspec.field(default_factory=set)  # steps logged as submitted


def replay(saga: Saga, entries: Iterable[SagaEntry]) -> Replayed:
    """The saga's state after ``entries``."""
    state = Replayed(
        [SagaStepInfo(s.name, s.capability, s.compensate, s.agent) for s in saga.steps]
    )
    for entry in entries:
        if entry.event == "compensating":
            detail = entry.detail if isinstance(entry.detail, dict) else {}
            state.cause = str(detail.get("cause", "failure"))
        elif entry.event == "compensation_retry":  # an operator's retry: run them again
            for step in state.steps:
                if step.status == "compensation_failed":
                    step.status, step.compensation_task = "compensating", None
                    step.compensation_error = None
        if entry.step is not None and 0 <= entry.step < len(state.steps):
            _apply(state.steps[entry.step], entry)
            if entry.event == "step_started":
                state.started.add(entry.step)
            elif entry.event == "step_not_run":
                state.started.discard(entry.step)
    return state


def _apply(step: SagaStepInfo, entry: SagaEntry) -> None:
    event = entry.event
    if event in ("step_submitting", "step_started"):
        step.status, step.task = "running", entry.task
    elif event == "step_not_run":  # its task was never submitted
        step.status, step.task = "pending", None
    elif event == "step_succeeded":
        step.status, step.result = "succeeded", entry.detail
    elif event == "step_failed":
        step.status, step.error = "failed", entry.detail
    elif event == "step_unknown":
        step.status, step.error = "unknown", entry.detail
    elif event in ("compensation_submitting", "compensation_started"):
        step.status, step.compensation_task = "compensating", entry.task
    elif event == "compensation_succeeded":
        step.status = "compensated"
    elif event == "compensation_failed":
        step.status, step.compensation_error = "compensation_failed", entry.detail


# --- the client's face ------------------------------------------------------------------


class SagaHandle:
    """A started saga: its id and ways to follow it."""

    __slots__ = ("_sagas", "id", "is_new")

    def __init__(self, sagas: Sagas, saga_id: str, is_new: bool = True) -> None:
        self._sagas = sagas
        self.id = saga_id
        self.is_new = is_new  # False when start() found a saga of this id already

    def __repr__(self) -> str:
        return f"SagaHandle({self.id!r})"

    async def status(self) -> SagaInfo:
        return await self._sagas.get(self.id)

    async def wait(self, timeout: float | None = None) -> SagaInfo:
        return await self._sagas.wait(self.id, timeout)

    async def result(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._sagas.result(self.id, timeout)

    async def cancel(self) -> str:
        return await self._sagas.cancel(self.id)


class Sagas:
    """``client.sagas``: start, inspect, wait for, cancel and retry sagas."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def _script(self, saga_id: str, op: str, *args: str | int | bytes) -> Any:
        client = self.client
        head: list[str | int | bytes] = [
            client.keys.prefix, op, int(client.settings.retention * 1000),
        ]  # fmt: skip
        async with client.errors():
            return await client.scripts.saga(list(client.keys.saga(saga_id)), [*head, *args])

    async def start(self, saga: Saga, *, saga_id: str | None = None) -> SagaHandle:
        """Record the saga; a node's runner picks it up at once (the record wakes the
        runners). With ``saga_id`` given, starting again is idempotent: the handle of
        the saga of that id comes back (``is_new`` False), whatever definition it
        was started with."""
        if not isinstance(saga, Saga):
            raise ConfigurationError(f"start() takes a Saga, got {type(saga).__name__}")
        saga_id = protocol.new_id() if saga_id is None else validate_saga_id(saga_id)
        definition = saga.encode()
        created = await self._script(
            saga_id, "create", saga_id, saga.name, definition, len(saga.steps)
        )
        return SagaHandle(self, saga_id, is_new=bool(created))

    def handle(self, saga_id: str) -> SagaHandle:
        return SagaHandle(self, validate_saga_id(saga_id), is_new=False)

    async def cancel(self, saga_id: str) -> str:
        """Stop the saga and roll it back: the running step's task is cancelled, and
        the steps that completed (or may have: a step cancelled while it ran) are
        compensated; it ends 'cancelled'. Returns 'cancelling', or
        'already_<status>' for a saga that had ended."""
        outcome, running = (await self._script(validate_saga_id(saga_id), "cancel"))[:2]
        if outcome == b"missing":
            raise self._missing(saga_id)
        if running:  # (its runner cancels it too, should it not be submitted yet)
            with contextlib.suppress(TaskNotFound):
                await self.client.cancel(running.decode())
        return str(outcome.decode())

    async def retry_compensation(self, saga_id: str) -> str:
        """Run the compensations of a saga stuck in ``compensation_failed`` again
        (after an operator fixed the cause): the one that failed first, then the
        earlier ones. Returns 'retrying'; ConfigurationError for a saga in another
        status."""
        outcome = await self._script(validate_saga_id(saga_id), "retry")
        if isinstance(outcome, list):  # {'missing', ...}
            raise self._missing(saga_id)
        text = outcome.decode()
        if text.startswith("not_stuck:"):
            raise ConfigurationError(
                f"saga {saga_id} is {text.partition(':')[2]}, not compensation_failed: only a "
                "saga stuck in compensation_failed can have its compensations retried"
            )
        return str(text)

    async def get(self, saga_id: str) -> SagaInfo:
        """The saga with its steps and its whole log."""
        record, entries = await self._read(validate_saga_id(saga_id))
        saga = Saga.decode(record[b"def"])
        return _info(saga_id, record, saga, replay(saga, entries).steps, entries)

    async def list(self, *, status: str | None = None, limit: int = 50) -> list[SagaInfo]:
        """Sagas newest first, optionally only those in ``status`` among the newest
        ``limit * LIST_SCAN``; from their records (steps without their results, no
        logs: ``get`` has those). Sagas that have not ended, and
        those stuck in compensation_failed, stay listed however old."""
        if status is not None and status not in STATUSES:
            raise ConfigurationError(
                f"saga status {status!r} is unknown: use one of {', '.join(STATUSES)}"
            )
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ConfigurationError(f"limit must be a whole number 1..1000, got {limit!r}")
        client, found = self.client, builtins.list[SagaInfo]()
        scan = limit * LIST_SCAN  # bounded, as a filtered task listing is
        # sagas that have not ended are all in the active set, however old
        index = client.keys.sagas_active if status in ACTIVE else client.keys.sagas
        async with client.errors():
            raw = await client.redis.zrevrange(index, 0, scan - 1)
        ids = [i.decode() for i in raw]
        for start in range(0, len(ids), limit):
            for info in await self._many(ids[start : start + limit]):
                if status is None or info.status == status:
                    found.append(info)
            if len(found) >= limit:
                break
        return found[:limit]

    async def _many(self, ids: builtins.list[str]) -> builtins.list[SagaInfo]:
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            for saga_id in ids:
                pipe.hgetall(self.client.keys.saga(saga_id)[0])
            records = await pipe.execute()
        infos = []
        for saga_id, record in zip(ids, records, strict=True):
            if record:  # (expired since it was listed)
                saga = Saga.decode(record[b"def"])
                infos.append(_info(saga_id, record, saga, _record_steps(saga, record), []))
        return infos

    async def _read(self, saga_id: str) -> tuple[dict[bytes, bytes], builtins.list[SagaEntry]]:
        record_key, log_key = self.client.keys.saga(saga_id)[:2]
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hgetall(record_key)
            pipe.xrange(log_key)
            record, raw = await pipe.execute()
        if not record:
            raise self._missing(saga_id)
        return record, [entry_from_stream(i, f) for i, f in raw]

    def _missing(self, saga_id: str) -> SagaNotFound:
        return SagaNotFound(
            f"no saga {saga_id} in namespace {self.client.settings.namespace!r} (never "
            "started here, or expired after its retention)"
        )

    async def wait(self, saga_id: str, timeout: float | None = None) -> SagaInfo:
        """Wait until the saga ends (up to ``timeout`` seconds, then ResultTimeout) and
        return it. Blocks on the saga's log, which its end is written to."""
        _positive(timeout, "timeout")
        validate_saga_id(saga_id)
        try:
            async with asyncio.timeout(timeout):
                await self._wait(saga_id, timeout)
        except TimeoutError:
            raise ResultTimeout(
                f"saga {saga_id} has not ended after {timeout}s; it goes on (wait again, or "
                "cancel it)"
            ) from None
        return await self.get(saga_id)

    async def _wait(self, saga_id: str, timeout: float | None) -> None:
        """Until the saga is in a terminal status: its status and its log's last
        entry id are read (two small reads), then a blocking read waits for the log's
        next entry — no log is read whole while waiting."""
        record_key, log_key = self.client.keys.saga(saga_id)[:2]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            async with self.client.errors():
                pipe = self.client.redis.pipeline(transaction=False)
                pipe.hget(record_key, "status")
                pipe.xrevrange(log_key, count=1)
                status, last = await pipe.execute()
            if status is None:
                raise self._missing(saga_id)
            if status.decode() in TERMINAL:
                return
            # A block no longer than the time left: redis-py can let a blocking read
            # outlive the cancellation of its caller.
            block = WAIT_BLOCK_MS
            if deadline is not None:
                block = max(1, min(block, int((deadline - loop.time()) * 1000)))
            async with self.client.errors():
                await self.client.blocking.xread(
                    {log_key: last[0][0] if last else "0-0"}, count=1, block=block
                )

    async def result(self, saga_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The completed saga's results (``{step name: result}``); SagaFailed if it
        was rolled back, cancelled, or is stuck in compensation_failed."""
        info = await self.wait(saga_id, timeout)
        if info.status == "succeeded":
            return {s.name: s.result for s in info.steps}
        failed = next((s.name for s in info.steps if s.status in ("failed", "unknown")), None)
        if failed is None and 0 <= info.step < len(info.steps):
            failed = info.steps[info.step].name  # (a compensated step that may have run)
        raise SagaFailed(saga_id, info.status, failed, info.error or info.status)


def _record_steps(saga: Saga, record: dict[bytes, bytes]) -> builtins.list[SagaStepInfo]:
    """The steps as the record summarises them (status and task ids)."""
    steps = []
    for n, s in enumerate(saga.steps):
        status, task, undo = (record.get(f"{k}{n}".encode(), b"").decode() for k in "stc")
        error, undo_error = (record.get(f"{k}{n}".encode()) for k in "ex")
        steps.append(
            SagaStepInfo(
                s.name, s.capability, s.compensate, s.agent, status=status or "pending",
                task=task or None, compensation_task=undo or None,
                error=protocol.decode(error) if error else None,
                compensation_error=protocol.decode(undo_error) if undo_error else None,
            )
        )  # fmt: skip
    return steps


_TEXT_FIELDS = frozenset(
    f.encode() for f in ("name", "status", "created", "updated", "step", "cancel", "coordinator",
                         "error")
)  # fmt: skip


def _info(
    saga_id: str,
    record: dict[bytes, bytes],
    saga: Saga,
    steps: builtins.list[SagaStepInfo],
    entries: builtins.list[SagaEntry],
) -> SagaInfo:
    text = {k.decode(): v.decode() for k, v in record.items() if k in _TEXT_FIELDS}
    return SagaInfo(
        id=saga_id,
        name=text.get("name", saga.name),
        status=text.get("status", "pending"),
        created_at=int(text.get("created", "0")),
        updated_at=int(text.get("updated", "0")),
        step=int(text.get("step", "-1")),
        cancel_requested=text.get("cancel") == "1",
        coordinator=text.get("coordinator") or None,
        error=text.get("error") or None,
        steps=steps,
        log=entries,
    )
