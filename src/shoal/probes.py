"""Active health probes of registered service instances, by one elected prober per
service.

A service opts in with ``await configure_probe(client, "llm", Probe(path="/health"))``
(or ``shoal services probe``). Every node runs a ``Prober``; for each probed service
the probers run for leadership of ``prober:<service>`` (shoal.coordination.leader)
and only the leader probes, so a replica sees one probe per interval however many nodes
there are. The holder GETs each instance's ``url + path`` every ``interval``; an
answer of 2xx/3xx within ``timeout`` is a success. ``fall`` failures in a row mark
the instance *down* (out of every caller's rotation, announced to all views),
``rise`` successes in a row bring it back. When the leader dies its lock lapses
after ``LEASE_INTERVALS`` intervals (at least 1 s) and another prober takes over;
a prober that stops resigns, and another takes over at once.

Passive health (the error rate of real calls) is the other half: it needs no
prober — see ``BreakerPolicy.degraded_rate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from shoal.coordination.leader import Leadership
from shoal.errors import ConfigurationError, ShoalError
from shoal.registry import Registry, validate_service_name

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.probes")

LEASE_INTERVALS = 3  # a prober's leadership ttl: this many probe intervals (min 1 s)
SCAN_S = 2.0  # how often a prober looks for services newly configured for probing


class Probe(msgspec.Struct, frozen=True):
    """How to probe a service's instances (stored in the engine, per service)."""

    path: str = "/health"
    interval: float = 1.0
    timeout: float = 0.5
    fall: int = 3
    rise: int = 2

    def __post_init__(self) -> None:
        # msgspec does not check a Struct's field types when it is built in Python,
        # and a float fall would be stored and then refused by every prober's
        # strict decode: so the types are checked here, with a clear message
        if not isinstance(self.path, str):
            raise ConfigurationError(f"probe path must be a string, got {self.path!r:.80}")
        for name in ("interval", "timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"probe {name} must be a number of seconds, got {value!r}")
        for name in ("fall", "rise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigurationError(f"probe {name} must be a whole number, got {value!r}")
        if not self.path.startswith("/") or len(self.path) > 512:
            raise ConfigurationError(f"probe path must start with '/', got {self.path!r:.80}")
        if not 0.05 <= self.interval <= 3600:
            raise ConfigurationError(f"probe interval must be 0.05..3600 s, got {self.interval}")
        if not 0 < self.timeout <= self.interval:
            raise ConfigurationError(
                f"probe timeout must be > 0 and at most the interval ({self.interval}s), "
                f"got {self.timeout}"
            )
        for name, value in (("fall", self.fall), ("rise", self.rise)):
            if not 1 <= value <= 100:
                raise ConfigurationError(f"probe {name} must be 1..100, got {value}")


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Probe).decode


async def configure_probe(client: Client, service: str, probe: Probe | None) -> None:
    """Probe ``service``'s instances as ``probe`` says (None: stop probing it)."""
    validate_service_name(service)
    if probe is not None and not isinstance(probe, Probe):
        raise ConfigurationError(f"give a shoal.probes.Probe or None, got {probe!r:.80}")
    async with client.errors():
        if probe is None:
            await client.redis.hdel(client.keys.service_probes, service)
        else:
            await client.redis.hset(client.keys.service_probes, service, _encode(probe))
    if probe is None:  # the last verdicts would otherwise stay (a 'down' for good)
        await Registry(client)._run("unprobe", service)


async def probe_configs(client: Client) -> dict[str, Probe]:
    """Every probed service's probe settings."""
    async with client.errors():
        raw = await client.redis.hgetall(client.keys.service_probes)
    configs = {}
    for name, value in raw.items():
        try:
            configs[name.decode()] = _decode(value)
        except (msgspec.DecodeError, ConfigurationError):
            log.warning("service %s: unreadable probe settings ignored", name.decode())
    return configs


@dataclass
class _Probing:
    probe: Probe
    task: asyncio.Task[None]


class Prober:
    """Probes the instances of every probed service whose lease it wins. One per
    node; ``prober_id`` (the node id) names it in the lease and in the probes'
    User-Agent header."""

    def __init__(self, client: Client, prober_id: str, scan: float = SCAN_S) -> None:
        self._client = client
        self._registry = Registry(client)
        self.prober_id = prober_id
        self._scan = scan
        self._probing: dict[str, _Probing] = {}
        self._http: httpx.AsyncClient | None = None
        self.leading: set[str] = set()

    async def run(self, closing: asyncio.Event) -> None:
        """Probe until ``closing`` is set; resign every lease held on the way out."""
        self._http = httpx.AsyncClient(headers={"user-agent": f"shoal-prober/{self.prober_id}"})
        try:
            while not closing.is_set():
                try:
                    self._follow(await probe_configs(self._client), closing)
                except ShoalError as exc:
                    log.debug("prober: cannot read probe settings: %s", exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._scan):
                        await closing.wait()
        finally:
            for probing in self._probing.values():
                probing.task.cancel()
            tasks = [p.task for p in self._probing.values()]
            if tasks:
                await asyncio.wait(tasks, timeout=2)
            self._probing.clear()  # each probing task resigned its leadership on the way out
            self.leading.clear()
            await self._http.aclose()

    def _follow(self, configs: dict[str, Probe], closing: asyncio.Event) -> None:
        """Start probing new services, restart changed ones, stop removed ones."""
        for service in list(self._probing):
            if configs.get(service) != self._probing[service].probe:
                self._probing.pop(service).task.cancel()
        for service, probe in configs.items():
            if service not in self._probing:
                task = asyncio.create_task(
                    self._probe_service(service, probe, closing), name=f"shoal-probe-{service}"
                )
                self._probing[service] = _Probing(probe, task)

    async def _probe_service(self, service: str, probe: Probe, closing: asyncio.Event) -> None:
        leadership = Leadership(
            self._client,
            f"prober:{service}",
            ttl=max(1.0, probe.interval * LEASE_INTERVALS),
            holder=self.prober_id,
            on_elected=lambda _token: self._elected(service),
            on_lost=lambda _token: self.leading.discard(service),
        )
        async with leadership:  # leaving it (stopped, or settings changed) resigns
            try:
                await self._probe_while_leading(service, probe, leadership, closing)
            finally:
                self.leading.discard(service)

    def _elected(self, service: str) -> None:
        log.info("prober %s: probing %s", self.prober_id, service)
        self.leading.add(service)

    async def _probe_while_leading(
        self, service: str, probe: Probe, leadership: Leadership, closing: asyncio.Event
    ) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not closing.is_set():
            if not leadership.is_leader:
                with contextlib.suppress(TimeoutError):  # elected, or told to stop
                    async with asyncio.timeout(probe.interval):
                        await _first(leadership.elected.wait(), closing.wait())
                due = loop.time()
                continue
            try:
                await self._probe_all(service, probe)
            except ShoalError as exc:
                log.debug("prober: %s: %s", service, exc)
            except Exception:  # a prober bug must not take its node down
                log.exception("prober: probing %s failed", service)
            # a fixed cadence: a round that took a while does not stretch the period
            # (so `fall` failures take fall x interval, as documented)
            due = max(due + probe.interval, loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(due):
                    await closing.wait()

    async def _probe_all(self, service: str, probe: Probe) -> None:
        instances = await self._registry.instances(service)
        results = await asyncio.gather(*(self._probe_one(s.url, probe) for s in instances))
        for state, ok in zip(instances, results, strict=True):
            verdict = await self._registry._run(
                "probe", service, state.id, "1" if ok else "0", probe.fall, probe.rise
            )
            if verdict and verdict.decode() != (state.health.p or ""):
                log.warning("service %s: instance %s is %s (probe %s)", service, state.id,
                            verdict.decode(), "ok" if ok else "failed")  # fmt: skip

    async def _probe_one(self, url: str, probe: Probe) -> bool:
        assert self._http is not None
        try:
            response = await self._http.get(url + probe.path, timeout=probe.timeout)
        except (httpx.HTTPError, OSError):
            return False
        return 200 <= response.status_code < 400


def describe_probe(probe: Probe) -> dict[str, Any]:
    return msgspec.to_builtins(probe)  # type: ignore[no-any-return]


async def _first(*waits: Any) -> None:
    """Wait until the first of ``waits`` (coroutines) finishes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
