"""One call site for other services: pick an instance well, call it with a timeout,
retry elsewhere, stop hammering a broken one, and say clearly when nothing can.

    llm = client.services("llm", strategy="consistent_hash")   # self.ctx.services in agents
    response = await llm.request("POST", "/v1/chat/completions", json=body, key=conversation)

    async with llm.pick(key=conversation) as endpoint:          # any protocol
        ...  # call endpoint.url; an exception marks the call failed

A ``ServicePool`` (one per service and client, made on first use) combines:

* the registry's **watched view** of the service (``shoal.registry``), so a pick is
  local: a few microseconds, no network call;
* a **balancing strategy** (``shoal.balancing``) over the instances in rotation —
  ``up`` ones first, ``degraded`` ones only when no ``up`` one is left;
* the instance's **circuit breaker**, whose state is shared through the engine:
  an open breaker takes the instance out of every process's rotation; after the
  recovery time a limited number of trial calls (handed out atomically by the
  engine) decide whether it closes;
* **calls in flight shared** across processes (least-outstanding and
  power-of-two see the cluster's load, not one process's);
* a **bulkhead**, **per-attempt timeouts** and a **retry policy** (tenacity) that
  honours ``Retry-After`` and tries another instance each time.

Call outcomes reach the engine in the background, batched (a success waits up to
``OUTCOME_FLUSH_S``, a failure goes at once): a call never waits for bookkeeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Collection, Sequence
from typing import TYPE_CHECKING, Any

import httpx
import msgspec

from shoal.balancing import Load, Replica, Strategy, make_strategy
from shoal.coordination.config import BREAKER_FIELDS, ConfigView
from shoal.errors import ConfigurationError, ShoalError
from shoal.observability import metrics
from shoal.registry import InstanceState, ServiceView, Status, decode_health
from shoal.resilience import (
    BreakerPolicy,
    Bulkhead,
    BulkheadFull,
    CircuitOpen,
    Fallback,
    NoInstance,
    RetryableStatus,
    RetryPolicy,
    ServiceCallFailed,
    Step,
)

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.services")

NOT_COUNTED = ("cancelled", "caller_error")  # outcomes that say nothing of the instance
OUTCOME_FLUSH_S = 0.1  # successes are batched this long; failures and trials go at once
LOAD_SHARE_S = 0.25  # calls in flight are published and read this often
LOAD_STALE_S = 3.0  # another process's counts older than this are ignored (it died)
DEFAULT_TIMEOUT_S = 30.0

# The default breaker of a pool: BreakerPolicy's defaults under the live ``breaker.*``
# settings, followed while the pool runs (compared by identity: a pool given a
# BreakerPolicy() of its own keeps it).
LIVE_BREAKER = BreakerPolicy()

_encode = msgspec.msgpack.Encoder().encode
_decode_load = msgspec.msgpack.Decoder(tuple[float, dict[str, int]]).decode


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 3600:
        raise ConfigurationError(
            f"timeout must be a number of seconds in (0, 3600], got {timeout!r}"
        )
    return float(timeout)


class Endpoint:
    """The instance a pick chose. ``url`` is its base URL; ``url_for(path)`` joins a
    path to it. The call counts as failed if the ``pick`` block raises, else as a
    success — unless the block says otherwise with ``failed()`` / ``succeeded()``."""

    __slots__ = ("outcome", "state", "trial")

    def __init__(self, state: InstanceState, trial: bool) -> None:
        self.state = state
        self.trial = trial  # a trial call through a half-open breaker
        self.outcome: str | None = None

    @property
    def id(self) -> str:
        return self.state.id

    @property
    def url(self) -> str:
        return self.state.url

    @property
    def zone(self) -> str:
        return self.state.instance.zone

    @property
    def metadata(self) -> dict[str, str]:
        return self.state.instance.metadata

    def url_for(self, path: str) -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    def failed(self) -> None:
        self.outcome = "failed"

    def succeeded(self) -> None:
        self.outcome = "ok"

    def refused(self) -> None:
        """The instance answered "not now" (429): it works, so its breaker does not
        count a failure; the call is retried elsewhere."""
        self.outcome = "refused"

    def __repr__(self) -> str:
        return f"Endpoint({self.id!r}, {self.url!r}{', trial' if self.trial else ''})"


class _Tiers:
    """A view version's instances sorted for picking (rebuilt only when the view
    changes): closed-breaker ``up`` and ``degraded`` replicas, and the instances
    in rotation whose breaker is open or half-open (due for trials after their
    recovery time)."""

    def __init__(self, view: ServiceView, breakers: bool) -> None:
        self.version = view.version
        self.up: list[Replica] = []
        self.degraded: list[Replica] = []
        self.tripped: list[InstanceState] = []
        self.by_id = view.by_id
        for state in view.instances:
            if not state.in_rotation:
                continue
            if breakers and state.breaker != "closed":
                self.tripped.append(state)
            elif state.status == Status.UP:
                self.up.append(state.replica)
            else:
                self.degraded.append(state.replica)


class ServicePool:
    """Calls to one service from this process (see the module's docstring).

    ``strategy`` is one of shoal.balancing.STRATEGIES; ``zone`` prefers instances of
    that zone (spilling over when none is usable or all have ``spill_at`` calls in
    flight); ``breaker=None`` turns breakers (and passive health) off; ``timeout``
    bounds each attempt; ``max_concurrent``/``max_wait`` size the bulkhead.
    """

    def __init__(
        self,
        client: Client,
        service: str,
        *,
        strategy: str = "least_outstanding",
        zone: str | None = None,
        spill_at: int = 32,
        breaker: BreakerPolicy | None = LIVE_BREAKER,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, shared
        timeout: float = DEFAULT_TIMEOUT_S,
        max_concurrent: int = 64,
        max_wait: float = 0.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        from shoal.registry import validate_service_name

        _check_timeout(timeout)
        self.service = validate_service_name(service)
        if breaker is None and strategy in ("least_outstanding", "power_of_two"):
            log.warning(
                "service %s: %s without breakers sends the most calls to a dead instance "
                "(it fails fast, so it has the fewest in flight); keep breakers on",
                service, strategy,
            )  # fmt: skip
        self.load = Load()
        self.strategy_name = strategy
        self.strategy: Strategy = make_strategy(strategy, self.load, zone, spill_at)
        self.breaker = breaker
        self._live_breaker = breaker is LIVE_BREAKER  # follows the live configuration
        self._config: ConfigView | None = None
        self.retry = retry
        self.timeout = timeout
        self.bulkhead = Bulkhead(service, max_concurrent, max_wait)
        self._client = client
        self._own_http = http is None
        self._http = http
        self._view: ServiceView | None = None
        self._tiers: _Tiers | None = None
        self._started: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # instance -> [successes, failures, failures in a row at the end]
        self._pending: dict[str, list[int]] = {}
        self._flushing: set[str] = set()
        self._closed = False
        self._duration = metrics.SERVICE_CALL_SECONDS.labels(service)
        self._calls: dict[tuple[str, str], Any] = {}

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> ServicePool:
        """Watch the service and start the background work; idempotent, and done by
        the first pick."""
        started = self._started
        if started is None or (started.done() and started.exception() is not None):
            # first use, or the last start failed (the engine was away): try again
            started = self._started = asyncio.create_task(self._start())
        await asyncio.shield(started)
        return self

    async def _start(self) -> None:
        if self._live_breaker and self._config is None:
            self._config = await self._client.config.watch()
            self._follow_breaker(self._config)
            self._config.on_change(self._follow_breaker)
        self._view = await self._client.registry.watch(self.service)
        self._view.on_change(self._show_breakers)
        self._show_breakers(self._view)
        if self._http is None:
            # as many connections as the bulkhead lets calls through, kept alive:
            # a smaller pool would make calls wait for a connection and time out
            # against an instance that did nothing wrong
            limits = httpx.Limits(
                max_connections=None, max_keepalive_connections=self.bulkhead.max_concurrent
            )
            self._http = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name=f"shoal-outcomes-{self.service}"),
            asyncio.create_task(self._share_load(), name=f"shoal-load-{self.service}"),
        ]

    async def close(self) -> None:
        # The flag as well as cancel(): redis-py can swallow a cancellation (see
        # node._cancel_listener), so the loops also stop on it; the wait is bounded.
        self._closed = True
        if self._config is not None:
            self._config.remove_listener(self._follow_breaker)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)
        try:
            with contextlib.suppress(ShoalError):
                await self._flush_all()
                async with self._client.errors():
                    await self._client.redis.hdel(
                        self._client.keys.service_load(self.service), self._process_id
                    )
        finally:
            if self._own_http and self._http is not None:
                await self._http.aclose()

    def _follow_breaker(self, config: ConfigView) -> None:
        """The breaker policy as the live ``breaker.*`` settings say now (each value
        was checked on write; a combination BreakerPolicy refuses keeps the last)."""
        fields = {n: config.values[f"breaker.{n}"] for n in BREAKER_FIELDS
                  if f"breaker.{n}" in config.values}  # fmt: skip
        try:
            self.breaker = BreakerPolicy(**fields)
        except ConfigurationError as exc:
            log.error("service %s: live breaker settings %s refused: %s", self.service, fields, exc)

    @property
    def view(self) -> ServiceView:
        if self._view is None:
            raise ConfigurationError(f"service pool {self.service!r} is not started")
        return self._view

    @property
    def _process_id(self) -> str:
        return self._client.service_watcher.process_id

    # --- picking -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def pick(
        self, key: str | None = None, *, exclude: Collection[str] = ()
    ) -> AsyncIterator[Endpoint]:
        """Choose an instance for one call (by ``key`` for consistent hashing),
        avoiding ``exclude`` when another is usable; count the call in flight while
        the block runs and record its outcome after."""
        if self._view is None:
            await self.start()
        try:
            slot = self.bulkhead.slot()
            await slot.__aenter__()
        except BulkheadFull:
            metrics.SERVICE_REJECTED.labels(self.service, "bulkhead_full").inc()
            raise
        try:
            endpoint = await self._choose(key, exclude)
            self.load.acquire(endpoint.id)
            started = time.perf_counter()
            outcome = "cancelled"
            try:
                yield endpoint
                outcome = endpoint.outcome or "ok"
            except asyncio.CancelledError:
                raise
            except BaseException:
                outcome = endpoint.outcome or "failed"
                raise
            finally:
                self.load.release(endpoint.id)
                if self._finished(endpoint, outcome, time.perf_counter() - started):
                    # a trial's verdict closes or reopens the breaker for everyone:
                    # recorded before the caller goes on (one round trip, rare)
                    await self._record_trial(endpoint.id, outcome != "failed")
        finally:
            await slot.__aexit__(None, None, None)

    def candidates(self, exclude: Collection[str] = ()) -> list[Replica]:
        """The replicas the next pick chooses among (for tests and the CLI)."""
        tier, _ = self._tier(exclude)
        return tier

    def _tier(
        self, exclude: Collection[str], refused: Collection[str] = ()
    ) -> tuple[list[Replica], list[InstanceState]]:
        """The first non-empty tier (up, then degraded) without ``refused`` (never
        usable now), preferring instances not in ``exclude`` (tried already); and
        the instances waiting behind an open breaker."""
        view = self.view
        tiers = self._tiers
        if tiers is None or tiers.version != view.version or tiers.by_id is not view.by_id:
            tiers = self._tiers = _Tiers(view, self.breaker is not None)
        due: list[Replica] = []
        waiting: list[InstanceState] = []
        if tiers.tripped:
            assert self.breaker is not None
            now = view.engine_now_ms()
            recovery_ms = self.breaker.recovery * 1000
            for state in tiers.tripped:
                if state.breaker == "half_open" or now >= state.health.o + recovery_ms:
                    due.append(state.replica)
                else:
                    waiting.append(state)
        up, degraded = tiers.up, tiers.degraded
        if due:
            up = up + [r for r in due if tiers.by_id[r.id].status == Status.UP]
            degraded = degraded + [r for r in due if tiers.by_id[r.id].status != Status.UP]
        for usable in (up, degraded):
            if refused:
                usable = [r for r in usable if r.id not in refused]
            if exclude:
                others = [r for r in usable if r.id not in exclude]
                usable = others or usable  # every one tried: better a retry than nothing
            if usable:
                return usable, waiting
        return [], waiting

    def has_alternative(self, tried: Collection[str]) -> bool:
        """Whether an instance not tried yet is in rotation now."""
        tier, _ = self._tier(())
        return any(r.id not in tried for r in tier)

    async def _choose(self, key: str | None, exclude: Collection[str]) -> Endpoint:
        if isinstance(exclude, str):
            raise ConfigurationError("exclude is a collection of instance ids, not one id")
        refused: set[str] = set()  # half-open instances whose trials are all out
        while True:
            tier, waiting = self._tier(exclude, refused)
            if not tier:
                raise self._none_usable(waiting, refused)
            replica = self.strategy.pick(tier, key)
            state = self.view.by_id[replica.id]
            if self.breaker is None or state.breaker == "closed":
                return Endpoint(state, trial=False)
            if self._trials_out(state):
                refused.add(state.id)  # known without asking: spare the round trip
                continue
            if await self._allow_trial(state):
                return Endpoint(self.view.by_id.get(state.id, state), trial=True)
            refused.add(state.id)

    def _none_usable(self, waiting: list[InstanceState], refused: set[str]) -> ShoalError:
        tripped = [s.id for s in waiting] + sorted(refused)
        if tripped:
            metrics.SERVICE_REJECTED.labels(self.service, "circuit_open").inc()
            assert self.breaker is not None
            now = self.view.engine_now_ms()
            reopen = [s.health.o + self.breaker.recovery * 1000 - now for s in waiting]
            reopen += [
                self.view.by_id[i].health.h + self._trial_ms() - now
                for i in refused
                if i in self.view.by_id
            ]
            return CircuitOpen(self.service, tripped, max(0.0, min(reopen, default=0.0)) / 1000)
        metrics.SERVICE_REJECTED.labels(self.service, "no_instance").inc()
        known = ", ".join(f"{s.id} ({s.status})" for s in self.view.instances) or "none registered"
        return NoInstance(f"service {self.service!r} has no instance in rotation: {known}")

    def _trials_out(self, state: InstanceState) -> bool:
        """Half-open with every trial handed out (as of the view), and not yet due
        for new ones: the engine would refuse."""
        assert self.breaker is not None
        health = state.health
        return (
            health.b == "half_open"
            and health.t >= self.breaker.half_open_trials
            and self.view.engine_now_ms() < health.h + self._trial_ms()
        )

    def _trial_ms(self) -> float:
        """How long a trial may be out before it is given up (its caller died): the
        longer of the recovery time and a call's timeout, so a slow trial that is
        still running is not joined by new ones."""
        assert self.breaker is not None
        return max(self.breaker.recovery, self.timeout) * 1000

    async def _allow_trial(self, state: InstanceState) -> bool:
        assert self.breaker is not None
        keys = self._client.keys
        async with self._client.errors():
            allowed, raw = await self._client.scripts.services(
                [keys.service(self.service)],
                [keys.prefix, "allow", self.service, state.id,
                 int(self.breaker.recovery * 1000), self.breaker.half_open_trials,
                 int(self._trial_ms())],
            )  # fmt: skip
        self.view.apply_health(state.id, decode_health(raw))
        return bool(allowed)

    # --- outcomes ------------------------------------------------------------------

    def _finished(self, endpoint: Endpoint, outcome: str, elapsed: float) -> bool:
        """Count the outcome; True if it is a trial's, to be recorded at once."""
        self._duration.observe(elapsed)
        counter = self._calls.get((endpoint.id, outcome))
        if counter is None:  # labels() costs ~1.5 µs a call: each child is looked up once
            counter = metrics.SERVICE_CALLS.labels(self.service, endpoint.id, outcome)
            self._calls[endpoint.id, outcome] = counter
        counter.inc()
        if outcome in NOT_COUNTED or self.breaker is None:
            return False
        if endpoint.trial:
            return True  # sent alone by _record_trial, never merged with older outcomes
        counts = self._pending.setdefault(endpoint.id, [0, 0, 0])
        if outcome == "failed":
            counts[1] += 1
            counts[2] += 1
        else:
            counts[0] += 1
            counts[2] = 0
        if outcome == "failed":
            self._flush_soon(endpoint.id)
        return False

    def _flush_soon(self, instance_id: str) -> None:
        if instance_id in self._flushing or self._closed:
            return  # the flush under way sends these counts too when it is done
        task = asyncio.create_task(self._flush(instance_id))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _flush(self, instance_id: str) -> None:
        self._flushing.add(instance_id)
        try:
            while counts := self._pending.pop(instance_id, None):
                if not await self._send_outcomes(instance_id, counts, trial=False):
                    return
        finally:
            self._flushing.discard(instance_id)

    async def _record_trial(self, instance_id: str, ok: bool) -> None:
        await self._send_outcomes(instance_id, [1, 0, 0] if ok else [0, 1, 1], trial=True)

    async def _send_outcomes(self, instance_id: str, counts: list[int], *, trial: bool) -> bool:
        """One ``outcome`` call; False (and the counts dropped) if the engine is away:
        bookkeeping never holds up or fails a call."""
        assert self.breaker is not None
        keys = self._client.keys
        try:
            async with self._client.errors():
                raw = await self._client.scripts.services(
                    [keys.service(self.service)],
                    [keys.prefix, "outcome", self.service, instance_id, counts[0], counts[1],
                     *self.breaker.outcome_args(), "1" if trial else "0", counts[2]],
                )  # fmt: skip
        except ShoalError as exc:
            log.debug("service %s: outcomes of %s not recorded: %s",
                      self.service, instance_id, exc)  # fmt: skip
            return False
        if raw and self._view is not None:
            self._view.apply_health(instance_id, decode_health(raw))
        return True

    async def _flush_all(self) -> None:
        if self.breaker is None:
            return
        for instance_id in list(self._pending):
            await self._flush(instance_id)

    async def _flush_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(OUTCOME_FLUSH_S)  # the batching period of successes
            for instance_id in list(self._pending):
                self._flush_soon(instance_id)

    async def _share_load(self) -> None:
        """Publish this process's calls in flight and read the others' (see Load)."""
        key = self._client.keys.service_load(self.service)
        me = self._process_id
        shared: dict[str, int] = {}
        shared_at = 0.0
        while not self._closed:
            await asyncio.sleep(LOAD_SHARE_S)  # the sharing period
            try:
                now = self.view.engine_now_ms() / 1000  # one clock for every host
                local = self.load.local()
                # written when it changed, and kept fresh while calls are in flight
                # (others ignore counts older than LOAD_STALE_S); an idle process
                # writes nothing
                write = local != shared or (local and now - shared_at > LOAD_STALE_S / 3)
                async with self._client.errors():
                    pipe = self._client.redis.pipeline(transaction=False)
                    if write:
                        pipe.hset(key, me, _encode((now, local)))
                    pipe.hgetall(key)
                    replies = await pipe.execute()
                if write:
                    shared, shared_at = local, now
                self.load.set_remote(self._remote_load(key, me, now, replies[-1]))
            except ShoalError as exc:
                log.debug("service %s: load not shared: %s", self.service, exc)

    def _remote_load(
        self, key: str, me: str, now: float, entries: dict[bytes, bytes]
    ) -> dict[str, int]:
        remote: dict[str, int] = {}
        for field, raw in entries.items():
            if field.decode() == me:
                continue
            try:
                at, counts = _decode_load(raw)
            except msgspec.DecodeError:
                continue
            if now - at > LOAD_STALE_S:
                if now - at > 10 * LOAD_STALE_S:  # long gone: tidy up
                    self._tasks.append(asyncio.create_task(self._forget(key, field)))
                    self._tasks[-1].add_done_callback(self._tasks.remove)
                continue
            for instance_id, n in counts.items():
                remote[instance_id] = remote.get(instance_id, 0) + n
        return remote

    async def _forget(self, key: str, field: bytes) -> None:
        with contextlib.suppress(ShoalError):
            async with self._client.errors():
                await self._client.redis.hdel(key, field)

    def _show_breakers(self, view: ServiceView) -> None:
        for state in view.instances:
            metrics.SERVICE_BREAKER_STATE.labels(self.service, state.id).set(
                metrics.BREAKER_LEVELS.get(state.breaker, 0)
            )

    # --- HTTP -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """An HTTP request to an instance (``path`` joined to its URL), with the
        pool's policies: per-attempt ``timeout``, retries on another instance
        (429/5xx, connection errors, timeouts; ``Retry-After`` honoured), breaker
        and bulkhead. 2xx-4xx answers are returned (a 4xx is the request's fault,
        not the instance's: check ``response.status_code``); ServiceCallFailed
        when every attempt failed (``.response`` holds the last answer, if any);
        CircuitOpen / NoInstance / BulkheadFull when no attempt could be made.
        ``kwargs`` go to ``httpx.AsyncClient.request`` (json=, headers=, …)."""
        limit = _check_timeout(self.timeout if timeout is None else timeout)
        policy = retry or self.retry
        tried: list[str] = []
        attempts: list[tuple[str, str]] = []
        last: list[httpx.Response] = []
        try:
            async for attempt in policy.retrying():
                with attempt:
                    try:
                        return await self._attempt(
                            method, path, key, limit, tried, attempts, kwargs
                        )
                    except RetryableStatus as failure:
                        last[:] = [failure.response]
                        raise
        except (RetryableStatus, httpx.TransportError, TimeoutError) as exc:
            raise ServiceCallFailed(self.service, attempts, last[0] if last else None) from exc
        except (CircuitOpen, NoInstance, BulkheadFull) as exc:
            if not attempts:
                raise  # no attempt was made: the reason itself
            # the retry found no instance: the attempts made so far, then why
            attempts.append(("(retry)", str(exc)))
            raise ServiceCallFailed(self.service, attempts, last[0] if last else None) from exc
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _attempt(
        self,
        method: str,
        path: str,
        key: str | None,
        limit: float,
        tried: list[str],
        attempts: list[tuple[str, str]],
        kwargs: dict[str, Any],
    ) -> httpx.Response:
        if self._http is None:
            await self.start()
        assert self._http is not None
        async with self.pick(key, exclude=tried) as endpoint:
            if tried:
                metrics.SERVICE_RETRIES.labels(self.service).inc()  # a retry actually sent
            tried.append(endpoint.id)
            try:
                async with asyncio.timeout(limit):
                    response = await self._http.request(
                        method, endpoint.url_for(path), timeout=limit, **kwargs
                    )
            except TimeoutError:
                attempts.append((endpoint.id, f"no answer within {limit:g}s"))
                raise
            except httpx.TransportError as exc:
                attempts.append((endpoint.id, f"{type(exc).__name__}: {exc}"))
                raise
            except Exception:
                # the request itself is wrong (a body httpx cannot encode, a bad
                # argument): not the instance's failure
                endpoint.outcome = "caller_error"
                raise
            if response.status_code == 429:
                endpoint.refused()
            if response.status_code == 429 or response.status_code >= 500:
                attempts.append((endpoint.id, f"HTTP {response.status_code}"))
                failure = RetryableStatus(response)
                # Retry-After speaks for this instance: another one is tried at once
                failure.elsewhere = self.has_alternative(tried)
                raise failure
            return response


class Services:
    """The service pools of one client (``client.services``, ``self.ctx.services``):
    ``services("llm")`` is the pool of ``llm``, made with the given options on
    first use and the same object after."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._pools: dict[str, ServicePool] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def __call__(self, service: str, **options: Any) -> ServicePool:
        pool = self._pools.get(service)
        if pool is None:
            pool = self._pools[service] = ServicePool(self._client, service, **options)
            self._options[service] = options
        elif options and options != self._options[service]:
            raise ConfigurationError(
                f"service pool {service!r} exists with other options "
                f"({self._options[service]}); give the options on its first use only"
            )
        return pool

    def fallback(self, *steps: str | ServicePool | Step, name: str = "") -> Fallback:
        """A fallback chain of services (each step's ``request``) and local async
        functions called with the same arguments: ``await chain("POST", "/v1/x",
        json=body)`` returns an Answered naming the step that answered."""
        pairs: list[tuple[str, Step]] = []
        for step in steps:
            if isinstance(step, str):
                step = self(step)
            if isinstance(step, ServicePool):
                pairs.append((step.service, step.request))
            elif callable(step):
                pairs.append((getattr(step, "__name__", repr(step)), step))
            else:
                raise ConfigurationError(f"a fallback step is a service or a function: {step!r}")
        return Fallback(*pairs, name=name or "->".join(n for n, _ in pairs))

    @property
    def pools(self) -> Sequence[ServicePool]:
        return list(self._pools.values())

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()
