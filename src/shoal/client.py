"""The client: submit tasks, wait for results, follow events, cancel, inspect, redrive.

Waiting never polls. The submitting client names its *inbox* (a list) in each
task; the script that finishes a task pushes the id there, and one background
reader per client (a blocking pop) wakes every local waiter at once. A task
submitted elsewhere is awaited by a blocking XREAD on its event stream, whose
last entry is the terminal ``done`` event.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import redis
import redis.asyncio as aioredis
from cachetools import LRUCache
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from shoal import protocol, replication
from shoal.addresses import mask_url
from shoal.cluster import ClusterState, read_cluster
from shoal.coordination.cache import (
    DEFAULT_FILL_LEASE_S,
    DEFAULT_FILL_TIMEOUT_S,
    DEFAULT_LOCAL_BYTES,
    DEFAULT_TTL_S,
    Cache,
    CacheOptions,
)
from shoal.coordination.config import ConfigStore
from shoal.coordination.invalidation import Listener
from shoal.coordination.leader import DEFAULT_TTL as LEADER_TTL
from shoal.coordination.leader import Callback, Leadership, leader_of
from shoal.coordination.lock import Lock, LockHolder
from shoal.coordination.ratelimit import RateLimiter
from shoal.coordination.saga import Sagas
from shoal.engine import (
    engine_errors,
    engine_kind,
    open_connection,
    resolve_url,
    translate,
)
from shoal.errors import (
    ConfigurationError,
    EngineUnavailable,
    NotHosted,
    QueueFull,
    ResultTimeout,
    ShoalError,
    TaskCancelled,
    TaskFailed,
    TaskNotFound,
)
from shoal.keys import CLUSTER_GROUPS, Keys, validate_capability
from shoal.messaging import AgentPlane
from shoal.observability import tracing
from shoal.options import TaskOptions
from shoal.protocol import AgentInfo, AgentTypeInfo, ErrorInfo, Event, TaskInfo
from shoal.registry import Registry, Watcher
from shoal.resilience import Backoff
from shoal.scripts import Scripts
from shoal.services import Services
from shoal.settings import Settings, fixed_setting
from shoal.tasklist import TaskPage, list_tasks

INBOX_BLOCK_S = 1.0  # longest block of an inbox read (then it looks at close())
RECHECK_S = 5.0  # how often the records of awaited own tasks are looked at
T = TypeVar("T")

log = logging.getLogger("shoal.client")

OUTCOME_CACHE_SIZE = 100_000
OUTAGE_LOG_EVERY_S = 5.0
SUBMIT_CHUNK = 500  # tasks per submit-script call: big enough to amortise, small enough
# not to stall the engine (one script runs alone) for more than a few milliseconds.
DEAD_AFTER_MS = 3000  # a node whose last heartbeat is older than this is not "hosting"


class DeadLetter(msgspec.Struct, frozen=True):
    """One entry of a capability's dead-letter stream."""

    entry_id: str
    task: TaskInfo


class TaskHandle:
    """A submitted task: its id and ways to follow it."""

    __slots__ = ("_client", "id", "is_new")

    def __init__(self, client: Client, task_id: str, is_new: bool = True) -> None:
        self._client = client
        self.id = task_id
        self.is_new = is_new  # False when an idempotency key returned an existing task

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    async def status(self) -> TaskInfo:
        return await self._client.status(self.id)

    async def result(self, timeout: float | None = None, *, with_traceback: bool = False) -> Any:
        return await self._client.result(self.id, timeout=timeout, with_traceback=with_traceback)

    def events(self, after: str | None = None) -> AsyncIterator[Event]:
        return self._client.events(self.id, after=after)

    async def cancel(self) -> str:
        return await self._client.cancel(self.id)


class Client:
    """Async client. ``async with Client() as c:`` connects to ``url`` (or
    ``SHOAL_REDIS_URL``, or the embedded engine under ``data_dir``)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        data_dir: str | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.settings = settings or Settings.from_env(url, namespace, data_dir)
        self.keys = Keys(self.settings.namespace)
        self.client_id = protocol.new_id()
        self._url = ""
        self._redis: aioredis.Redis | None = None
        self._blocking: aioredis.Redis | None = None
        self._scripts: Scripts | None = None
        self._waiters: dict[str, list[asyncio.Future[tuple[str, bytes]]]] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}  # inbox readers, by key group
        self._closing = False
        self._rechecker: asyncio.Task[None] | None = None
        self.rechecked = 0  # outcomes found by the recheck, not in the inbox (see there)
        self._next_group = int.from_bytes(os.urandom(2), "big")  # clients start apart
        self._states = _StateReader(self)
        self._agents = AgentPlane(self)
        self._outage_logged = 0.0
        # Own tasks whose outcome has not arrived in the inbox yet, and outcomes that
        # arrived before anyone asked (bounded; an evicted one is read from the record).
        self._in_flight: set[str] = set()
        self._arrived: LRUCache[str, tuple[str, bytes]] = LRUCache(maxsize=OUTCOME_CACHE_SIZE)
        self._watcher: Watcher | None = None
        self._services: Services | None = None
        self.held_locks: set[Lock] = set()  # released (watchdogs stopped) on close
        self.campaigns: set[Leadership] = set()  # stopped (leaders resign) on close
        self._caches: dict[str, Cache] = {}
        self._cache_listener: Listener | None = None
        self._config: ConfigStore | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []

    # --- lifecycle ------------------------------------------------------------

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have ``closer`` awaited first when this client closes: for what lives
        as long as the client (an LLM agent's model connections, for one)."""
        self._closers.append(closer)

    async def connect(self) -> Client:
        if self._redis is not None:
            return self
        tracing.configure("shoal-client")  # a node or gateway configured it first, if any
        self._closing = False
        self._url = await asyncio.to_thread(resolve_url, self.settings.url, self.settings.data_dir)
        conn = open_connection(self._url)
        try:
            async with engine_errors(self._url):
                info = await conn.info("server")
                _check_engine_version(info, self._url)
                scripts = Scripts(conn)
                await scripts.load_all()
                self.keys = await self._namespace_keys(conn)
        except BaseException:
            await conn.aclose()  # a refused namespace setting must not leak the pool
            raise
        self._redis, self._scripts = conn, scripts
        self._blocking = open_connection(self._url, for_blocking=True)
        if isinstance(self._blocking, RedisCluster):
            # Load the slot map now: a first burst of blocking pops sent before it
            # is known meets MOVED, and the reload that follows drops connections
            # a pop may have been answered on (its entries then lost).
            async with engine_errors(self._url):
                await self._blocking.initialize()
        return self

    async def _namespace_keys(self, conn: Any) -> Keys:
        """The namespace's key layout: its hash-tag group count is fixed by whoever
        used it first (1 on a standalone engine or Sentinel group, 16 on a Cluster)."""
        default = CLUSTER_GROUPS if engine_kind(self._url) == "cluster" else 1
        groups = await fixed_setting(
            conn, self.keys.config, self.settings.namespace, "groups", "key_groups",
            self.settings.key_groups, default, "hash-tag groups",
        )  # fmt: skip
        return Keys(self.settings.namespace, groups)

    async def close(self) -> None:
        self._closing = True
        await self._run_closers()
        await self._release_locks()
        await self._close_caches()
        if self._config is not None:
            await self._config.close()
        if self._services is not None:
            await self._services.close()
            self._services = None
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None
        readers = list(self._readers.values())
        if self._rechecker is not None:
            readers.append(self._rechecker)
            self._rechecker = None
        for reader in readers:
            reader.cancel()
        if readers:
            await asyncio.wait(readers, timeout=INBOX_BLOCK_S + 1)
        self._readers.clear()
        for futures in self._waiters.values():
            for fut in futures:
                fut.cancel()
        self._waiters.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._blocking is not None:
            await self._blocking.aclose()
            self._blocking = None

    async def _run_closers(self) -> None:
        closers, self._closers = self._closers, []
        for closer in closers:
            try:
                await closer()
            except Exception:  # one owner's failure must not keep the rest open
                log.exception("closing %r with the client failed", closer)

    async def _release_locks(self) -> None:
        """A closing client gives its locks up (their watchdogs would renew through a
        closed connection): the next holder need not wait out their ttl. Campaigns
        stop first, so that none takes a lock again while the client closes."""
        for campaign in list(self.campaigns):
            try:
                await campaign.stop()
            except ShoalError as exc:
                log.warning(
                    "leader %r did not resign on close (%s): it expires", campaign.name, exc
                )
        for lock in list(self.held_locks):
            lock._lose("the client closed")  # a block still running learns it at once
            try:
                await lock.release()
            except ShoalError as exc:
                log.warning("lock %r not released on close (%s): it expires", lock.name, exc)

    async def _close_caches(self) -> None:
        """Stop the invalidation listener: local copies can no longer be kept fresh."""
        for cache in self._caches.values():
            cache.close()
        self._caches.clear()
        if self._cache_listener is not None:
            await self._cache_listener.close()
            self._cache_listener = None

    async def __aenter__(self) -> Client:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        return self._url

    # redis-py annotates replies as unions over decode_responses (bytes | str | ...);
    # Shoal always reads bytes and types replies where they enter (protocol.py), so
    # the connections are exposed as Any rather than cast at every call.
    @property
    def redis(self) -> Any:
        if self._redis is None:
            raise ConfigurationError("the client is not connected: use `async with Client()`")
        return self._redis

    @property
    def blocking(self) -> Any:
        """An unbounded connection pool, apart from the commands' bounded one: for
        blocking reads (XREAD BLOCK, BLMPOP), and for callers whose concurrency is
        bounded by construction (a node's fetch loop and recorder), which so skip
        the bounded pool's wait for a free connection (about 20 µs a command)."""
        if self._blocking is None:
            raise ConfigurationError("the client is not connected: use `async with Client()`")
        return self._blocking

    @property
    def scripts(self) -> Scripts:
        self.redis  # noqa: B018 - raises the not-connected error
        assert self._scripts is not None
        return self._scripts

    def errors(self) -> engine_errors:
        """``async with client.errors():`` turns engine errors into Shoal's."""
        return engine_errors(self._url)

    # --- services (shoal.registry, shoal.services) -----------------------------

    @property
    def registry(self) -> Registry:
        """Register, discover and watch service instances."""
        return Registry(self)

    @property
    def service_watcher(self) -> Watcher:
        """Keeps this client's watched service views current (one per client)."""
        if self._watcher is None:
            self._watcher = Watcher(self)
        return self._watcher

    @property
    def services(self) -> Services:
        """Calls to registered services: ``client.services("llm").request(...)``."""
        if self._services is None:
            self._services = Services(self)
        return self._services

    # --- coordination (shoal.coordination) -------------------------------------

    def rate_limiter(
        self,
        name: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        limit: int | None = None,
        window: float | None = None,
    ) -> RateLimiter:
        """A rate limit shared by every process of the namespace: a token bucket
        (``rate`` per second, ``burst``) or a sliding window (``limit`` calls per
        ``window`` seconds); ``await limiter.acquire(key)`` waits for room or raises
        RateLimited. See shoal.coordination.ratelimit."""
        return RateLimiter(self, name, rate=rate, burst=burst, limit=limit, window=window)

    def lock(
        self, name: str, *, ttl: float = 10.0, wait: float | None = None, holder: str | None = None
    ) -> Lock:
        """A lock shared by every process of the namespace, with a fencing token:
        ``async with client.lock("name", ttl=10, wait=5) as lock: ... lock.token``.
        See shoal.coordination.lock for renewal and LockLost."""
        return Lock(self, name, ttl=ttl, wait=wait, holder=holder)

    def leader(
        self,
        name: str,
        *,
        on_elected: Callback | None = None,
        on_lost: Callback | None = None,
        ttl: float = LEADER_TTL,
        holder: str | None = None,
    ) -> Leadership:
        """A campaign for leadership of ``name``, run while ``async with`` holds it;
        callbacks get the term's fencing token (see shoal.coordination.leader)."""
        return Leadership(
            self, name, on_elected=on_elected, on_lost=on_lost, ttl=ttl, holder=holder
        )

    async def leader_of(self, name: str) -> LockHolder | None:
        """Who leads ``name``: its holder id and fencing token, or None."""
        return await leader_of(self, name)

    def cache(
        self,
        name: str,
        *,
        ttl: float | None = DEFAULT_TTL_S,
        max_local_bytes: int = DEFAULT_LOCAL_BYTES,
        fill_lease: float = DEFAULT_FILL_LEASE_S,
        fill_timeout: float = DEFAULT_FILL_TIMEOUT_S,
    ) -> Cache:
        """The two-level cache ``name`` (an LRU of ``max_local_bytes`` in this client
        in front of the engine; entries live ``ttl`` seconds): one object per name
        and client, kept fresh by one invalidation listener. See
        shoal.coordination.cache."""
        options = CacheOptions(
            ttl=ttl,
            max_local_bytes=max_local_bytes,
            fill_lease=fill_lease,
            fill_timeout=fill_timeout,
        )
        cache = self._caches.get(name)
        if cache is not None:
            if cache.options != options:
                raise ConfigurationError(
                    f"cache {name!r} is already open in this client with {cache.options}; "
                    f"give the same options (got {options})"
                )
            return cache
        self.redis  # noqa: B018 - raises the not-connected error
        if self._cache_listener is None:
            self._cache_listener = Listener(self)
        cache = self._caches[name] = Cache(self, name, options, self._cache_listener)
        return cache

    @property
    def config(self) -> ConfigStore:
        """The namespace's live configuration: get, set, delete, list, history, watch
        (see shoal.coordination.config)."""
        if self._config is None:
            self._config = ConfigStore(self)
        return self._config

    @property
    def sagas(self) -> Sagas:
        """Durable sagas: ``handle = await client.sagas.start(saga)``, then
        ``await handle.result()`` (see shoal.coordination.saga)."""
        return Sagas(self)

    # --- submitting -----------------------------------------------------------

    async def submit(
        self,
        capability: str,
        /,
        *,
        priority: str = "normal",
        delay: float | None = None,
        eta: datetime | None = None,
        timeout: float | None = None,
        deadline: float | datetime | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        agent: str | None = None,
        _parent: str | None = None,
        _traceparent: str | None = None,
        _submitted_by: str | None = None,
        **kwargs: Any,
    ) -> TaskHandle:
        """Queue one task for ``capability`` with ``kwargs`` as the handler's arguments.

        With ``agent="type/key"`` the task goes to that agent (activated on the node
        owning its partition, with its state; its tasks and messages run one at a
        time, in arrival order — ``priority`` does not reorder them).

        Raises QueueFull when the queue is at its bound, SerializationError when an
        argument is not msgpack data, ConfigurationError for a bad option,
        UnknownAgentType for an agent type no node hosts or lacking the capability.
        """
        options = TaskOptions.build(
            priority=priority, delay=delay, eta=eta, timeout=timeout, deadline=deadline,
            max_attempts=max_attempts, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await self.submit_arguments(
            capability, kwargs, options, agent=agent, _parent=_parent, _traceparent=_traceparent,
            _submitted_by=_submitted_by,
        )  # fmt: skip

    async def submit_arguments(
        self,
        capability: str,
        arguments: Mapping[str, Any],
        options: TaskOptions,
        *,
        agent: str | None = None,
        _parent: str | None = None,
        _traceparent: str | None = None,
        _task_id: str | None = None,
        _submitted_by: str | None = None,
    ) -> TaskHandle:
        """``submit`` with the handler's arguments as one mapping and the options built
        (``TaskOptions.build``): for callers whose arguments come from data — the HTTP
        gateway — where no argument may be taken for an option. ``_task_id``: an id
        the caller made (``keys.new_task_id``) and recorded before submitting, as a
        saga's runner does; a task of that id that exists already is left as it is.
        ``_submitted_by``: the id of the API key the task is charged to (the gateway
        sets it; sub-tasks inherit it), recorded as ``TaskInfo.submitted_by``."""
        with tracing.producer("submit", capability, _traceparent, _attrs(capability, agent)) as p:
            trace = p.traceparent
            handles = await self._submit(
                capability, [arguments], options, _parent, trace, agent, _task_id, _submitted_by
            )
            p.annotate("shoal.task_id", handles[0].id)
        return handles[0]

    async def submit_many(
        self,
        capability: str,
        arguments: Iterable[Mapping[str, Any]],
        /,
        *,
        priority: str = "normal",
        delay: float | None = None,
        eta: datetime | None = None,
        timeout: float | None = None,
        deadline: float | datetime | None = None,
        max_attempts: int | None = None,
        agent: str | None = None,
    ) -> list[TaskHandle]:
        """Queue one task per kwargs mapping, pipelined; handles come back in order
        (all to ``agent`` if given, in this order).

        If the queue fills part-way, QueueFull is raised and its ``accepted``
        attribute holds the handles of the tasks that were queued before it.
        """
        options = TaskOptions.build(
            priority=priority, delay=delay, eta=eta, timeout=timeout, deadline=deadline,
            max_attempts=max_attempts,
        )  # fmt: skip
        with tracing.producer("submit", capability, None, _attrs(capability, agent)) as p:
            rows = list(arguments)
            handles = await self._submit(capability, rows, options, None, p.traceparent, agent)
            p.annotate("shoal.tasks", len(handles))
        return handles

    async def _submit(
        self,
        capability: str,
        arguments: list[Mapping[str, Any]],
        options: TaskOptions,
        parent: str | None,
        traceparent: str | None,
        agent: str | None = None,
        task_id: str | None = None,
        submitted_by: str | None = None,
    ) -> list[TaskHandle]:
        validate_capability(capability)
        fixed_group: int | None = None
        mbox, agent_id = "", ""
        if agent is not None:
            mbox, agent_id, fixed_group = await self._agents.task_target(agent, capability)
        elif options.idempotency_key:
            fixed_group = self.keys.key_group(options.idempotency_key)
        if task_id is not None:  # (one task) the id names its group
            if fixed_group is not None and fixed_group != self.keys.task_group(task_id):
                raise ConfigurationError(f"task id {task_id} is not in key group {fixed_group}")
            fixed_group = self.keys.task_group(task_id)
        payloads: list[tuple[bytes, str]] = []
        for kwargs in arguments:
            if not isinstance(kwargs, Mapping):
                raise ConfigurationError(
                    f"submit_many takes mappings of keyword arguments, got {type(kwargs).__name__}"
                )
            payload = protocol.encode_arguments(kwargs)
            payloads.append((payload, tracing.carried_traceparent(traceparent)))
        if not payloads:
            return []
        # Each chunk lives in one key group (one hash slot): an agent's tasks in its
        # partition's group (their order is the mailbox's), an idempotent task in its
        # key's group, other chunks in turn in every group, spreading the work.
        chunks: list[tuple[int, list[tuple[str, bytes, str]]]] = []
        for i in range(0, len(payloads), SUBMIT_CHUNK):
            group = fixed_group if fixed_group is not None else self._take_group()
            chunk = [
                (task_id or self.keys.new_task_id(group), *row)
                for row in payloads[i : i + SUBMIT_CHUNK]
            ]
            chunks.append((group, chunk))
        calls: list[tuple[list[str], list[str | int | bytes]]] = []
        now = protocol.now_ms()
        for group, chunk in chunks:
            self._ensure_reader(group)
            head: list[str | int | bytes] = [
                self.keys.group_prefix(group), now, int(self.settings.retention * 1000),
                self.settings.queue_max_length, capability, options.priority,
                *options.script_fields(), self.inbox(group), parent or "",
                options.idempotency_key or "", mbox, agent_id, submitted_by or "",
            ]  # fmt: skip
            calls.append(([self.keys.delayed(group)], head + [f for row in chunk for f in row]))
        # Safe to re-send after a lost reply: the task ids are ours and the script
        # skips ids it already stored, so a retry never queues a task twice.
        replies = await self._through_outages(lambda: self._run_submit(calls))
        return self._handles(capability, [chunk for _, chunk in chunks], replies)

    def _take_group(self) -> int:
        self._next_group += 1
        return self._next_group % self.keys.groups

    def inbox(self, group: int) -> str:
        """This client's inbox in a key group (finished tasks of that group land there)."""
        return self.keys.inbox(self.client_id, group)

    async def _run_submit(
        self, calls: list[tuple[list[str], list[str | int | bytes]]]
    ) -> list[list[Any]]:
        """One submit-script call per chunk, all in one pipeline (and with
        ``ack_replicas``, WAITs on the same connections: see shoal.replication)."""
        acks = self.settings.ack_replicas
        async with self.errors():
            if len(calls) == 1 and not acks:
                return [await self.scripts.submit(*calls[0])]
            pipe = self.redis.pipeline(transaction=False)
            for keys, args in calls:
                self.scripts.submit.queue(pipe, keys, args)
            waits = 0
            if acks:
                shard_keys = [keys[0] for keys, _ in calls]
                waits = replication.queue_waits(
                    pipe, self.redis, shard_keys, acks, self.settings.ack_timeout
                )
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            if waits:
                replication.check_acks(replies[-waits:], acks, "the submitted task(s)")
                replies = replies[:-waits]
            for index, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):  # engine restarted meanwhile: run again
                    replies[index] = await self.scripts.submit(*calls[index])
                elif isinstance(reply, Exception):
                    raise reply
        return replies

    def _handles(
        self,
        capability: str,
        chunks: list[list[tuple[str, bytes, str]]],
        replies: list[list[Any]],
    ) -> list[TaskHandle]:
        handles: list[TaskHandle] = []
        for chunk, (accepted, existing) in zip(chunks, replies, strict=True):
            if existing:  # an idempotency key named an existing task
                return [TaskHandle(self, existing.decode(), is_new=False)]
            handles += [TaskHandle(self, row[0]) for row in chunk[:accepted]]
        self._in_flight.update(h.id for h in handles)
        total = sum(len(chunk) for chunk in chunks)
        if len(handles) < total:
            raise QueueFull(
                f"queue of capability {capability!r} is full: {len(handles)} of {total} "
                "task(s) accepted, the rest were not queued; retry later or raise the bound "
                "(max_queue_length / SHOAL_QUEUE_MAX_LENGTH)",
                accepted=handles,
            )
        return handles

    async def call(
        self, capability: str, /, *, result_timeout: float | None = None, **kwargs: Any
    ) -> Any:
        """Submit and wait for the result (``result_timeout`` bounds the wait);
        ``agent="type/key"`` addresses an agent as in ``submit``."""
        handle = await self.submit(capability, **kwargs)
        return await handle.result(timeout=result_timeout)

    # --- agents and messages ------------------------------------------------------

    async def partitions(self) -> int:
        """The namespace's number of agent partitions (fixed when first used)."""
        return await self._agents.partitions()

    async def agent_types(self) -> dict[str, AgentTypeInfo]:
        """The agent types nodes registered in this namespace."""
        return await self._agents.agent_types(refresh=True)

    async def send(
        self,
        agent_id: str,
        message: Any,
        *,
        _sender: str | None = None,
        _traceparent: str | None = None,
    ) -> None:
        """Put ``message`` (msgpack data) into the agent's mailbox: durable, one-way.
        Its ``@handler`` (or ``on_message``) gets it in turn, on whichever node owns
        the agent's partition — now, or when one comes up."""
        target = _type_of(agent_id)
        with tracing.producer("send", target, _traceparent, {"shoal.agent_id": agent_id}) as p:
            await self._agents.send(agent_id, message, sender=_sender, traceparent=p.traceparent)

    async def request(
        self,
        agent_id: str,
        message: Any,
        *,
        timeout: float = 30.0,
        _sender: str | None = None,
        _traceparent: str | None = None,
    ) -> Any:
        """Send ``message`` and return the agent's reply (its handler's return value).
        RequestTimeout after ``timeout`` seconds; RequestFailed if the handler raised."""
        target = _type_of(agent_id)
        with tracing.producer("request", target, _traceparent, {"shoal.agent_id": agent_id}) as p:
            return await self._agents.request(
                agent_id, message, timeout=timeout, sender=_sender, traceparent=p.traceparent
            )

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        source: str,
        _sender: str | None = None,
        _traceparent: str | None = None,
    ) -> int:
        """Deliver ``message`` durably to the agent keyed ``source`` of every agent type
        subscribed to ``topic``. Returns how many types it went to (0: none subscribes)."""
        with tracing.producer("publish", topic, _traceparent, {"shoal.topic": topic}) as p:
            return await self._agents.publish(
                topic, message, source=source, sender=_sender, traceparent=p.traceparent
            )

    async def broadcast(self, agent_type: str, message: Any, *, _sender: str | None = None) -> None:
        """Hand ``message`` to every currently active agent of ``agent_type`` (ephemeral:
        agents not active now, or on a node that is away, do not get it)."""
        await self._agents.broadcast(agent_type, message, sender=_sender)

    async def agent_state(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's last saved state, or None if it has none."""
        return await self._agents.state(agent_id)

    async def delete_agent(self, agent_id: str, *, timeout: float = 30.0) -> bool:
        """Remove the agent's state, in order: after the messages sent before, by its
        owner (which also drops an active instance). Waits up to ``timeout`` for it
        (RequestTimeout if no node handled it by then: it stays queued). True if the
        agent had state."""
        return await self._agents.delete(agent_id, timeout)

    async def agents(
        self,
        agent_type: str | None = None,
        *,
        capability: str | None = None,
        active: bool | None = None,
        with_state: bool | None = None,
        limit: int = 1000,
    ) -> list[AgentInfo]:
        """The agent directory: agents active on a node and/or with saved state."""
        return await self._agents.directory(agent_type, capability, active, with_state, limit)

    async def agent(self, agent_id: str) -> AgentInfo:
        """One agent's directory entry: partition, node (if active), times, state size."""
        return await self._agents.agent(agent_id)

    def task(self, task_id: str) -> TaskHandle:
        return TaskHandle(self, protocol.validate_task_id(task_id), is_new=False)

    # --- inspecting -------------------------------------------------------------

    async def _record(self, task_id: str) -> dict[bytes, bytes]:
        protocol.validate_task_id(task_id)
        async with self.errors():
            record: dict[bytes, bytes] = await self.redis.hgetall(self.keys.task(task_id))
        if not record:
            raise TaskNotFound(
                f"no task {task_id} in namespace {self.settings.namespace!r} (never submitted "
                "here, or expired after its retention)"
            )
        return record

    async def status(self, task_id: str) -> TaskInfo:
        """A snapshot of the task; for a waiting task, ``hosted`` says whether any
        live node hosts its capability."""
        info = protocol.task_info_from_record(task_id, await self._record(task_id))
        if info.status in ("queued", "scheduled"):
            hosts = await self.hosts(info.capability)
            info = msgspec.structs.replace(info, hosted=bool(hosts))
        return info

    async def hosts(self, capability: str) -> list[str]:
        """Ids of live nodes that host ``capability``."""
        cutoff = protocol.now_ms() - DEAD_AFTER_MS
        async with self.errors():
            members = await self.redis.zrangebyscore(self.keys.hosts(capability), cutoff, "+inf")
        return [m.decode() for m in members]

    # --- results ------------------------------------------------------------------

    async def result(
        self, task_id: str, timeout: float | None = None, *, with_traceback: bool = False
    ) -> Any:
        """The task's result, waiting for it (up to ``timeout`` seconds, default forever).

        Raises TaskFailed (failed, dead or expired), TaskCancelled, ResultTimeout.
        """
        if timeout is not None and timeout < 0:
            raise ConfigurationError(f"timeout must be >= 0 seconds, got {timeout}")
        try:
            async with asyncio.timeout(timeout):
                return await self._wait_result(task_id, with_traceback)
        except TimeoutError:
            raise ResultTimeout(
                f"task {task_id} has no result after {timeout}s; it goes on (wait again, or "
                "cancel it)"
            ) from None

    async def _wait_result(self, task_id: str, with_traceback: bool) -> Any:
        arrived = self._arrived.pop(task_id, None)
        if arrived is None and task_id in self._in_flight:
            arrived = await self._wait_inbox(task_id)  # own task: no round trip needed
        if arrived is not None and arrived[0] in protocol.TERMINAL_STATUSES:
            return _inbox_outcome(task_id, arrived, with_traceback)
        while True:
            waiter = self._add_waiter(task_id)
            try:
                status, result, error, reply = await self._through_outages(
                    lambda: self._states.read(task_id)
                )
                if status is None:
                    await self._record(task_id)  # raises TaskNotFound with the message
                    raise TaskNotFound(task_id)  # (only if it appeared and vanished meanwhile)
                if status.decode() in protocol.TERMINAL_STATUSES:
                    return _outcome(task_id, status.decode(), result, error, with_traceback)
                if reply == self.inbox(self.keys.task_group(task_id)).encode():
                    arrived = await waiter
                    if arrived[0] in protocol.TERMINAL_STATUSES:
                        return _inbox_outcome(task_id, arrived, with_traceback)
                else:
                    await self._through_outages(lambda: self._wait_events_done(task_id))
            finally:
                self._remove_waiter(task_id, waiter)

    async def _through_outages(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation``, retrying with back-off while the engine is unavailable,
        for up to ``settings.engine_timeout`` seconds; then the error is raised."""
        backoff, first_failure = Backoff(), 0.0
        while True:
            try:
                return await operation()
            except EngineUnavailable as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure >= self.settings.engine_timeout:
                    raise
                delay = backoff.next_delay()
                if now - self._outage_logged > OUTAGE_LOG_EVERY_S:  # one line, not one per waiter
                    self._outage_logged = now
                    log.warning("%s; retrying for up to %.0fs", exc, self.settings.engine_timeout)
                await asyncio.sleep(delay)  # back-off while the engine is away

    async def _wait_inbox(self, task_id: str) -> tuple[str, bytes]:
        waiter = self._add_waiter(task_id)
        try:
            return await waiter
        finally:
            self._remove_waiter(task_id, waiter)

    async def _recheck_loop(self) -> None:
        """Every RECHECK_S, look at the records of the own tasks still awaited: wake
        the waiters of those that ended (or vanished) to read the outcome from the
        record. An inbox entry can be lost without an error reaching this client (a
        blocking pop answered on a connection redis-py then dropped and retried,
        seen on a Cluster), and an engine that lost its data never sends one; this
        bounds the wait to RECHECK_S either way, with one pipelined read per round."""
        while not self._closing:
            await asyncio.sleep(RECHECK_S)  # a timer, not a stand-in for an event
            waited = [t for t in list(self._waiters) if t in self._in_flight]
            if not waited:
                continue
            try:
                async with self.errors():
                    pipe = self.redis.pipeline(transaction=False)
                    for task_id in waited:
                        pipe.hget(self.keys.task(task_id), "status")
                    statuses = await pipe.execute()
            except ShoalError:
                continue  # the engine is away: the waiters re-read when it is back
            for task_id, status in zip(waited, statuses, strict=True):
                if status is None or status.decode() in protocol.TERMINAL_STATUSES:
                    self.rechecked += 1
                    self._in_flight.discard(task_id)
                    for fut in self._waiters.get(task_id, ()):
                        if not fut.done():
                            fut.set_result(("", b""))  # read the record instead

    def _add_waiter(self, task_id: str) -> asyncio.Future[tuple[str, bytes]]:
        fut: asyncio.Future[tuple[str, bytes]] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, []).append(fut)
        return fut

    def _remove_waiter(self, task_id: str, fut: asyncio.Future[tuple[str, bytes]]) -> None:
        futures = self._waiters.get(task_id)
        if futures and fut in futures:
            futures.remove(fut)
            if not futures:
                del self._waiters[task_id]

    def _ensure_reader(self, group: int) -> None:
        if self._rechecker is None or self._rechecker.done():
            self._rechecker = asyncio.create_task(self._recheck_loop(), name="shoal-recheck")
        reader = self._readers.get(group)
        if reader is None or reader.done():
            self._readers[group] = asyncio.create_task(
                self._read_inbox(self.inbox(group)), name=f"shoal-inbox-{group}"
            )

    async def _read_inbox(self, inbox: str) -> None:
        """Wake local waiters as finished task ids arrive in this client's inbox (one
        reader per key group the client submitted to: a blocking pop reads one slot).

        On an engine error every waiter is woken to re-read its record (which
        surfaces the error to it if the engine is still away), and reading resumes
        after a back-off.
        """
        delay = 0.05
        while not self._closing:
            try:
                # A bounded block: close() sets _closing, and the reader sees it
                # within a second even if a cancellation was swallowed on the way
                # (redis-py can lose one while a connection is being set up).
                popped = await self.blocking.execute_command(
                    "BLMPOP", INBOX_BLOCK_S, 1, inbox, "LEFT", "COUNT", 1000
                )
                delay = 0.05
            except redis.RedisError as exc:
                log.warning("inbox reader: %s", translate(exc, self._url))
                self._wake_all_to_recheck()
                await asyncio.sleep(delay)  # back-off before reconnecting
                delay = min(delay * 2, 2.0)
                continue
            for entry in popped[1] if popped else ():
                self._wake(entry)

    def _wake(self, entry: bytes) -> None:
        """Hand '<id> <status> <payload>' to the local waiters of that task, or keep
        it for a later ``result()`` if nobody waits yet."""
        raw_id, raw_status, payload = entry.split(b" ", 2)
        task_id, status = raw_id.decode(), raw_status.decode()
        self._in_flight.discard(task_id)  # terminal, or redriven: no longer ours to await
        waiters = [f for f in self._waiters.get(task_id, ()) if not f.done()]
        for fut in waiters:
            fut.set_result((status, payload))
        if not waiters and status in protocol.TERMINAL_STATUSES:
            self._arrived[task_id] = (status, payload)
        elif status not in protocol.TERMINAL_STATUSES:
            self._arrived.pop(task_id, None)  # e.g. redriven: an earlier outcome is stale

    def _wake_all_to_recheck(self) -> None:
        """Wake every waiter with no outcome: each re-reads its task's record."""
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(("", b""))

    async def _wait_events_done(self, task_id: str) -> None:
        """Block on the task's event stream until its terminal event appears."""
        async for event in self.events(task_id):
            if event.terminal:
                return

    # --- events -------------------------------------------------------------------

    async def events(self, task_id: str, after: str | None = None) -> AsyncIterator[Event]:
        """The task's events in order, from after event id ``after`` (default: the
        beginning), following live until the task ends. Resume with the last id seen.

        Following marks the task as followed, so its end is written as a final
        'done' event (a task nobody follows and that emitted nothing gets no stream
        until someone follows it: then its 'done' is written at once).
        """
        protocol.validate_task_id(task_id)
        key = self.keys.events(task_id)
        last = after or "0-0"
        async with self.errors():
            status = await self.scripts.follow(
                [self.keys.task(task_id)],
                [self.keys.group_prefix(self.keys.task_group(task_id)), task_id],
            )
        if not status:
            await self._record(task_id)  # raises TaskNotFound
        final = status.decode() in protocol.TERMINAL_STATUSES
        while True:
            async with self.errors():  # a finished task's events are read without blocking
                reply = await self.blocking.xread(
                    {key: last}, count=500, block=None if final else 5000
                )
            entries = reply[0][1] if reply else []
            ended_with_done = False
            for entry_id, fields in entries:
                event = protocol.event_from_entry(entry_id, fields)
                last, ended_with_done = event.id, event.terminal
                yield event
            # The end: the task is final and nothing follows (a redriven task goes on).
            if (not entries or ended_with_done) and (final := await self._is_final(task_id)):
                async with self.errors():
                    if not await self.redis.xrange(key, min=f"({last}", count=1):
                        return

    async def event_history(self, task_id: str, after: str | None = None) -> list[Event]:
        """The events recorded so far (no waiting, and the task is not marked followed)."""
        protocol.validate_task_id(task_id)
        async with self.errors():
            entries = await self.redis.xrange(
                self.keys.events(task_id), min=f"({after}" if after else "-"
            )
        if not entries:
            await self._record(task_id)  # TaskNotFound for an unknown id
        return [protocol.event_from_entry(entry_id, fields) for entry_id, fields in entries]

    async def _is_final(self, task_id: str) -> bool:
        """Whether the task is in a final state (TaskNotFound if its record expired)."""
        async with self.errors():
            status = await self.redis.hget(self.keys.task(task_id), "status")
        if status is None:
            await self._record(task_id)
        return bool(status.decode() in protocol.TERMINAL_STATUSES)

    # --- control ------------------------------------------------------------------

    async def cancel(self, task_id: str) -> str:
        """Cancel a task. Returns 'cancelled' (it had not started; it never will),
        'cancelling' (it runs: the node running it is told, and it ends 'cancelled'),
        or 'already_<status>' when it had ended before (e.g. 'already_succeeded')."""
        protocol.validate_task_id(task_id)
        group = self.keys.task_group(task_id)
        args: list[str | int] = [
            self.keys.group_prefix(group), task_id, protocol.now_ms(),
            int(self.settings.retention * 1000), self.keys.cancel_channel(group),
        ]  # fmt: skip
        async with self.errors():
            outcome: str = (await self.scripts.cancel([self.keys.delayed(group)], args)).decode()
        if outcome == "missing":
            await self._record(task_id)
        return outcome

    async def dead_letters(self, capability: str, limit: int = 100) -> list[DeadLetter]:
        """Dead tasks of ``capability``, oldest first, with their error history."""
        validate_capability(capability)
        entries = (await self._dead_entries(capability, limit))[:limit]
        async with self.errors():
            pipe = self.redis.pipeline(transaction=False)
            for _, fields in entries:
                pipe.hgetall(self.keys.task(fields[b"id"].decode()))
            records = await pipe.execute()
        letters = []
        for (entry_id, fields), record in zip(entries, records, strict=True):
            if record:
                info = protocol.task_info_from_record(fields[b"id"].decode(), record)
                letters.append(DeadLetter(entry_id.decode(), info))
        return letters

    async def redrive(self, capability: str, task_ids: Iterable[str] | None = None) -> list[str]:
        """Queue dead tasks again with fresh attempts: the given ids, or all of them."""
        validate_capability(capability)
        wanted = None if task_ids is None else {protocol.validate_task_id(t) for t in task_ids}
        pairs: dict[int, list[str]] = {}  # group -> (entry id, task id) pairs
        found: set[str] = set()
        for entry_id, fields in await self._dead_entries(capability, None):
            tid = fields[b"id"].decode()
            if wanted is None or tid in wanted:
                pairs.setdefault(self.keys.task_group(tid), []).extend([entry_id.decode(), tid])
                found.add(tid)
        if wanted is not None and (missing := wanted - found):
            raise TaskNotFound(
                f"not in the dead-letter queue of {capability!r}: {', '.join(sorted(missing))}"
            )
        redriven: list[str] = []
        for group, group_pairs in sorted(pairs.items()):
            args: list[str | int] = [self.keys.group_prefix(group), protocol.now_ms(), *group_pairs]
            async with self.errors():
                done = await self.scripts.redrive([self.keys.dlq(capability, group)], args)
            redriven += [d.decode() for d in done]
        for task_id in redriven:  # an outcome this client kept is no longer the answer
            self._arrived.pop(task_id, None)
        return redriven

    async def _dead_entries(
        self, capability: str, limit: int | None
    ) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """The dead-letter entries of every key group, oldest first (entry ids are
        times, so the groups' streams merge by id)."""
        async with self.errors():
            pipe = self.redis.pipeline(transaction=False)
            for group in range(self.keys.groups):
                pipe.xrange(self.keys.dlq(capability, group), count=limit)
            streams = await pipe.execute()
        entries = [entry for stream in streams for entry in stream]
        entries.sort(key=lambda e: tuple(int(x) for x in e[0].split(b"-")))
        return entries

    async def list_tasks(
        self,
        *,
        capability: str | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks newest first (those created within the retention period), optionally
        of one capability and/or in one status; pass a page's ``next`` as ``cursor``
        for the following page."""
        return await list_tasks(
            self, capability=capability, status=status, limit=limit, cursor=cursor
        )

    async def cluster(self) -> ClusterState:
        """Nodes (alive, suspect, dead; load; capabilities; heartbeat age) and queues
        (depth, waiting, pending, oldest entry age, consumers, dead letters)."""
        return await read_cluster(self)

    async def wait_for_hosts(
        self, capability: str, count: int = 1, timeout: float = 30.0
    ) -> list[str]:
        """Wait until at least ``count`` live nodes host ``capability`` (for scripts and
        tests that start node processes and then submit). Nodes announce themselves
        by heartbeat, so this looks at the host set with a short, growing interval."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while len(hosts := await self.hosts(capability)) < count:
            if time.monotonic() > deadline:
                raise NotHosted(
                    f"{len(hosts)} of {count} node(s) host {capability!r} after {timeout}s"
                )
            await asyncio.sleep(delay)  # nodes register from other processes: look again
            delay = min(delay * 2, 0.2)
        return hosts


def _attrs(capability: str, agent: str | None) -> dict[str, str]:
    """The attributes of a submit span."""
    return {"shoal.capability": capability, **({"shoal.agent_id": agent} if agent else {})}


def _type_of(agent_id: str) -> str:
    """Span names take the agent type, not the id: names must stay few."""
    return agent_id.partition("/")[0]


MIN_REDIS = (7, 0)  # BLMPOP, XAUTOCLAIM, Lua with XREADGROUP: Redis >= 7.0 / Valkey >= 7.2


def _check_engine_version(info: dict[str, Any], url: str) -> None:
    """Refuse an engine too old for the commands Shoal uses, with a clear message."""
    raw = str(info.get("redis_version", "0"))
    try:
        version = tuple(int(part) for part in raw.split(".")[:2])
    except ValueError:
        return  # an unusual server string: let the commands speak for themselves
    if version < MIN_REDIS:
        raise EngineUnavailable(
            f"the engine at {mask_url(url)} runs Redis {raw}; Shoal needs Redis >= 7.0 or "
            "Valkey >= 7.2"
        )


def _inbox_outcome(task_id: str, arrived: tuple[str, bytes], with_traceback: bool) -> Any:
    status, payload = arrived
    ok = status == "succeeded"
    return _outcome(
        task_id, status, payload if ok else None, None if ok else payload, with_traceback
    )


def _outcome(
    task_id: str, status: str, result: bytes | None, error: bytes | None, with_traceback: bool
) -> Any:
    if status == "succeeded":
        return protocol.decode(result) if result else None
    if status == "cancelled":
        raise TaskCancelled(task_id)
    info = msgspec.msgpack.decode(error, type=ErrorInfo) if error else None
    exc = TaskFailed(
        task_id,
        status,
        info.type if info else "Unknown",
        info.message if info else "no error was recorded",
        info.traceback if info else None,
    )
    if with_traceback and exc.remote_traceback:
        exc.add_note("remote traceback:\n" + exc.remote_traceback)
    raise exc


class _StateReader:
    """Coalesces concurrent reads of task outcomes into one pipelined round trip.

    Awaiting 20,000 handles at once would otherwise be 20,000 separate HMGETs; here
    every read requested in the same event-loop turn shares one pipeline.
    """

    FIELDS = ("status", "result", "error", "reply")

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pending: list[tuple[str, asyncio.Future[list[bytes | None]]]] = []

    async def read(self, task_id: str) -> list[bytes | None]:
        fut: asyncio.Future[list[bytes | None]] = asyncio.get_running_loop().create_future()
        self._pending.append((task_id, fut))
        if len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._run(batch))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _run(self, batch: list[tuple[str, asyncio.Future[list[bytes | None]]]]) -> None:
        client = self._client
        try:
            async with client.errors():
                pipe = client.redis.pipeline(transaction=False)
                for task_id, _ in batch:
                    pipe.hmget(client.keys.task(task_id), *self.FIELDS)
                rows = await pipe.execute()
        except BaseException as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), row in zip(batch, rows, strict=True):
            if not fut.done():
                fut.set_result(row)
