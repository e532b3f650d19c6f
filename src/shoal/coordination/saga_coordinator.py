"""The saga coordinator: a task on the built-in capability ``shoal.saga``.

Every node that runs capability tasks serves it (shoal.node adds it), so a saga's
coordination is placed, retried and — when its node dies — taken over by the same
machinery as any task. Each (re)start replays the saga's log and continues:

* forward: each step not yet completed is submitted with its deterministic
  idempotency key (an earlier coordinator's submission comes back instead of a
  second task), logged as started, and awaited; its outcome is logged;
* backward (a step failed, the saga was cancelled, or its timeout passed): the
  compensations of the completed steps run in reverse, each logged the same way;
  one that fails after its attempts stops the saga in ``compensation_failed``.

Every log write carries the coordinator task's fencing token; a write from a run
superseded by a takeover is refused and that run stops (StaleCoordinator).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from shoal import protocol
from shoal.agent import Agent, capability
from shoal.coordination.saga import (
    COORDINATOR_ATTEMPTS,
    COORDINATOR_CAPABILITY,
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


class StaleCoordinator(ShoalError):
    """Another run of this saga's coordinator (a takeover) wrote to its log since:
    this run stops."""


class SagaCoordinator(Agent):
    """The built-in agent that coordinates sagas (hosted by every node with
    capabilities; never addressed by id)."""

    agent_type = "shoal_saga"

    @capability(
        COORDINATOR_CAPABILITY, max_attempts=COORDINATOR_ATTEMPTS, backoff=0.5,
        max_backoff=30.0, non_retryable=(SagaNotFound,),
    )  # fmt: skip
    async def coordinate(self, saga_id: str) -> str:
        ctx = self.ctx
        run = Coordinator(
            ctx.sagas.client, saga_id, token=ctx.fencing_token, node=ctx.node_id,
            task_id=ctx.task_id, traceparent=ctx.traceparent,
        )  # fmt: skip
        return await run.run(resumed=ctx.attempt > 1)


class Coordinator:
    """One run of one saga's coordinator."""

    def __init__(
        self,
        client: Client,
        saga_id: str,
        *,
        token: int,
        node: str,
        task_id: str,
        traceparent: str | None,
    ) -> None:
        self.client = client
        self.saga_id = saga_id
        self.token = token
        self.node = node
        self.task_id = task_id
        self.traceparent = traceparent
        self.cancel = False
        self.deadline: float | None = None  # wall clock (s), from the saga's timeout
        self.failure: Failure | None = None

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
            keys.prefix, "log", protocol.now_ms(), int(client.settings.retention * 1000),
            self.token, status, event, "" if step is None else step, task,
            b"" if detail is None else protocol.encode(detail), self.node, running, error,
        ]  # fmt: skip
        async with client.errors():
            outcome, cancel = await client.scripts.saga(list(keys.saga(self.saga_id)), args)
        self.cancel = self.cancel or cancel == b"1"
        if outcome == b"stale":
            raise StaleCoordinator(f"saga {self.saga_id}: a later coordinator took over")
        if outcome == b"missing":
            raise SagaNotFound(f"saga {self.saga_id} is gone (expired?)")
        if status in TERMINAL and outcome == b"ok":
            metrics.saga_ended(status)

    async def _load(self) -> tuple[Saga, dict[bytes, bytes], list[SagaStepInfo], bool]:
        record_key, log_key, _ = self.client.keys.saga(self.saga_id)
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            pipe.hgetall(record_key)
            pipe.xrange(log_key)
            record, raw = await pipe.execute()
        if not record:
            raise SagaNotFound(f"saga {self.saga_id} is gone (expired?)")
        saga = Saga.decode(record[b"def"])
        steps, compensating = replay(saga, [entry_from_stream(i, f) for i, f in raw])
        return saga, record, steps, compensating

    # --- the run -----------------------------------------------------------------------

    async def run(self, *, resumed: bool) -> str:
        saga, record, steps, compensating = await self._load()
        status = record[b"status"].decode()
        if status in TERMINAL:
            return status
        self.cancel = record.get(b"cancel") == b"1"
        if saga.timeout is not None:
            self.deadline = int(record[b"created"]) / 1000 + saga.timeout
        if resumed or status != "pending":
            metrics.SAGA_RESUMES.inc()
        await self._log(
            "resumed" if status != "pending" else "coordinating",
            status="" if status != "pending" else "running", detail={"task": self.task_id},
        )  # fmt: skip
        if not compensating:
            failed = await self._forward(saga, steps)
            if failed is None:
                await self._log("succeeded", status="succeeded", running="")
                return "succeeded"
            await self._log(
                "compensating",
                status="compensating",
                step=failed,
                running="",
                error=self._reason(saga, failed),
            )
        return await self._backward(saga, steps)

    def _reason(self, saga: Saga, failed: int) -> str:
        failure = self.failure or {"type": "?", "message": "?"}
        if self.cancel:
            return "cancelled"
        return f"step {saga.steps[failed].name!r} failed: {failure['type']}: {failure['message']}"

    async def _forward(self, saga: Saga, steps: list[SagaStepInfo]) -> int | None:
        """Run the steps not yet completed, in order; the index of the step that
        failed (or would have run next when cancelled or timed out), or None."""
        for index, (step, state) in enumerate(zip(saga.steps, steps, strict=True)):
            if state.status == "succeeded":
                continue
            if state.status == "failed":  # logged before this run: compensate
                self.failure = state.error
                return index
            if state.task is None and (self.cancel or self._expired()):
                self.failure = self._stop_reason(saga)
                return index  # (a started step is awaited first: it may have completed)
            ok, value = await self._run_step(saga, index, step, state, steps)
            if not ok:
                self.failure = value
                await self._log(
                    "step_failed", step=index, task=state.task or "", detail=value, running=""
                )
                return index
            state.status, state.result = "succeeded", value
            await self._log(
                "step_succeeded", step=index, task=state.task or "", detail=value, running=""
            )
        return None

    def _expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _stop_reason(self, saga: Saga) -> Failure:
        if self.cancel:
            return {"type": "cancelled", "message": "the saga was cancelled"}
        return {"type": "timeout", "message": f"the saga ran past its timeout of {saga.timeout}s"}

    async def _run_step(
        self,
        saga: Saga,
        index: int,
        step: SagaStep,
        state: SagaStepInfo,
        steps: list[SagaStepInfo],
    ) -> tuple[bool, Any]:
        if state.task is None:
            args = self._arguments(step, step.args, index, steps, step.results_arg, own=False)
            submitted = await self._submit(
                step, step.capability, args, index, "do", step.max_attempts
            )
            if isinstance(submitted, dict):
                return False, submitted
            state.task = submitted
            await self._log(
                "step_started", status="", step=index, task=submitted, running=submitted
            )
            if self.cancel:  # asked between the canceller's read and this step's start
                await self.client.cancel(submitted)
        return await self._outcome(state.task, deadline=True, saga=saga)

    async def _backward(self, saga: Saga, steps: list[SagaStepInfo]) -> str:
        for index in reversed(range(len(saga.steps))):
            step, state = saga.steps[index], steps[index]
            if state.status not in ("succeeded", "compensating") or step.compensate is None:
                continue  # never completed (nothing to undo), undone, or nothing to run
            ok, value = await self._run_compensation(saga, index, step, state, steps)
            if not ok:
                await self._log(
                    "compensation_failed", status="compensation_failed", step=index,
                    task=state.compensation_task or "", detail=value,
                    error=f"compensation of step {step.name!r} failed: {value['type']}: "
                    f"{value['message']}",
                )  # fmt: skip
                log.error(
                    "saga %s: compensation of step %r failed: %s", self.saga_id, step.name, value
                )
                return "compensation_failed"
            state.status = "compensated"
            await self._log(
                "compensation_succeeded", step=index, task=state.compensation_task or ""
            )
        final = "cancelled" if self.cancel else "compensated"
        await self._log(final, status=final)
        return final

    async def _run_compensation(
        self,
        saga: Saga,
        index: int,
        step: SagaStep,
        state: SagaStepInfo,
        steps: list[SagaStepInfo],
    ) -> tuple[bool, Any]:
        if state.compensation_task is None:
            assert step.compensate is not None
            args = self._arguments(step, step.undo_args(), index, steps, step.results_arg, own=True)
            submitted = await self._submit(
                step, step.compensate, args, index, "undo", saga.compensation_attempts
            )
            if isinstance(submitted, dict):
                return False, submitted
            state.compensation_task = submitted
            await self._log("compensation_started", step=index, task=submitted)
        return await self._outcome(state.compensation_task, deadline=False, saga=saga)

    # --- tasks -------------------------------------------------------------------------

    def _arguments(
        self,
        step: SagaStep,
        base: dict[str, Any],
        index: int,
        steps: list[SagaStepInfo],
        results_arg: str | None,
        *,
        own: bool,
    ) -> dict[str, Any]:
        args = dict(base)
        if step.key_arg:
            args[step.key_arg] = f"{self.saga_id}:{index}"
        if results_arg:
            done = ("succeeded", "compensating", "compensated")
            upto = index + 1 if own else index
            args[results_arg] = {s.name: s.result for s in steps[:upto] if s.status in done}
        return args

    async def _submit(
        self,
        step: SagaStep,
        capability: str,
        args: dict[str, Any],
        index: int,
        phase: str,
        max_attempts: int | None,
    ) -> str | Failure:
        """The step's task id (the same task again for a resubmission: the key is
        deterministic), or why it cannot run. Engine trouble raises: the
        coordinator task is retried and resumes from the log."""
        if step.agent is None and not await self._known(capability):
            return {
                "type": "shoal.errors.NotHosted",
                "message": f"no node in this namespace ever hosted {capability!r}",
            }
        options = TaskOptions.build(
            timeout=step.timeout if phase == "do" else None, max_attempts=max_attempts,
            idempotency_key=f"saga:{self.saga_id}:{index}:{phase}",
        )  # fmt: skip
        try:
            handle = await self.client.submit_arguments(
                capability, args, options, agent=step.agent, _parent=self.task_id,
                _traceparent=self.traceparent,
            )  # fmt: skip
        except (UnknownAgentType, SerializationError, ConfigurationError) as exc:
            return {"type": f"shoal.errors.{type(exc).__name__}", "message": str(exc)}
        return handle.id

    async def _known(self, capability: str) -> bool:
        async with self.client.errors():
            return bool(
                await self.client.redis.sismember(self.client.keys.capabilities, capability)
            )

    async def _outcome(self, task_id: str, *, deadline: bool, saga: Saga) -> tuple[bool, Any]:
        """(True, result) or (False, failure) once the task ended. Past the saga's
        deadline a forward step is cancelled — and still awaited: it may have
        succeeded meanwhile, and then it is compensated like the others."""
        remaining = None
        if deadline and self.deadline is not None:
            remaining = max(0.0, self.deadline - time.time())
        try:
            return True, await self.client.result(task_id, timeout=remaining)
        except ResultTimeout:
            await self.client.cancel(task_id)
            ok, value = await self._outcome(task_id, deadline=False, saga=saga)
            return ok, value if ok else self._stop_reason(saga)
        except TaskFailed as exc:
            return False, {"type": exc.error_type, "message": exc.message, "task": task_id}
        except TaskCancelled:
            if self.cancel:
                return False, self._stop_reason(saga)
            return False, {
                "type": "shoal.errors.TaskCancelled",
                "task": task_id,
                "message": f"task {task_id} was cancelled",
            }
        except TaskNotFound:
            return False, {
                "type": "shoal.errors.TaskNotFound",
                "task": task_id,
                "message": f"task {task_id} expired before the saga read it",
            }
