"""Agents: plain Python classes whose ``@capability`` methods are the work they can do.

A capability's options are validated where it is declared: a bad option, or a
handler parameter whose name clashes with a task option, fails at import time with
a message saying what is allowed.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from shoal.errors import ConfigurationError, ShoalError
from shoal.keys import validate_capability
from shoal.protocol import validate_agent_type

if TYPE_CHECKING:
    from shoal.client import Client, TaskHandle

F = TypeVar("F", bound=Callable[..., Any])

# Names that submit()/call() take as task options; a handler may not use them as
# parameter names, or its arguments and the options would be ambiguous.
TASK_OPTIONS = frozenset(
    {
        "priority",
        "delay",
        "eta",
        "timeout",
        "deadline",
        "max_attempts",
        "idempotency_key",
        "result_timeout",
    }
)

_CAPABILITY_ATTR = "__shoal_capability__"


@dataclass(frozen=True)
class CapabilitySpec:
    """A declared capability: its handler and the options that shape its tasks."""

    name: str
    method_name: str
    is_async: bool
    signature: inspect.Signature
    max_attempts: int | None = None
    timeout: float | None = None
    backoff: float = 1.0
    max_backoff: float = 300.0
    non_retryable: tuple[type[BaseException], ...] = ()
    max_queue_length: int | None = None
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _required: frozenset[str] = field(init=False, repr=False, compare=False)
    _open_ended: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        params = self.signature.parameters.values()
        names = {p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL}
        required = {
            p.name for p in params
            if p.default is inspect.Parameter.empty
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        }  # fmt: skip
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_required", frozenset(required))
        object.__setattr__(self, "_open_ended", open_ended)

    def bind_arguments(self, kwargs: dict[str, Any]) -> None:
        """Fail clearly when the submitted arguments do not fit the handler.

        A set comparison on the hot path; ``Signature.bind`` (ten times slower)
        only runs to word the error when they do not fit.
        """
        keys = kwargs.keys()
        if self._required <= keys and (self._open_ended or keys <= self._names):
            return
        try:
            self.signature.bind(**kwargs)
        except TypeError as exc:
            raise ArgumentMismatch(f"capability {self.name!r}: {exc}") from None


class ArgumentMismatch(ShoalError, TypeError):
    """The task's arguments do not match the handler's parameters (not retried)."""


def _positive(name: str, value: float | None, cap: str) -> None:
    if value is not None and (not isinstance(value, int | float) or value <= 0):
        raise ConfigurationError(f"capability {cap!r}: {name} must be > 0, got {value!r}")


def _check_signature(func: Callable[..., Any], cap: str) -> inspect.Signature:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())[1:]  # drop self
    for param in params:
        if param.name in TASK_OPTIONS:
            raise ConfigurationError(
                f"capability {cap!r}: parameter {param.name!r} of {func.__qualname__} clashes "
                f"with the task option of that name; rename it (task options: "
                f"{', '.join(sorted(TASK_OPTIONS))})"
            )
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"capability {cap!r}: parameter {param.name!r} is positional-only; task "
                "arguments are passed by name"
            )
    return signature.replace(parameters=params)


def capability(
    name: str | None = None,
    *,
    max_attempts: int | None = None,
    timeout: float | None = None,
    backoff: float = 1.0,
    max_backoff: float = 300.0,
    non_retryable: tuple[type[BaseException], ...] = (),
    max_queue_length: int | None = None,
) -> Callable[[F], F]:
    """Mark an Agent method as the handler of capability ``name`` (default: its name).

    ``max_attempts``/``timeout`` are defaults a task may override; ``backoff`` is the
    first retry delay in seconds (doubled per attempt, with jitter, up to
    ``max_backoff``); exceptions in ``non_retryable`` fail the task at once;
    ``max_queue_length`` bounds the capability's queue (submits beyond it get QueueFull).
    """

    def decorate(func: F) -> F:
        cap = validate_capability(name or func.__name__)
        if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
            raise ConfigurationError(f"capability {cap!r}: max_attempts must be >= 1")
        _positive("timeout", timeout, cap)
        _positive("backoff", backoff, cap)
        _positive("max_backoff", max_backoff, cap)
        if max_queue_length is not None and max_queue_length < 1:
            raise ConfigurationError(f"capability {cap!r}: max_queue_length must be >= 1")
        for exc_type in non_retryable:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise ConfigurationError(
                    f"capability {cap!r}: non_retryable must hold exception classes, "
                    f"got {exc_type!r}"
                )
        spec = CapabilitySpec(
            name=cap,
            method_name=func.__name__,
            is_async=inspect.iscoroutinefunction(func),
            signature=_check_signature(func, cap),
            max_attempts=max_attempts,
            timeout=timeout,
            backoff=backoff,
            max_backoff=max_backoff,
            non_retryable=tuple(non_retryable),
            max_queue_length=max_queue_length,
        )
        setattr(func, _CAPABILITY_ATTR, spec)
        return func

    return decorate


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Agent:
    """Base class of agent types. Subclass it and mark methods with ``@capability``.

    One instance per agent type runs on each node; concurrent tasks share it, and
    ``self.ctx`` is the context of the task the current code runs for.
    """

    agent_type: ClassVar[str]
    _capabilities: ClassVar[dict[str, CapabilitySpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "agent_type" not in cls.__dict__:
            cls.agent_type = _snake_case(cls.__name__)
        validate_agent_type(cls.agent_type)  # it becomes the type part of agent ids
        found: dict[str, CapabilitySpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, _CAPABILITY_ATTR, None)
                if isinstance(spec, CapabilitySpec):
                    found[spec.name] = spec
        cls._capabilities = found

    @classmethod
    def capabilities(cls) -> dict[str, CapabilitySpec]:
        return dict(cls._capabilities)

    @property
    def ctx(self) -> TaskContext:
        ctx = current_context.get(None)
        if ctx is None:
            raise ShoalError("self.ctx is only available while a task runs")
        return ctx


class Runtime(Protocol):
    """What a TaskContext needs from the node that runs the task."""

    client: Client
    loop: asyncio.AbstractEventLoop
    node_id: str

    def emit_event(self, task_id: str, token: int, kind: str, data: Any) -> None: ...


class Written:
    """Returned by ``ctx.progress/log/emit``: events are batched and written shortly
    after; ``await`` it to wait until this one is in the engine, or ignore it."""

    def __init__(self, future: asyncio.Future[None] | None) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        if self._future is not None:
            yield from asyncio.shield(self._future).__await__()


class TaskContext:
    """``self.ctx`` inside a handler: the running task's id, attempt, events and sub-tasks.

    ``fencing_token`` grows with every delivery of the task (a re-run after its node
    died gets a larger one): a handler can pass it along with its own side effects
    so that a store can refuse writes from a superseded run.
    """

    def __init__(
        self,
        runtime: Runtime,
        task_id: str,
        capability: str,
        attempt: int,
        traceparent: str | None,
        flushed: Callable[[], asyncio.Future[None] | None],
        fencing_token: int = 0,
    ) -> None:
        self._runtime = runtime
        self.node_id = runtime.node_id
        self.task_id = task_id
        self.capability = capability
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.traceparent = traceparent
        self.cancel_requested = False
        self._flushed = flushed
        self._children: set[str] = set()

    def _emit(self, kind: str, data: Any) -> Written:
        self._runtime.emit_event(self.task_id, self.fencing_token, kind, data)
        return Written(self._flushed())

    def progress(self, fraction: float, message: str | None = None) -> Written:
        if not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
            raise ConfigurationError(f"progress fraction must be within 0..1, got {fraction!r}")
        return self._emit("progress", {"fraction": float(fraction), "message": message})

    def log(self, message: str, level: str = "info") -> Written:
        return self._emit("log", {"message": str(message), "level": level})

    def emit(self, event: dict[str, Any]) -> Written:
        if not isinstance(event, dict):
            raise ConfigurationError(f"emit() takes a dict, got {type(event).__name__}")
        return self._emit("event", event)

    async def submit(self, capability: str, /, **kwargs: Any) -> TaskHandle:
        """Submit a sub-task (not awaited); it records this task as its parent."""
        handle = await self._runtime.client.submit(
            capability, _parent=self.task_id, _traceparent=self.traceparent, **kwargs
        )
        self._children.add(handle.id)
        return handle

    async def call(self, capability: str, /, **kwargs: Any) -> Any:
        """Run a sub-task and return its result. Cancelling this task cancels it."""
        result_timeout = kwargs.pop("result_timeout", None)
        handle = await self.submit(capability, **kwargs)
        try:
            return await handle.result(timeout=result_timeout)
        except asyncio.CancelledError:
            await asyncio.shield(handle.cancel())
            raise

    def _blocking(self, coro: Awaitable[Any]) -> Any:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._runtime.loop:
            raise ShoalError("call_sync/submit_sync are for sync handlers; use `await ctx.call`")
        return asyncio.run_coroutine_threadsafe(coro, self._runtime.loop).result()  # type: ignore[arg-type]

    def call_sync(self, capability: str, /, **kwargs: Any) -> Any:
        """``call`` for sync handlers (they run in a worker thread)."""
        return self._blocking(self.call(capability, **kwargs))

    def submit_sync(self, capability: str, /, **kwargs: Any) -> TaskHandle:
        """``submit`` for sync handlers."""
        return self._blocking(self.submit(capability, **kwargs))  # type: ignore[no-any-return]


current_context: contextvars.ContextVar[TaskContext] = contextvars.ContextVar("shoal_task")
