"""Agents: plain Python classes whose ``@capability`` methods are the work they can do.

A capability's options are validated where it is declared: a bad option, or a
handler parameter whose name clashes with a task option, fails at import time with
a message saying what is allowed.

An agent class serves in two ways. A task sent to a *capability* runs on one shared,
stateless instance per node. A task or message sent to an *agent id* (``type/key``)
runs on that agent's own instance, activated on the node that owns its partition,
with ``self.state`` loaded from the engine and saved after every turn that changed it.
Messages go to the method marked ``@handler`` (or ``on_message``); published
messages to the ``@subscribe("topic")`` methods.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import re
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from shoal.coordination.cache import (
    DEFAULT_FILL_LEASE_S,
    DEFAULT_FILL_TIMEOUT_S,
    DEFAULT_LOCAL_BYTES,
    DEFAULT_TTL_S,
    Cache,
)
from shoal.coordination.config import ConfigStore
from shoal.coordination.leader import DEFAULT_TTL as LEADER_TTL
from shoal.coordination.leader import Callback, Leadership
from shoal.coordination.lock import Lock
from shoal.coordination.ratelimit import RateLimiter, validate_burst, validate_rate
from shoal.errors import ConfigurationError, ShoalError
from shoal.keys import validate_capability
from shoal.protocol import validate_agent_type
from shoal.usage import USAGE_EVENT, usage_fields

if TYPE_CHECKING:
    from shoal.client import Client, TaskHandle
    from shoal.coordination.saga import Sagas
    from shoal.options import TaskOptions
    from shoal.services import Services

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
        "agent",
    }
)

_CAPABILITY_ATTR = "__shoal_capability__"
_HANDLER_ATTR = "__shoal_handler__"
_SUBSCRIBE_ATTR = "__shoal_subscribe__"


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
    concurrency: int | None = None  # per node; None: up to the node's concurrency
    rate: float | None = None  # starts per second, cluster-wide; None: unlimited
    burst: int | None = None  # starts above the rate at once; None: one second's worth
    explicit: frozenset[str] = frozenset()  # the retry options the code set itself
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


def _check_limits(cap: str, concurrency: Any, rate: Any, burst: Any) -> None:
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ConfigurationError(
            f"capability {cap!r}: concurrency must be a whole number >= 1 (tasks of it one "
            f"node runs at once), got {concurrency!r}"
        )
    try:
        if rate is not None:
            validate_rate(rate)
        if burst is not None:
            validate_burst(burst)
    except ConfigurationError as exc:
        raise ConfigurationError(f"capability {cap!r}: {exc}") from None
    if burst is not None and rate is None:
        raise ConfigurationError(f"capability {cap!r}: burst= needs rate= (starts per second)")


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
    backoff: float | None = None,
    max_backoff: float | None = None,
    non_retryable: tuple[type[BaseException], ...] = (),
    max_queue_length: int | None = None,
    concurrency: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
) -> Callable[[F], F]:
    """Mark an Agent method as the handler of capability ``name`` (default: its name).

    ``max_attempts``/``timeout`` are defaults a task may override; ``backoff`` is the
    first retry delay in seconds (default 1, doubled per attempt, with jitter, up to
    ``max_backoff``, default 300); exceptions in ``non_retryable`` fail the task at
    once; ``max_queue_length`` bounds the capability's queue (submits beyond it get
    QueueFull). ``concurrency`` caps the tasks of it one node runs at once;
    ``rate`` caps how many start per second across the cluster (``burst`` above it
    at once). The live settings ``capability.<name>.*`` override all but the
    task's own options (docs/coordination.md, Configuration).
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
        _check_limits(cap, concurrency, rate, burst)
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
            backoff=1.0 if backoff is None else backoff,
            max_backoff=300.0 if max_backoff is None else max_backoff,
            non_retryable=tuple(non_retryable),
            max_queue_length=max_queue_length,
            concurrency=concurrency,
            rate=None if rate is None else float(rate),
            burst=burst,
            explicit=frozenset(
                n for n, v in (("backoff", backoff), ("max_backoff", max_backoff)) if v is not None
            ),
        )
        setattr(func, _CAPABILITY_ATTR, spec)
        return func

    return decorate


@dataclass(frozen=True)
class MessageSpec:
    """A method that receives messages: the ``@handler`` or a ``@subscribe`` one."""

    method_name: str
    is_async: bool


def handler(func: F) -> F:
    """Mark the method that handles messages sent to the agent (``send``/``request``).
    It is called with the message; what it returns is the reply to a ``request``.
    Without one, a method named ``on_message`` plays that part."""
    setattr(func, _HANDLER_ATTR, MessageSpec(func.__name__, inspect.iscoroutinefunction(func)))
    return func


def subscribe(topic: str) -> Callable[[F], F]:
    """Deliver messages published on ``topic`` to this method, on the agent of this
    type whose key is the message's ``source`` (durably: a down subscriber gets them
    when it comes back). Stack it to subscribe one method to several topics."""
    validate_topic(topic)

    def decorate(func: F) -> F:
        topics = dict(getattr(func, _SUBSCRIBE_ATTR, {}))
        topics[topic] = MessageSpec(func.__name__, inspect.iscoroutinefunction(func))
        setattr(func, _SUBSCRIBE_ATTR, topics)
        return func

    return decorate


def validate_topic(topic: str) -> str:
    """Topics become key parts, so they share the capabilities' alphabet."""
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
        raise ConfigurationError(
            f"topic {topic!r} is invalid: start with a letter or '_', then up to 127 "
            "letters, digits, '_', '.' or '-'"
        )
    return topic


_TOPIC_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Agent:
    """Base class of agent types. Subclass it and mark methods with ``@capability``,
    ``@handler`` and ``@subscribe``.

    Tasks sent to a capability share one stateless instance per node. An agent
    addressed by id (``type/key``) gets an instance of its own with ``self.id``,
    ``self.key`` and a durable ``self.state``; it handles one message at a time.
    ``self.ctx`` is the context of the task or message the current code runs for.
    """

    agent_type: ClassVar[str]
    _capabilities: ClassVar[dict[str, CapabilitySpec]] = {}
    _message_handler: ClassVar[MessageSpec | None] = None
    _subscriptions: ClassVar[dict[str, MessageSpec]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "agent_type" not in cls.__dict__:
            cls.agent_type = _snake_case(cls.__name__)
        validate_agent_type(cls.agent_type)  # it becomes the type part of agent ids
        found: dict[str, CapabilitySpec] = {}
        handlers: dict[str, MessageSpec] = {}
        topics: dict[str, MessageSpec] = {}
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                spec = getattr(attr, _CAPABILITY_ATTR, None)
                if isinstance(spec, CapabilitySpec):
                    found[spec.name] = spec
                if isinstance(marked := getattr(attr, _HANDLER_ATTR, None), MessageSpec):
                    handlers[marked.method_name] = marked
                topics.update(getattr(attr, _SUBSCRIBE_ATTR, {}))
        cls._capabilities = found
        cls._subscriptions = topics
        cls._message_handler = _message_handler_of(cls, handlers)

    @classmethod
    def capabilities(cls) -> dict[str, CapabilitySpec]:
        return dict(cls._capabilities)

    @classmethod
    def message_handler(cls) -> MessageSpec | None:
        return cls._message_handler

    @classmethod
    def subscriptions(cls) -> dict[str, MessageSpec]:
        return dict(cls._subscriptions)

    @classmethod
    def is_addressable(cls) -> bool:
        """Whether instances can be addressed by id: it has anything to receive."""
        return bool(cls._capabilities or cls._message_handler or cls._subscriptions)

    # --- the addressed agent's identity and state ---------------------------------

    @property
    def id(self) -> str | None:
        """``type/key`` of an addressed agent; None on the shared capability instance."""
        return self.__dict__.get("_shoal_id")

    @property
    def key(self) -> str | None:
        agent_id = self.id
        return agent_id.partition("/")[2] if agent_id else None

    @property
    def state(self) -> dict[str, Any]:
        """The agent's durable state: loaded when it is activated, saved after every
        turn that changed it. Values must be msgpack data (dicts, lists, str, numbers,
        bytes, bool, None)."""
        state = self.__dict__.get("_shoal_state")
        if state is None:
            raise ShoalError(
                f"{type(self).__qualname__}.state exists only on an agent addressed by id "
                "(submit(..., agent='type/key')); tasks sent to a capability share one "
                "stateless instance"
            )
        return state  # type: ignore[no-any-return]

    @state.setter
    def state(self, value: dict[str, Any]) -> None:
        if not isinstance(value, dict):
            raise ConfigurationError(f"state must be a dict, got {type(value).__name__}")
        if self.__dict__.get("_shoal_state") is None:
            raise ShoalError("state can only be set on an agent addressed by id")
        self.__dict__["_shoal_state"] = value

    async def on_activate(self) -> None:
        """Called after the agent was activated and its state loaded, before its
        first turn on this node. Override to warm caches."""

    async def on_deactivate(self) -> None:
        """Called before an idle agent is deactivated (its state is saved after it)."""

    @property
    def ctx(self) -> TaskContext:
        ctx = current_context.get(None)
        if ctx is None:
            raise ShoalError("self.ctx is only available while a task runs")
        return ctx


def _message_handler_of(cls: type, handlers: dict[str, MessageSpec]) -> MessageSpec | None:
    if len(handlers) > 1:
        raise ConfigurationError(
            f"{cls.__qualname__} marks {len(handlers)} methods @handler "
            f"({', '.join(sorted(handlers))}); an agent type has one message handler"
        )
    if handlers:
        return next(iter(handlers.values()))
    method = getattr(cls, "on_message", None)
    if callable(method):
        return MessageSpec("on_message", inspect.iscoroutinefunction(method))
    return None


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
    """``self.ctx`` inside a handler: the running task's id, attempt, events and
    sub-tasks, and messaging to other agents.

    ``fencing_token`` grows with every delivery of the task (a re-run after its node
    died gets a larger one): a handler can pass it along with its own side effects
    so that a store can refuse writes from a superseded run. For an addressed agent
    it is the token of its partition's lease.

    On an addressed agent, ``agent_id`` is its id; for a message, ``sender`` is the
    sending agent's id (None from a client) and ``topic`` the topic it was
    published on (None for a direct message). ``task_id`` is "" for a message.

    ``submitted_by`` is the id of the gateway API key the task is charged to (None
    when it came from a client, or an open gateway); sub-tasks submitted through
    ``submit``/``call`` inherit it, so work done on a caller's behalf anywhere in the
    cluster is accounted to that caller. A message turn has none.
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
        *,
        agent_id: str | None = None,
        sender: str | None = None,
        topic: str | None = None,
        submitted_by: str | None = None,
    ) -> None:
        self._runtime = runtime
        self.agent_id = agent_id
        self.submitted_by = submitted_by
        self.sender = sender
        self.topic = topic
        self.node_id = runtime.node_id
        self.task_id = task_id
        self.capability = capability
        self.attempt = attempt
        self.fencing_token = fencing_token
        self.traceparent = traceparent
        self.cancel_requested = False
        self._flushed = flushed
        self._children: set[str] = set()
        # the write of the last event emitted: an agent's turn waits for it before
        # its commit, which is written apart from the batched events
        self.pending_events: asyncio.Future[None] | None = None
        self.emitted = False  # any event, from the loop or a handler's thread

    def _emit(self, kind: str, data: Any) -> Written:
        if not self.task_id:
            raise ShoalError(
                "progress/log/emit record events of a task; this turn handles a message"
            )
        self._runtime.emit_event(self.task_id, self.fencing_token, kind, data)
        self.emitted = True
        self.pending_events = self._flushed()
        return Written(self.pending_events)

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

    def record_usage(self, **counters: int) -> Written:
        """Add counters to this task's record, e.g. the tokens a model call spent:
        ``ctx.record_usage(prompt_tokens=812, completion_tokens=95)``; they read back
        as ``TaskInfo.usage``. Written with the task's events (batched, no extra round
        trip); ``await`` the result to wait until they are in the engine.

        Counters only grow and add up across calls *and attempts*: a turn that was
        retried really spent its tokens, so a superseded attempt's usage counts too.
        """
        return self._emit(USAGE_EVENT, usage_fields(counters))

    async def submit(self, capability: str, /, **kwargs: Any) -> TaskHandle:
        """Submit a sub-task (not awaited); it records this task as its parent and is
        charged to the same API key (``submitted_by``)."""
        handle = await self._runtime.client.submit(
            capability, _parent=self.task_id, _traceparent=self.traceparent,
            _submitted_by=self.submitted_by, **kwargs,
        )  # fmt: skip
        self._children.add(handle.id)
        return handle

    async def call(self, capability: str, /, **kwargs: Any) -> Any:
        """Run a sub-task and return its result. Cancelling this task cancels it."""
        result_timeout = kwargs.pop("result_timeout", None)
        handle = await self.submit(capability, **kwargs)
        return await self._result_of(handle, result_timeout)

    async def call_arguments(
        self,
        capability: str,
        arguments: Mapping[str, Any],
        options: TaskOptions,
        *,
        agent: str | None = None,
        result_timeout: float | None = None,
    ) -> Any:
        """``call`` with the handler's arguments as one mapping and the options
        apart: for arguments that come from data (a model's tool call), where no
        argument may be taken for an option (``delay``, ``agent``...)."""
        handle = await self._runtime.client.submit_arguments(
            capability, arguments, options, agent=agent, _parent=self.task_id,
            _traceparent=self.traceparent, _submitted_by=self.submitted_by,
        )  # fmt: skip
        self._children.add(handle.id)
        return await self._result_of(handle, result_timeout)

    async def _result_of(self, handle: TaskHandle, result_timeout: float | None) -> Any:
        try:
            return await handle.result(timeout=result_timeout)
        except asyncio.CancelledError:
            await asyncio.shield(handle.cancel())
            raise

    @property
    def client(self) -> Client:
        """The node's engine client, for what the context has no shortcut for
        (reading another task's events, agent state...). Shared: do not close it."""
        return self._runtime.client

    @property
    def services(self) -> Services:
        """Calls to registered services, with balancing, breakers, retries and
        fallback: ``await self.ctx.services("llm").request("POST", path, json=...)``.
        The node's pools, shared by all its handlers."""
        return self._runtime.client.services

    def rate_limiter(
        self,
        name: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        limit: int | None = None,
        window: float | None = None,
    ) -> RateLimiter:
        """A rate limit shared by the whole namespace, e.g. an external API's quota:
        ``await self.ctx.rate_limiter("geo", rate=10).acquire()`` before each call.
        See shoal.coordination.ratelimit."""
        return self._runtime.client.rate_limiter(
            name, rate=rate, burst=burst, limit=limit, window=window
        )

    def lock(self, name: str, *, ttl: float = 10.0, wait: float | None = None) -> Lock:
        """A lock shared by the whole namespace, with a fencing token to pass along
        with writes: ``async with self.ctx.lock("ledger", wait=5) as lock: ...``.
        Held by this node's client; see shoal.coordination.lock."""
        return self._runtime.client.lock(name, ttl=ttl, wait=wait)

    def leader(
        self,
        name: str,
        *,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
        ttl: float = LEADER_TTL,
    ) -> Leadership:
        """A campaign for leadership of ``name`` while ``async with`` runs it, led by
        this node (its id is the holder): see shoal.coordination.leader."""
        return self._runtime.client.leader(
            name, on_elected=on_elected, on_lost=on_lost, ttl=ttl, holder=self.node_id
        )

    def cache(
        self,
        name: str,
        *,
        ttl: float | None = DEFAULT_TTL_S,
        max_local_bytes: int = DEFAULT_LOCAL_BYTES,
        fill_lease: float = DEFAULT_FILL_LEASE_S,
        fill_timeout: float = DEFAULT_FILL_TIMEOUT_S,
    ) -> Cache:
        """The two-level cache ``name``, shared by this node's handlers (one local
        level per node) and with every other process through the engine:
        ``await self.ctx.cache("users", ttl=60).get_or_set(key, load)``. See
        shoal.coordination.cache."""
        return self._runtime.client.cache(
            name,
            ttl=ttl,
            max_local_bytes=max_local_bytes,
            fill_lease=fill_lease,
            fill_timeout=fill_timeout,
        )

    @property
    def config(self) -> ConfigStore:
        """The namespace's live configuration, e.g. an ``app.`` setting of your own:
        ``await self.ctx.config.get("app.tone", "plain")`` (see shoal.coordination.config)."""
        return self._runtime.client.config

    @property
    def sagas(self) -> Sagas:
        """Start and follow sagas from a handler: ``await self.ctx.sagas.start(saga)``
        (see shoal.coordination.saga)."""
        return self._runtime.client.sagas

    # --- messaging ------------------------------------------------------------------

    async def send(self, agent_id: str, message: Any) -> None:
        """Put ``message`` into the agent's mailbox (durable, one-way)."""
        await self._runtime.client.send(
            agent_id, message, _sender=self.agent_id, _traceparent=self.traceparent
        )

    async def request(self, agent_id: str, message: Any, timeout: float = 30.0) -> Any:
        """Send ``message`` and wait for the agent's reply (its handler's return value).
        RequestTimeout after ``timeout`` seconds; RequestFailed if its handler raised.
        An agent handles one message at a time, so a request to itself, or a cycle of
        requests back to it, can only time out."""
        if agent_id == self.agent_id:
            raise ConfigurationError(
                f"agent {agent_id} cannot request itself: it handles one message at a time, "
                "so it would wait for its own reply until the timeout; use send()"
            )
        return await self._runtime.client.request(
            agent_id, message, timeout=timeout, _sender=self.agent_id,
            _traceparent=self.traceparent,
        )  # fmt: skip

    async def publish(self, topic: str, message: Any, *, source: str | None = None) -> int:
        """Publish ``message`` on ``topic`` to the subscribed agent types: each type's
        agent with key ``source`` (default: this agent's key) gets it, durably.
        Returns the number of agent types it was delivered to."""
        if source is None and self.agent_id is not None:
            source = self.agent_id.partition("/")[2]
        if source is None:
            raise ConfigurationError("publish() needs source= outside an addressed agent")
        return await self._runtime.client.publish(
            topic, message, source=source, _sender=self.agent_id, _traceparent=self.traceparent
        )

    async def broadcast(self, agent_type: str, message: Any) -> None:
        """Hand ``message`` to every *currently active* agent of ``agent_type``, on all
        nodes (ephemeral: an agent activated later, or a node that is away, misses it)."""
        await self._runtime.client.broadcast(agent_type, message, _sender=self.agent_id)

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
