"""The service registry: which instances of each external service exist, where, and
how healthy each is — kept in the engine, so every process sees the same.

A *service* is anything agents call over the network (a model server, a vector
store, a tool API); an *instance* is one replica of it, with a URL, a zone, a
weight, metadata and a status (``starting | up | degraded | draining | down``).

* **Registration with a TTL.** ``registry.register(...)`` stores an instance that
  lives ``ttl`` seconds unless heartbeated; ``async with registry.registration(...)``
  heartbeats for you (every ttl/3) and deregisters on exit. An instance that stops
  heartbeating — its process died — disappears once its TTL has passed. A *static*
  instance (``ttl=None``) lives until deregistered: for external APIs that cannot
  heartbeat.
* **Health.** Each instance also has a shared health record (``services.lua``):
  the verdict of the active prober (``shoal.probes``), its circuit breaker, and the
  passive verdict from real call outcomes (error rate over a sliding window, which
  marks it degraded). Callers of every process feed and read the same record.
* **A watched local view.** ``await registry.watch("llm")`` returns a
  ``ServiceView`` kept current in memory: every change is announced on one shard
  channel, and views are re-read every half second besides (that notices TTL
  expiries and survives a lost message). A caller picks a replica from its view
  with no network call; changes reach it well within a second.

All keys live under the namespace's control hash tag (see shoal.keys), so the
script that changes them runs on a Cluster as on one server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from shoal.balancing import Replica
from shoal.channels import follow
from shoal.errors import ConfigurationError, ShoalError

if TYPE_CHECKING:  # the client owns the registry's watcher: no import cycle
    from shoal.client import Client

log = logging.getLogger("shoal.registry")

REFRESH_S = 0.5  # every view is re-read this often besides the change announcements
DEFAULT_TTL_S = 10.0
MIN_TTL_S, MAX_TTL_S = 1.0, 86_400.0
MAX_WEIGHT = 1000.0
MAX_METADATA = 32

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
_ID_RE = re.compile(r"[A-Za-z0-9_\[][A-Za-z0-9_.:@\[\]-]{0,127}")
_ZONE_RE = re.compile(r"[A-Za-z0-9_.-]{0,64}")


class Status(StrEnum):
    """An instance's status. ``starting``, ``draining`` and ``down`` take it out
    of rotation; ``degraded`` keeps it as a last resort (used only when no ``up``
    instance is left)."""

    STARTING = "starting"
    UP = "up"
    DEGRADED = "degraded"
    DRAINING = "draining"
    DOWN = "down"


class UnknownService(ShoalError, LookupError):
    """No instance of that service is registered."""


class Instance(msgspec.Struct, frozen=True, omit_defaults=True):
    """One registered instance of a service, as stored in the engine."""

    service: str
    id: str
    url: str
    zone: str = ""
    weight: float = 1.0
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    status: str = Status.UP
    ttl: float | None = DEFAULT_TTL_S  # None: static, never expires


class Health(msgspec.Struct, frozen=True):
    """An instance's shared health record (services.lua writes it; short names)."""

    b: str = "closed"  # breaker: closed | open | half_open
    o: int = 0  # when the breaker opened (engine ms)
    h: int = 0  # when it went half-open
    t: int = 0  # trial calls handed out while half-open
    w: int = 0  # the current window's start
    c: int = 0  # calls in the current window
    f: int = 0  # failures in it
    pc: int = 0  # calls in the previous window
    pf: int = 0  # failures in it
    k: int = 0  # consecutive failures
    d: int = 0  # 1: passive health says degraded
    wl: int = 0  # the window's length (ms) the last outcome was counted with
    p: str = ""  # probe verdict: up | down | "" (never probed)
    pk: int = 0  # probe streak: +successes / -failures in a row

    @property
    def breaker(self) -> str:
        return self.b

    @property
    def probe(self) -> str:
        return self.p


_FRESH = Health()
_encode = msgspec.msgpack.Encoder().encode
_decode_instance = msgspec.msgpack.Decoder(Instance).decode
_decode_health = msgspec.json.Decoder(Health).decode


def decode_health(raw: bytes | str | None) -> Health:
    return _decode_health(raw) if raw else _FRESH


@dataclass(frozen=True)
class InstanceState:
    """An instance with its health, as a view shows it."""

    instance: Instance
    health: Health
    expires_at: float | None  # engine ms; None for a static instance
    replica: Replica

    @property
    def id(self) -> str:
        return self.instance.id

    @property
    def url(self) -> str:
        return self.instance.url

    @property
    def status(self) -> str:
        """The effective status: the instance's own, worsened by health — a probe
        that says down makes it down, passive health makes an up one degraded."""
        own = self.instance.status
        if own == Status.DOWN or self.health.p == "down":
            return Status.DOWN
        if own == Status.UP and self.health.d:
            return Status.DEGRADED
        return own

    @property
    def breaker(self) -> str:
        return self.health.b

    @property
    def in_rotation(self) -> bool:
        """Up or degraded: a candidate for calls (its breaker decides the rest)."""
        return self.status in (Status.UP, Status.DEGRADED)

    def matches(
        self,
        zone: str | None = None,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        if zone is not None and self.instance.zone != zone:
            return False
        if status is not None and self.status != status:
            return False
        if metadata:
            own = self.instance.metadata
            return all(own.get(k) == v for k, v in metadata.items())
        return True

    def describe(self) -> dict[str, Any]:
        """Plain data for the CLI, HTTP API and dashboard."""
        i, h = self.instance, self.health
        return {
            "service": i.service, "id": i.id, "url": i.url, "zone": i.zone,
            "weight": i.weight, "metadata": dict(i.metadata), "status": self.status,
            "reported_status": i.status, "static": i.ttl is None, "ttl": i.ttl,
            "expires_at_ms": self.expires_at, "breaker": h.b, "probe": h.p or None,
            "window_calls": h.c + h.pc, "window_failures": h.f + h.pf,
            "consecutive_failures": h.k,
        }  # fmt: skip


# --- validation ------------------------------------------------------------------


def validate_service_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"service name {name!r:.80} is invalid: start with a letter or '_', then up to "
            "127 letters, digits, '_', '.' or '-'"
        )
    return name


def validate_instance_id(instance_id: Any) -> str:
    if not isinstance(instance_id, str) or not _ID_RE.fullmatch(instance_id):
        raise ConfigurationError(
            f"instance id {instance_id!r:.80} is invalid: up to 128 letters, digits, "
            "'_', '.', ':', '@', '-', '[' or ']', not starting with a punctuation mark "
            "other than '[' (as in [::1]:8000)"
        )
    return instance_id


def validate_url(url: Any) -> str:
    if not isinstance(url, str) or len(url) > 2048:
        raise ConfigurationError(f"an instance URL must be a string, got {url!r:.80}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"instance URL {url!r:.80} is invalid: give http(s)://host[:port][/base-path]"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigurationError(
            "an instance URL must not carry credentials (every caller and `shoal services "
            "list` would see them): give them to the pool's httpx client (http=) instead"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(
            f"instance URL {url!r:.80}: no query or fragment — a request's path is joined "
            "to the URL"
        )
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"instance URL {url!r:.80}: {exc}") from None
    return url.rstrip("/")


def validate_status(status: Any) -> str:
    if status not in Status.__members__.values():
        allowed = ", ".join(s.value for s in Status)
        raise ConfigurationError(f"status {status!r:.40} is invalid: use one of {allowed}")
    return str(status)


def _validate_ttl(ttl: Any) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise ConfigurationError(f"ttl must be a number of seconds or None, got {ttl!r}")
    if not MIN_TTL_S <= ttl <= MAX_TTL_S:
        raise ConfigurationError(
            f"ttl must be within {MIN_TTL_S:g}..{MAX_TTL_S:g} seconds (None: a static "
            f"instance that never expires), got {ttl!r}"
        )
    return float(ttl)


def _validate_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > MAX_METADATA:
        raise ConfigurationError(
            f"metadata must be a mapping of at most {MAX_METADATA} string keys and values"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or not 0 < len(key) <= 64:
            raise ConfigurationError(
                f"metadata {key!r:.40}={value!r:.40}: keys (1-64 characters) and values "
                "must be strings"
            )
        if len(value) > 256:
            raise ConfigurationError(f"metadata {key!r}: values are at most 256 characters")
    return dict(metadata)


def make_instance(
    service: str,
    url: str,
    *,
    id: str | None = None,
    zone: str = "",
    weight: float = 1.0,
    metadata: Mapping[str, str] | None = None,
    status: str = Status.UP,
    ttl: float | None = DEFAULT_TTL_S,
) -> Instance:
    """A validated Instance; ``id`` defaults to ``host:port`` of the URL."""
    url = validate_url(url)
    if id is None:
        parts = urlsplit(url)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        id = f"{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
    if not isinstance(zone, str) or not _ZONE_RE.fullmatch(zone):
        raise ConfigurationError(
            f"zone {zone!r:.80} is invalid: up to 64 letters, digits, '_', '.' or '-'"
        )
    if (
        isinstance(weight, bool)
        or not isinstance(weight, int | float)
        or not 0 < weight <= MAX_WEIGHT
    ):
        raise ConfigurationError(f"weight must be a number in (0, {MAX_WEIGHT:g}], got {weight!r}")
    validate_status(status)
    return Instance(
        service=validate_service_name(service), id=validate_instance_id(id), url=url,
        zone=zone, weight=float(weight), metadata=_validate_metadata(metadata),
        status=str(status), ttl=_validate_ttl(ttl),
    )  # fmt: skip


# --- the registry ----------------------------------------------------------------


def _ttl_ms(instance: Instance) -> int:
    return 0 if instance.ttl is None else int(instance.ttl * 1000)


def _pairs(flat: list[Any]) -> list[tuple[Any, Any]]:
    return list(zip(flat[::2], flat[1::2], strict=True))


def parse_read(service: str, reply: list[Any]) -> tuple[int, list[InstanceState]]:
    """The engine time and the instances of one ``read`` of services.lua."""
    now, records, healths, expiries = reply
    health = {k.decode(): v for k, v in _pairs(healths)}
    expiry = {k.decode(): float(v) for k, v in _pairs(expiries)}
    states = []
    for key, raw in _pairs(records):
        instance_id = key.decode()
        try:
            instance = _decode_instance(raw)
        except msgspec.DecodeError:
            log.warning("service %s: instance %s has an unreadable record", service, instance_id)
            continue
        replica = Replica(instance.id, instance.weight, instance.zone)
        h = decode_health(health.get(instance_id))
        states.append(InstanceState(instance, h, expiry.get(instance_id), replica))
    states.sort(key=lambda s: s.id)
    return int(now), states


class Registry:
    """Register, discover and watch service instances, through one Client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def _run(self, op: str, service: str, *args: Any) -> Any:
        client = self._client
        keys = client.keys
        async with client.errors():
            return await client.scripts.services(
                [keys.service(service)], [keys.prefix, op, service, *args]
            )

    async def register(
        self,
        service: str,
        url: str,
        *,
        id: str | None = None,
        zone: str = "",
        weight: float = 1.0,
        metadata: Mapping[str, str] | None = None,
        status: str = Status.UP,
        ttl: float | None = DEFAULT_TTL_S,
    ) -> Instance:
        """Register (or update) an instance. It expires ``ttl`` seconds after the last
        heartbeat; ``ttl=None`` registers a static instance."""
        instance = make_instance(
            service, url, id=id, zone=zone, weight=weight, metadata=metadata,
            status=status, ttl=ttl,
        )  # fmt: skip
        await self.put(instance)
        return instance

    async def put(self, instance: Instance, *, mode: str = "create") -> bool:
        """Store ``instance`` and restart its TTL (``mode="create"``); ``"update"``
        stores it only if it is still registered; ``"beat"`` only restarts the TTL
        of a registered instance, leaving its stored record alone. False when the
        instance is not registered and the mode does not create it."""
        if mode not in ("create", "update", "beat"):
            raise ConfigurationError(f"put mode must be create, update or beat, got {mode!r}")
        done = await self._run(
            "put", instance.service, instance.id, _encode(instance), _ttl_ms(instance), mode
        )
        return bool(done)

    async def heartbeat(self, instance: Instance) -> bool:
        """Restart the instance's TTL; False if it is no longer registered (expired
        or deregistered: register it again). Changes nothing else — a status set
        meanwhile (``set_status``, the CLI, the HTTP API) stays."""
        return await self.put(instance, mode="beat")

    async def set_status(self, service: str, instance_id: str, status: str) -> Instance:
        """Change a registered instance's status (e.g. ``draining`` before it stops).
        UnknownService if it is not registered (never registers it again)."""
        current = await self.instance(service, instance_id)
        changed = make_instance(
            service, current.url, id=current.id, zone=current.zone, weight=current.weight,
            metadata=current.metadata, status=status, ttl=current.ttl,
        )  # fmt: skip
        if not await self.put(changed, mode="update"):
            raise UnknownService(f"service {service!r} has no instance {instance_id!r}")
        return changed

    async def deregister(self, service: str, instance_id: str) -> bool:
        """Remove an instance; False if it was not registered."""
        validate_service_name(service)
        validate_instance_id(instance_id)
        return bool(await self._run("deregister", service, instance_id))

    async def instances(
        self,
        service: str,
        *,
        zone: str | None = None,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[InstanceState]:
        """The service's instances (one engine round trip), filtered by zone, effective
        status and metadata (every given key must match)."""
        if status is not None:
            validate_status(status)
        _, states = await self.read(service)
        return [s for s in states if s.matches(zone, status, metadata)]

    async def read(self, service: str) -> tuple[int, list[InstanceState]]:
        """The engine's clock (ms) and the service's instances, from one round trip:
        for showing how long until each expires without trusting the local clock."""
        validate_service_name(service)
        return parse_read(service, await self._run("read", service))

    async def instance(self, service: str, instance_id: str) -> Instance:
        for state in await self.instances(service):
            if state.id == instance_id:
                return state.instance
        raise UnknownService(f"service {service!r} has no instance {instance_id!r}")

    async def services(self) -> list[str]:
        """The names of the services with at least one live instance (each is read,
        which drops expired instances first: a service whose instances all expired
        is not listed)."""
        client = self._client
        async with client.errors():
            names = sorted(n.decode() for n in await client.redis.smembers(client.keys.services))
        return [name for name in names if (await self.read(name))[1]]

    @contextlib.asynccontextmanager
    async def registration(
        self,
        service: str,
        url: str,
        *,
        id: str | None = None,
        zone: str = "",
        weight: float = 1.0,
        metadata: Mapping[str, str] | None = None,
        ttl: float = DEFAULT_TTL_S,
    ) -> AsyncIterator[Instance]:
        """Keep an instance registered while the block runs: heartbeats every ttl/3
        (re-registering it if it expired meanwhile, e.g. after an engine outage),
        and deregistered on exit."""
        if ttl is None:
            raise ConfigurationError("a registration heartbeats: give a ttl (seconds)")
        instance = await self.register(
            service, url, id=id, zone=zone, weight=weight, metadata=metadata, ttl=ttl
        )
        beating = asyncio.create_task(self._heartbeat_loop(instance))
        try:
            yield instance
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            with contextlib.suppress(ShoalError):
                await self.deregister(service, instance.id)

    async def _heartbeat_loop(self, instance: Instance) -> None:
        assert instance.ttl is not None
        interval = instance.ttl / 3
        while True:
            await asyncio.sleep(interval)  # the heartbeat's period, not a wait for work
            try:
                if not await self.heartbeat(instance):
                    log.warning("service %s: %s had expired; registering it again",
                                instance.service, instance.id)  # fmt: skip
                    await self.put(instance, mode="create")
            except ShoalError as exc:  # the engine is away or busy: beat again later
                log.warning("service %s: heartbeat of %s failed: %s",
                            instance.service, instance.id, exc)  # fmt: skip

    async def watch(self, service: str) -> ServiceView:
        """A local view of ``service`` kept current (see ServiceView); shared by
        every caller of this client that watches the same service."""
        return await self._client.service_watcher.view(validate_service_name(service))


# --- the watched view -------------------------------------------------------------


class ServiceView:
    """One process's current picture of a service: its instances with their health.

    ``instances`` is replaced (never mutated) on every change, and ``version``
    grows, so a caller may cache what it derives from one version (the pool
    caches its candidate list). ``changed()`` waits for the next change."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.instances: list[InstanceState] = []
        self.by_id: dict[str, InstanceState] = {}
        self.version = 0
        self.engine_offset_ms = 0.0  # engine clock - local clock, from the last read
        self.refreshed_at = 0.0
        self._last_read_ms = 0
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[ServiceView], None]] = []

    def filter(
        self,
        zone: str | None = None,
        status: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> list[InstanceState]:
        return [s for s in self.instances if s.matches(zone, status, metadata)]

    def engine_now_ms(self) -> float:
        """The engine's clock as this process estimates it (for breaker timeouts)."""
        return time.time() * 1000 + self.engine_offset_ms

    def on_change(self, listener: Callable[[ServiceView], None]) -> None:
        self._listeners.append(listener)

    async def changed(self, timeout: float | None = None) -> bool:
        """Wait for the next change; False if none came within ``timeout``."""
        self._changed.clear()
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def update(self, engine_now: int, states: list[InstanceState]) -> bool:
        """Take a fresh read; True (and listeners told) if anything a caller sees
        changed."""
        if engine_now < self._last_read_ms:
            return False  # a read overtaken by a newer one (the listener's and the poll's)
        self._last_read_ms = engine_now
        self.engine_offset_ms = engine_now - time.time() * 1000
        self.refreshed_at = time.monotonic()
        if _same(self.instances, states):
            return False
        self._replace(states)
        return True

    def apply_health(self, instance_id: str, health: Health) -> None:
        """A health record this process just got back from the engine (after an
        outcome or a trial): applied at once, before the announcement comes round."""
        current = self.by_id.get(instance_id)
        if current is None or current.health == health:
            return
        visible = (current.health.b, current.health.d, current.health.p)
        updated = InstanceState(current.instance, health, current.expires_at, current.replica)
        states = [updated if s.id == instance_id else s for s in self.instances]
        if visible == (health.b, health.d, health.p):
            self.instances = states  # counters only: no new version
            self.by_id[instance_id] = updated
            return
        self._replace(states)

    def _replace(self, states: list[InstanceState]) -> None:
        self.instances = states
        self.by_id = {s.id: s for s in states}
        self.version += 1
        self._changed.set()
        for listener in self._listeners:
            try:
                listener(self)
            except Exception:
                log.exception("service %s: a view listener failed", self.service)


def _same(old: list[InstanceState], new: list[InstanceState]) -> bool:
    """Equal in what callers see: members, records, breaker/probe/degraded states."""
    if len(old) != len(new):
        return False
    for a, b in zip(old, new, strict=True):
        if a.instance != b.instance:
            return False
        if (a.health.b, a.health.d, a.health.p) != (b.health.b, b.health.d, b.health.p):
            return False
    return True


class Watcher:
    """Keeps the watched views of one client current: one subscription to the
    change channel for all of them, and a re-read of each every ``refresh``
    seconds (that is how TTL expiries are noticed — the read drops expired
    instances and announces it — and how a lost announcement is made up for)."""

    def __init__(self, client: Client, refresh: float = REFRESH_S) -> None:
        self._client = client
        self._registry = Registry(client)
        self.refresh = refresh
        self._views: dict[str, ServiceView] = {}
        self._ready: dict[str, asyncio.Task[ServiceView]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.process_id = f"{socket.gethostname()}:{client.client_id}"

    async def view(self, service: str) -> ServiceView:
        """The service's view, read once before it is handed out; concurrent first
        calls share that read (and the view)."""
        ready = self._ready.get(service)
        if ready is None or (ready.done() and ready.exception() is not None):
            ready = self._ready[service] = asyncio.create_task(self._first_read(service))
        return await asyncio.shield(ready)

    async def _first_read(self, service: str) -> ServiceView:
        view = ServiceView(service)
        await self._read(view)
        self._views[service] = view
        self._start()
        return view

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="shoal-services-listen"),
                asyncio.create_task(self._poll(), name="shoal-services-poll"),
            ]

    async def _read(self, view: ServiceView) -> None:
        reply = await self._registry._run("read", view.service)
        now, states = parse_read(view.service, reply)
        view.update(now, states)

    async def refresh_view(self, service: str) -> None:
        view = self._views.get(service)
        if view is not None:
            await self._read(view)

    async def _poll(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh)  # the re-read's period
            for view in list(self._views.values()):
                try:
                    await self._read(view)
                except ShoalError as exc:
                    log.debug("service %s: refresh failed: %s", view.service, exc)
                except Exception:  # a bug must not stop every view's refreshing
                    log.exception("service %s: refresh failed", view.service)

    async def _listen(self) -> None:
        async def catch_up() -> None:
            for view in list(self._views.values()):
                await self._read(view)

        await follow(
            self._client.blocking, self._client.keys.services_channel,
            on_subscribed=catch_up, on_message=lambda data: self.refresh_view(data.decode()),
            wait=self.refresh, stopped=lambda: self._closing, what="services",
        )  # fmt: skip

    async def close(self) -> None:
        # The flag as well as cancel(): redis-py's pub/sub read can swallow a
        # cancellation (see node._cancel_listener), so the loops also look at it.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2 * self.refresh + 1)
        self._tasks = []
        self._views.clear()
        self._ready.clear()
