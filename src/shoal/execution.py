"""Running one attempt of a task and turning what happened into an outcome.

The node loop stays short because every decision about a finished attempt —
succeeded, retry (and when), dead, failed, cancelled — is made here.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import random
import traceback
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from shoal import protocol
from shoal.agent import Agent, ArgumentMismatch, CapabilitySpec, TaskContext, current_context
from shoal.errors import (
    ConfigurationError,
    Retry,
    SerializationError,
    TaskTimeout,
    UnknownAgentType,
)
from shoal.observability.hooks import AttemptWatch
from shoal.protocol import ErrorInfo

# Errors that say the task itself is wrong: running it again cannot help.
ALWAYS_FINAL: tuple[type[BaseException], ...] = (
    ArgumentMismatch, SerializationError, ConfigurationError, UnknownAgentType,
)  # fmt: skip


@dataclass(frozen=True)
class Job:
    """A started attempt, as the fetch script handed it to the node."""

    queue: str
    entry_id: str
    task_id: str
    capability: str
    args: bytes
    attempt: int
    max_attempts: int
    timeout: float | None
    parent: str | None
    traceparent: str | None
    token: int
    submitted_by: str | None = None  # the API key id the task is charged to

    @classmethod
    def from_reply(cls, row: list[Any]) -> Job:
        queue, eid, tid, cap, args, attempt, max_att, timeout, parent, trace, token, by = row
        return cls(
            queue=queue.decode(),
            entry_id=eid.decode(),
            task_id=tid.decode(),
            capability=cap.decode(),
            args=args,
            attempt=int(attempt),
            max_attempts=int(max_att),
            timeout=float(timeout) if timeout else None,
            parent=parent.decode() or None if parent else None,
            traceparent=trace.decode() or None if trace else None,
            token=int(token),
            submitted_by=by.decode() or None if by else None,
        )


@dataclass(frozen=True)
class Outcome:
    """What finish.lua records for one attempt."""

    job: Job
    kind: str  # ok | retry | dead | failed | cancelled | requeue
    payload: bytes = b""
    due_ms: int = 0

    def script_fields(self) -> list[str | int | bytes]:
        j = self.job
        return [
            j.queue, j.entry_id, j.task_id, j.attempt, j.token, self.kind, self.payload,
            self.due_ms,
        ]  # fmt: skip


def backoff_delay(spec: CapabilitySpec, attempt: int) -> float:
    """Exponential back-off with 'equal jitter': half fixed, half random, capped."""
    ceiling = min(spec.max_backoff, spec.backoff * 2.0 ** (attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def error_info(exc: BaseException, job: Job, node_id: str) -> ErrorInfo:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return ErrorInfo(
        type=name,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        attempt=job.attempt,
        node=node_id,
        at=protocol.now_ms(),
    )


class Attempt:
    """One attempt of a job on this node: run the handler, classify the result."""

    def __init__(self, job: Job, spec: CapabilitySpec, agent: Agent, ctx: TaskContext) -> None:
        self.job = job
        self.spec = spec
        self.agent = agent
        self.ctx = ctx
        self.handed_back = False  # set when the node stops: the task is re-queued
        self.abandoned = False  # set when this node was declared dead: record nothing
        self.task: asyncio.Task[None] | None = None  # the asyncio task running it
        self.error: BaseException | None = None  # what made it fail, if it did

    async def run(self, executor: Executor, node_id: str) -> Outcome | None:
        """The attempt's outcome, or None if it was abandoned (another node owns the
        task now; anything this attempt recorded would be refused anyway)."""
        current = current_context.set(self.ctx)  # self.ctx, and the ids on log lines
        watch = AttemptWatch(self.job, node_id, self.ctx)  # metrics and span
        try:
            outcome = await self._run(executor, node_id)
        except BaseException as exc:
            watch.end(None, exc)
            raise
        finally:
            current_context.reset(current)
        watch.end(outcome, self.error)
        return outcome

    async def _run(self, executor: Executor, node_id: str) -> Outcome | None:
        timeout = self.job.timeout
        try:
            async with asyncio.timeout(timeout) as scope:
                result = await self._invoke(executor)
            return Outcome(self.job, "ok", protocol.encode_result(result))
        except asyncio.CancelledError:
            if self.abandoned:
                return None
            if self.ctx.cancel_requested:
                return Outcome(self.job, "cancelled")
            if self.handed_back:
                return Outcome(self.job, "requeue")
            raise
        except TimeoutError as raised:
            failure: BaseException = raised
            if timeout is not None and scope.expired():  # ours, not the handler's own
                failure = TaskTimeout(f"the handler ran longer than its timeout of {timeout}s")
            return self._failure(failure, node_id)
        except Exception as exc:
            return self._failure(exc, node_id)

    async def _invoke(self, executor: Executor) -> Any:
        kwargs = protocol.decode(self.job.args)
        self.spec.bind_arguments(kwargs)
        method: Callable[..., Any] = getattr(self.agent, self.spec.method_name)
        if self.spec.is_async:
            return await method(**kwargs)
        loop = asyncio.get_running_loop()
        call = functools.partial(contextvars.copy_context().run, method, **kwargs)
        return await loop.run_in_executor(executor, call)

    def _failure(self, exc: BaseException, node_id: str) -> Outcome:
        self.error = exc
        return failure_outcome(self.job, self.spec, exc, node_id)


def failure_outcome(job: Job, spec: CapabilitySpec, exc: BaseException, node_id: str) -> Outcome:
    """What a failed attempt leads to: failed (final errors), dead (last attempt), or
    a retry after the back-off (or the delay a ``Retry`` asked for)."""
    payload = protocol.encode(error_info(exc, job, node_id))
    if isinstance(exc, ALWAYS_FINAL + spec.non_retryable):
        return Outcome(job, "failed", payload)
    if job.attempt >= job.max_attempts:
        return Outcome(job, "dead", payload)
    delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else None
    if delay is None:
        delay = backoff_delay(spec, job.attempt)
    return Outcome(job, "retry", payload, protocol.now_ms() + int(delay * 1000))
