"""Driving one saga from its log: what a SagaRunner does with a saga it holds.

A ``Coordinator`` is one run over one saga by the runner that holds the saga's lock
(shoal.coordination.saga_runner). It replays the log and continues:

* forward: for each step not yet done, a task id is made and logged
  (``step_submitting``) before the task is submitted with that id, then logged as
  started and awaited; its outcome is logged;
* backward (a step failed, the saga was cancelled, or its timeout passed): the
  compensations of the steps that completed — or may have — run in reverse, each
  logged the same way; one that fails after its attempts stops the saga in
  ``compensation_failed``.

Outcomes of a step (``_settle``):

* succeeded → compensated on a rollback;
* failed (the handler raised, its attempts ran out, or it was cancelled before it
  started) → not compensated: it did not complete;
* unknown → compensated: the task was cancelled after it had started (an async
  handler may have finished its side effect; a sync one goes on in its thread),
  or its record expired before the runner read it (a runner resumed more than a
  retention period later). "Maybe done" is treated as done.

Every log write carries the fencing token of the runner's lock; saga.lua refuses a
lower token than it has seen (StaleCoordinator) and a write to an ended saga
(SagaEnded): the run stops at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from shoal import protocol
from shoal.coordination.saga import (
    TERMINAL,
    Saga,
    SagaStep,
    SagaStepInfo,
    entry_from_stream,
    replay,
)
from shoal.errors import (
    ConfigurationError,
    ResultTimeout,
    SagaNotFound,
    SerializationError,
    ShoalError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
    UnknownAgentType,
)
from shoal.observability import metrics
from shoal.options import TaskOptions

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.saga")

Failure = dict[str, Any]  # {"type": ..., "message": ...}: why a step or compensation failed
# A task id younger than this (by the time in it) whose record is missing was never
# submitted: records live one retention period after their task ends. The margin
# covers clock differences between the process that made the id and the engine.
CLOCK_MARGIN_MS = 60_000
REASONS = {"cancel": "the saga was cancelled", "timeout": "the saga ran past its timeout"}


class StaleCoordinator(ShoalError):
    """A runner with a later fencing token (a takeover) wrote to this saga's log:
    this run stops."""


class SagaEnded(StaleCoordinator):
    """The saga ended (another runner finished it): this run stops."""


class Coordinator:
    """One run over one saga, by the runner holding its lock (fencing ``token``)."""

    def __init__(self, client: Client, saga_id: str, *, token: int, node: str) -> None:
        self.client = client
        self.saga_id = saga_id
        self.token = token
        self.node = node
        self.cancel = False
        self.deadline: int | None = None  # engine ms, from the saga's timeout
        self.offset_ms = 0  # the engine's clock minus this process's
        self.cause: str | None = None  # why it compensates: failure, cancel, timeout
        self.failure: Failure | None = None
        self.started: set[int] = set()  # steps whose task is logged as submitted

    # --- the log -----------------------------------------------------------------------

    async def _log(
        self,
        event: str,
        *,
        status: str = "",
        step: int | None = None,
        task: str = "",
        detail: Any = None,
        running: str = "-",
        error: str = "",
    ) -> None:
        keys, client = self.client.keys, self.client
        args: list[str | int | bytes] = [
            keys.prefix, "log", int(client.settings.retention * 1000), self.token, self.node,
            status, event, "" if step is None else step, task,
            b"" if detail is None else protocol.encode(detail), running, error,
        ]  # fmt: skip
        async with client.errors():
            outcome, cancel, now = await client.scripts.saga(list(keys.saga(self.saga_id)), args)
        self.cancel = self.cancel or cancel == b"1"
        self.offset_ms = int(now) - protocol.now_ms()
        if outcome == b"stale":
            raise StaleCoordinator(f"saga {self.saga_id}: a later runner took over")
        if outcome == b"ended":
            raise SagaEnded(f"saga {self.saga_id} has ended")
        if outcome == b"missing":
            raise SagaNotFound(f"saga {self.saga_id} is gone")
        if status in TERMINAL:
            metrics.saga_ended(status)

    def _now(self) -> int:
        """The engine's clock (ms), as of the last write."""
        return protocol.now_ms() + self.offset_ms

    async def _load(self) -> tuple[Saga, dict[bytes, bytes], list[SagaStepInfo], str | None]:
        record_key, log_key = self.client.keys.saga(self.saga_id)[:2]
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hgetall(record_key)
            pipe.xrange(log_key)
            record, raw = await pipe.execute()
        if not record:
            raise SagaNotFound(f"saga {self.saga_id} is gone (expired?)")
        saga = Saga.decode(record[b"def"])
        state = replay(saga, [entry_from_stream(i, f) for i, f in raw])
        self.started = set(state.started)
        return saga, record, state.steps, state.cause

    # --- the run -----------------------------------------------------------------------

    async def run(self) -> str:
        """Drive the saga to its end; its final status."""
        saga, record, steps, cause = await self._load()
        status = record[b"status"].decode()
        if status in TERMINAL:
            return status
        self.cancel = record.get(b"cancel") == b"1"
        if saga.timeout is not None:
            self.deadline = int(record[b"created"]) + int(saga.timeout * 1000)
        if status != "pending":
            metrics.SAGA_RESUMES.inc()
        await self._log(
            "resumed" if status != "pending" else "coordinating",
            status="running" if status == "pending" else "", detail={"token": self.token},
        )  # fmt: skip
        if cause is None:
            failed = await self._forward(saga, steps)
            if failed is None:
                await self._log("succeeded", status="succeeded", running="")
                return "succeeded"
            cause = self.cause or "failure"
            await self._log(
                "compensating", status="compensating", step=failed, running="",
                detail={"cause": cause}, error=self._reason(saga, failed, cause),
            )  # fmt: skip
        return await self._backward(saga, steps, cause)

    def _reason(self, saga: Saga, failed: int, cause: str) -> str:
        name = saga.steps[failed].name
        if cause in REASONS:
            return f"{REASONS[cause]} (at step {name!r})"
        failure = self.failure or {"type": "?", "message": "?"}
        verb = "may have run (outcome unknown)" if failure.get("unknown") else "failed"
        return f"step {name!r} {verb}: {failure.get('type')}: {failure.get('message')}"

    def _stopping(self) -> str | None:
        """'cancel' or 'timeout' when the forward run must stop, else None."""
        if self.cancel:
            return "cancel"
        if self.deadline is not None and self._now() >= self.deadline:
            return "timeout"
        return None

    async def _forward(self, saga: Saga, steps: list[SagaStepInfo]) -> int | None:
        """Run the steps not yet done, in order; the index of the step the run stopped
        at (failed, outcome unknown, or next when cancelled/timed out), or None."""
        unhosted = await self._unhosted_compensation(saga)
        for index, (step, state) in enumerate(zip(saga.steps, steps, strict=True)):
            if state.status == "succeeded":
                continue
            if state.status in ("failed", "unknown"):  # logged before this run
                self.failure, self.cause = state.error, "failure"
                return index
            if unhosted is not None and state.task is None:
                return await self._fail_unstarted(index, unhosted)
            if state.task is None:
                stop = self._stopping()
                if stop is not None:
                    self.cause = stop
                    return index
                failure = await self._submit_step(saga, index, step, state, steps)
                if failure is not None:
                    return await self._fail_unstarted(index, failure)
            await self._settle(saga, index, steps, forward=True)
            if state.status != "succeeded":
                self.cause = self.cause or "failure"
                return index
        return None

    async def _fail_unstarted(self, index: int, failure: Failure) -> int:
        self.failure, self.cause = failure, "failure"
        await self._log("step_failed", step=index, detail=failure, running="")
        return index

    async def _unhosted_compensation(self, saga: Saga) -> Failure | None:
        """A compensation no node ever hosted would leave the saga stuck on its first
        rollback: such a saga fails before its next step instead."""
        for step in saga.steps:
            if step.compensate and step.agent is None and not await self._known(step.compensate):
                return {
                    "type": "shoal.errors.NotHosted",
                    "message": f"no node in this namespace ever hosted the compensation "
                    f"{step.compensate!r} (of step {step.name!r})",
                }
        return None

    async def _submit_step(
        self, saga: Saga, index: int, step: SagaStep, state: SagaStepInfo, steps: list[SagaStepInfo]
    ) -> Failure | None:
        """Make the step's task id, log it, submit the task; why it cannot run, or None."""
        group = await self._group(step, step.capability)
        if isinstance(group, dict):
            return group
        task_id = self.client.keys.new_task_id(group)
        state.status, state.task = "running", task_id
        await self._log("step_submitting", step=index, task=task_id, running=task_id)
        if self.cancel:  # the canceller may have looked before the id was logged
            state.status, state.task = "pending", None
            await self._log("step_not_run", step=index, running="")
            self.cause = "cancel"
            return {"type": "cancelled", "message": REASONS["cancel"]}
        args = self._arguments(step, step.args, index, steps, own=False)
        return await self._submit_task(step, step.capability, args, task_id, "do", saga)

    async def _submit_task(
        self, step: SagaStep, capability: str, args: dict[str, Any], task_id: str, phase: str,
        saga: Saga,
    ) -> Failure | None:  # fmt: skip
        options = TaskOptions.build(
            timeout=step.timeout if phase == "do" else None,
            max_attempts=step.max_attempts if phase == "do" else saga.compensation_attempts,
        )  # fmt: skip
        try:
            await self.client.submit_arguments(
                capability, args, options, agent=step.agent, _task_id=task_id
            )
        except (UnknownAgentType, SerializationError, ConfigurationError) as exc:
            return {"type": f"shoal.errors.{type(exc).__name__}", "message": str(exc)}
        return None

    async def _group(self, step: SagaStep, capability: str) -> int | Failure:
        """The key group the step's task id must live in (an agent's partition's), or
        why the task cannot be submitted."""
        if step.agent is None:
            if not await self._known(capability):
                return {
                    "type": "shoal.errors.NotHosted",
                    "message": f"no node in this namespace ever hosted {capability!r}",
                }
            return self.client._take_group()
        try:
            _, _, group = await self.client._agents.task_target(step.agent, capability)
        except (UnknownAgentType, ConfigurationError) as exc:
            return {"type": f"shoal.errors.{type(exc).__name__}", "message": str(exc)}
        return group

    async def _known(self, capability: str) -> bool:
        async with self.client.errors():
            return bool(
                await self.client.redis.sismember(self.client.keys.capabilities, capability)
            )

    def _young(self, task_id: str) -> bool:
        """Whether a missing record of this task can only mean it was never submitted
        (its id's time is well within the retention period)."""
        made, retention = int(task_id[:12], 16), self.client.settings.retention * 1000
        return self._now() - made < retention - min(CLOCK_MARGIN_MS, retention / 10)

    async def _exists(self, task_id: str) -> bool:
        async with self.client.errors():
            return bool(await self.client.redis.exists(self.client.keys.task(task_id)))

    async def _settle(
        self, saga: Saga, index: int, steps: list[SagaStepInfo], *, forward: bool
    ) -> None:
        """Await the step's task and log its outcome: succeeded, failed or unknown
        (``steps[index]`` updated). A step whose task was logged but never submitted
        is submitted now (forward, not stopping) or logged as not run."""
        state = steps[index]
        assert state.task is not None
        task_id = state.task
        if not await self._submitted(saga, index, steps, forward=forward):
            return
        if index not in self.started:
            self.started.add(index)
            await self._log("step_started", step=index, task=task_id, running=task_id)
        if not forward or self._stopping() is not None:
            await self.client.cancel(task_id)
        try:
            result = await self._await_task(task_id, deadline=forward)
        except TaskFailed as exc:
            failure = {"type": exc.error_type, "message": exc.message, "task": task_id}
            await self._failed(index, state, failure)
        except TaskCancelled:
            await self._refresh_cancel()
            self.cause = self.cause or self._stopping()
            if await self._started(task_id):
                await self._outcome_unknown(index, state, "it was cancelled while it ran")
            else:  # it never ran: nothing to undo
                why = f"task {task_id} was cancelled before it started"
                await self._failed(index, state, {"type": "cancelled", "message": why})
        except TaskNotFound:
            await self._outcome_unknown(index, state, "its task's record expired")
        else:
            state.status, state.result = "succeeded", result
            await self._log("step_succeeded", step=index, task=task_id, detail=result, running="")

    async def _submitted(
        self, saga: Saga, index: int, steps: list[SagaStepInfo], *, forward: bool
    ) -> bool:
        """Whether the step's task exists (submitting it if it was logged but never
        submitted, and may still run); False when its outcome is logged already."""
        state, step = steps[index], saga.steps[index]
        assert state.task is not None
        if await self._exists(state.task):
            return True
        if not self._young(state.task):
            await self._outcome_unknown(index, state, "its task's record expired")
            return False
        if not forward or self._stopping() is not None:
            state.status, state.task = "pending", None
            await self._log("step_not_run", step=index, running="")
            return False
        args = self._arguments(step, step.args, index, steps, own=False)
        failure = await self._submit_task(step, step.capability, args, state.task, "do", saga)
        if failure is not None:
            await self._failed(index, state, failure)
            return False
        return True

    async def _failed(self, index: int, state: SagaStepInfo, failure: Failure) -> None:
        state.status, state.error, self.failure = "failed", failure, failure
        await self._log(
            "step_failed", step=index, task=state.task or "", detail=failure, running=""
        )

    async def _outcome_unknown(self, index: int, state: SagaStepInfo, why: str) -> None:
        failure = {
            "type": "unknown", "unknown": True, "task": state.task,
            "message": f"step {state.name!r} may have run: {why}; it is compensated",
        }  # fmt: skip
        state.status, state.error, self.failure = "unknown", failure, failure
        await self._log(
            "step_unknown", step=index, task=state.task or "", detail=failure, running=""
        )

    async def _refresh_cancel(self) -> None:
        """Read the cancel flag: a canceller cancels the running step's task itself,
        and this run learns why before it logs the step's outcome."""
        async with self.client.errors():
            flag = await self.client.redis.hget(self.client.keys.saga(self.saga_id)[0], "cancel")
        self.cancel = self.cancel or flag == b"1"

    async def _started(self, task_id: str) -> bool:
        try:
            info = await self.client.status(task_id)
        except TaskNotFound:
            return True  # cannot tell: maybe
        return info.started_at is not None or info.attempts > 0

    async def _await_task(self, task_id: str, *, deadline: bool) -> Any:
        """The task's result. Past the saga's deadline (forward steps) the task is
        cancelled — and still awaited: it may have succeeded meanwhile."""
        remaining = None
        if deadline and self.deadline is not None:
            remaining = max(0.0, (self.deadline - self._now()) / 1000)
        try:
            return await self.client.result(task_id, timeout=remaining)
        except ResultTimeout:
            await self.client.cancel(task_id)
            return await self.client.result(task_id)

    # --- backward ----------------------------------------------------------------------

    async def _backward(self, saga: Saga, steps: list[SagaStepInfo], cause: str) -> str:
        for index in reversed(range(len(saga.steps))):
            step, state = saga.steps[index], steps[index]
            if state.status == "running":  # left by a run that stopped: find its outcome
                await self._settle(saga, index, steps, forward=False)
            if state.status not in ("succeeded", "unknown", "compensating"):
                continue  # never completed (nothing to undo), or undone
            if step.compensate is None:
                continue  # nothing to run
            failure = await self._compensate(saga, index, step, state, steps)
            if failure is not None:
                await self._log(
                    "compensation_failed", status="compensation_failed", step=index,
                    task=state.compensation_task or "", detail=failure,
                    error=f"compensation of step {step.name!r} failed: {failure['type']}: "
                    f"{failure['message']}",
                )  # fmt: skip
                log.error(
                    "saga %s: compensation of step %r failed: %s", self.saga_id, step.name, failure
                )
                return "compensation_failed"
            state.status = "compensated"
            await self._log(
                "compensation_succeeded", step=index, task=state.compensation_task or ""
            )
        final = "cancelled" if cause == "cancel" else "compensated"
        await self._log(final, status=final)
        return final

    async def _compensate(
        self, saga: Saga, index: int, step: SagaStep, state: SagaStepInfo, steps: list[SagaStepInfo]
    ) -> Failure | None:
        """Run the step's compensation (again, if its task is gone: compensations are
        idempotent) until it ended; why it failed, or None."""
        assert step.compensate is not None
        args = self._arguments(step, step.undo_args(), index, steps, own=True)
        while True:
            task_id = state.compensation_task
            if task_id is None or not await self._exists(task_id):
                if task_id is None:
                    group = await self._group(step, step.compensate)
                    if isinstance(group, dict):
                        return group
                    task_id = self.client.keys.new_task_id(group)
                    state.compensation_task = task_id
                    await self._log("compensation_submitting", step=index, task=task_id)
                failure = await self._submit_task(
                    step, step.compensate, args, task_id, "undo", saga
                )
                if failure is not None:
                    return failure
                await self._log("compensation_started", step=index, task=task_id)
            try:
                await self.client.result(task_id)
                return None
            except TaskFailed as exc:
                return {"type": exc.error_type, "message": exc.message, "task": task_id}
            except TaskCancelled:
                return {
                    "type": "shoal.errors.TaskCancelled", "task": task_id,
                    "message": f"compensation task {task_id} was cancelled",
                }  # fmt: skip
            except TaskNotFound:
                state.compensation_task = None  # vanished: submit it afresh

    # --- arguments ---------------------------------------------------------------------

    def _arguments(
        self, step: SagaStep, base: dict[str, Any], index: int, steps: list[SagaStepInfo], *,
        own: bool,
    ) -> dict[str, Any]:  # fmt: skip
        args = dict(base)
        if step.key_arg:
            args[step.key_arg] = step_key(self.saga_id, index)
        if step.results_arg:  # the results of the steps that completed, up to this one
            done = ("succeeded", "compensating", "compensated", "compensation_failed")
            upto = index + 1 if own else index
            args[step.results_arg] = {
                s.name: s.result for s in steps[:upto] if s.status in done and s.error is None
            }
        return args


def step_key(saga_id: str, index: int) -> str:
    """The idempotency key a step and its compensation receive: ``saga:<id>:<index>``
    (saga ids have no ':', so no two steps of any sagas share one)."""
    return f"saga:{saga_id}:{index}"
