"""Shoal's exceptions: one root, subclasses named for the state they report.

Engine (redis-py) errors never reach users raw: they are translated where they
enter (see ``engine.translate_errors``) into ``EngineUnavailable`` / ``EngineError``
with the engine URL, password masked.
"""

from __future__ import annotations

from typing import Any


class ShoalError(Exception):
    """Root of every error Shoal raises on purpose."""


class ConfigurationError(ShoalError, ValueError):
    """A setting, option or argument is invalid; the message says what is allowed."""


class EngineUnavailable(ShoalError):
    """The engine (Valkey/Redis) cannot be reached or could not be started."""


class EngineError(ShoalError):
    """The engine answered with an error Shoal did not expect."""


class SerializationError(ShoalError, TypeError):
    """A task argument or result is not msgpack data."""


class QueueFull(ShoalError):
    """The capability's queue is at its bound; the task was not accepted.

    From ``submit_many``, ``accepted`` holds the handles of the tasks of the batch
    that were queued before the bound was reached (the rest were not).
    """

    def __init__(self, message: str, accepted: list[Any] | None = None) -> None:
        super().__init__(message)
        self.accepted: list[Any] = accepted or []


class TaskNotFound(ShoalError, KeyError):
    """No task record with this id (never existed, or expired after its retention)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else "task not found"


class TaskFailed(ShoalError):
    """The task ended without a result (failed, dead, or expired).

    Carries the remote error's type name and message; ``remote_traceback`` holds the
    handler's traceback text when it was recorded.
    """

    def __init__(
        self,
        task_id: str,
        status: str,
        error_type: str,
        message: str,
        remote_traceback: str | None = None,
    ) -> None:
        self.task_id = task_id
        self.status = status
        self.error_type = error_type
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(f"task {task_id} {status}: {error_type}: {message}")


class TaskCancelled(ShoalError):
    """The task was cancelled before it produced a result."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} was cancelled")


class NotHosted(ShoalError, TimeoutError):
    """Waiting for nodes to host a capability ran out of time."""


class ResultTimeout(ShoalError, TimeoutError):
    """Waiting for a result ran out of time; the task itself goes on."""


class Retry(ShoalError):
    """Raised by a handler to ask for another attempt, optionally after ``delay`` seconds."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        if delay is not None and delay < 0:
            raise ConfigurationError(f"Retry(delay=...) must be >= 0 seconds, got {delay}")
        self.delay = delay
        self.reason = reason
        super().__init__(reason)


class TaskTimeout(ShoalError, TimeoutError):
    """A handler ran longer than the task's ``timeout`` and was cancelled."""


class NodeDied(ShoalError):
    """Names the error recorded when a task's node died while running it."""


class DeadlineExceeded(ShoalError):
    """A task's deadline passed before any node started it, so it was not run."""


class UnknownAgentType(ShoalError, LookupError):
    """An agent id names a type no node has ever hosted in this namespace (or one
    that lacks the capability, message handler or subscription asked for)."""


class RequestTimeout(ShoalError, TimeoutError):
    """``request()`` got no reply in time. The message stays delivered: the agent
    may still handle it later, and its reply is then dropped."""


class RequestFailed(ShoalError):
    """The agent's handler raised while handling a ``request()``."""

    def __init__(self, agent_id: str, error_type: str, message: str) -> None:
        self.agent_id = agent_id
        self.error_type = error_type
        self.message = message
        super().__init__(f"agent {agent_id} failed the request: {error_type}: {message}")


class KeyNotFound(ShoalError, LookupError):
    """No API key has this id (or this name): never created, or revoked."""


class StaleOwner(ShoalError):
    """The partition's lease moved to another node: this node's turn was not recorded."""


class ReplicationTimeout(EngineError):
    """Fewer replicas than ``ack_replicas`` acknowledged a write within ``ack_timeout``.
    The primary has the write (it is not undone): a failover before the replicas
    catch up could lose it. Re-submitting with the same idempotency key is safe."""


class LockTimeout(ShoalError, TimeoutError):
    """A lock was not acquired within its ``wait``: another holder kept it."""


class LockLost(ShoalError):
    """A held lock was lost: its renewal found it expired or taken by another holder,
    or the engine could not renew it before its ttl ran out. Work done under the lock
    since may overlap another holder's; only stores that check the fencing token
    refuse this holder's writes from now on."""


class RateLimited(ShoalError):
    """A rate limiter had no room for a call within the time the caller would wait.
    ``retry_after`` says in how many seconds the call would have fitted."""

    def __init__(self, limiter: str, key: str, retry_after: float) -> None:
        super().__init__(
            f"rate limit {limiter!r} (key {key!r}) is exhausted: room again in {retry_after:.3f}s"
        )
        self.limiter = limiter
        self.key = key
        self.retry_after = retry_after


class SagaNotFound(ShoalError, KeyError):
    """No saga with this id (never started here, or expired after its retention)."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else "saga not found"


class SagaFailed(ShoalError):
    """The saga ended without completing: ``status`` says how (compensated,
    cancelled, or compensation_failed: a compensation kept failing and the saga
    needs an operator); ``step`` names the step that failed, if one did."""

    def __init__(self, saga_id: str, status: str, step: str | None, message: str) -> None:
        self.saga_id = saga_id
        self.status = status
        self.step = step
        self.message = message
        super().__init__(f"saga {saga_id} {status}: {message}")
