"""Model providers and the pool that calls them: replicas, affinity, breakers,
retries, a fallback chain and cluster-wide quotas, behind the ChatModel interface.

    pool = ProviderPool(client, [
        Provider("local", model="qwen2.5-7b", service="vllm"),         # registered replicas
        Provider("hosted", model="gpt-4o-mini", base_url="https://api.openai.com/v1",
                 api_key_env="OPENAI_API_KEY", rpm=500, tpm=200_000),  # one fixed endpoint
    ])
    answer = await pool.complete(messages, key=conversation_id)
    answer.provider, answer.instance                                 # who answered

A provider is either a **service** of Shoal's registry (``client.registry.register(
"vllm", "http://10.0.0.5:8000/v1")`` for each replica; its URL is an OpenAI base
URL) or one fixed ``base_url`` (a hosted API). A call goes to the first provider:

* **Affinity.** A service's replica is picked by consistent hashing on ``key``
  (the conversation id), so one conversation stays on one replica — its KV cache
  warm — while that replica is healthy; other keys spread over the replicas.
* **Breakers and retries.** The outcome of each call feeds the replica's breaker
  (shared by the cluster, ``shoal.services``): 5xx, timeouts and connection errors
  count against it; a 429 does not (the replica works, it is busy); a 4xx is the
  request's fault and counts for nothing. A failed call is retried (``retry``,
  default 3 attempts per provider) on another replica when there is one — at
  once — or on the same after its ``Retry-After``.
* **Fallback.** When a provider cannot answer (every attempt failed, its breakers
  are open, no replica is registered, its quota has no room within
  ``quota_wait``), the next provider of the chain is tried. A rejected request
  (``LLMBadRequest``) is raised at once: another provider would reject it too.
* **Streams** are retried and failed over only before their first content token:
  after it the caller has shown text, and ``LLMStreamBroken`` propagates.
* **Quotas** (``rpm``/``tpm``) are cluster-wide (``shoal.llm.quota``).

Each ``LLMClient`` the pool makes has no retry of its own (the pool retries) and
shares its provider's connection pool.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import httpx
import msgspec

from shoal.balancing import STRATEGIES
from shoal.errors import ConfigurationError, EngineUnavailable
from shoal.llm.client import LLMClient
from shoal.llm.errors import (
    LLMAuthError,
    LLMBadRequest,
    LLMConnectionError,
    LLMError,
    LLMRateLimited,
    LLMServerError,
    LLMStreamBroken,
    LLMTimeout,
)
from shoal.llm.quota import (
    DEFAULT_COMPLETION_TOKENS,
    Admission,
    Quota,
    QuotaExceeded,
    check_quota,
    estimate_tokens,
)
from shoal.llm.types import Completion, StreamDelta, Usage
from shoal.observability import metrics
from shoal.resilience import (
    NO_RETRY,
    BreakerPolicy,
    BulkheadFull,
    CircuitOpen,
    NoInstance,
    RetryPolicy,
)
from shoal.services import LIVE_BREAKER

if TYPE_CHECKING:
    from shoal.client import Client

__all__ = ["POOL_RETRY", "Provider", "ProviderPool", "ProvidersFailed"]

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")

# Per provider: three attempts, on other replicas at once when there are some,
# else after a short backoff or the server's Retry-After (up to 30 s).
POOL_RETRY = RetryPolicy(attempts=3, backoff=0.05, max_backoff=2.0, max_retry_after=30.0)

# What makes the chain try its next provider; anything else (a bad request, a
# configuration error, a bug) is raised at once.
_FALLS_BACK = (LLMError, CircuitOpen, NoInstance, BulkheadFull, EngineUnavailable)


class ProvidersFailed(LLMError):
    """Every provider of the chain failed; ``failures`` lists (provider, error)
    in the order they were tried."""

    def __init__(self, failures: list[tuple[str, BaseException]]) -> None:
        self.failures = failures
        tried = "; ".join(f"{name}: {exc}" for name, exc in failures)
        super().__init__(f"every model provider failed — {tried}")


def _number(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigurationError(f"{name} must be a number within {low:g}..{high:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Timeouts:
    connect: float
    read: float
    total: float


class Provider:
    """One model provider (see the module's docstring): ``name`` (labels metrics
    and answers), the ``model`` to ask for, and either ``service`` (a registry
    service whose instances are OpenAI base URLs) or ``base_url``.

    The key: ``api_key``, or the name of the environment variable holding it
    (``api_key_env``, read now: a missing variable fails here, not at the first
    call). Quotas: ``rpm``/``tpm`` per minute for the whole cluster (None: no
    limit), ``quota_wait`` seconds a call may wait for room, ``quota_period`` the
    length of the provider's "minute" (60; shorter only to scale tests down),
    ``quota_margin`` how much longer each request counts, for the varying delay
    from admission to the provider (default 5 % of the period; see shoal.llm.quota),
    ``refund`` False for providers that count ``max_tokens`` up front and never
    give unused tokens back (see shoal.llm.quota); with a ``tpm`` quota, a request
    that sets no ``max_tokens`` is sent with ``max_tokens=completion_allowance``
    (default 1,024), so its answer cannot outgrow its estimate.
    Replicas: ``strategy`` (consistent_hash gives affinity), ``breaker`` (the
    live breaker settings by default; None: no breaker), ``max_concurrent`` calls
    in flight from this process. Timeouts as LLMClient's.
    """

    def __init__(
        self,
        name: str,
        *,
        model: str,
        service: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        quota_wait: float = 10.0,
        quota_period: float = 60.0,
        quota_margin: float | None = None,
        refund: bool = True,
        completion_allowance: int = DEFAULT_COMPLETION_TOKENS,
        strategy: str = "consistent_hash",
        breaker: BreakerPolicy | None = LIVE_BREAKER,
        max_concurrent: int = 64,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        total_timeout: float = 600.0,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"provider name {name!r:.80} is invalid: start with a letter or '_', then up "
                "to 63 letters, digits, '_' or '-'"
            )
        self.name = name
        where = f"provider {name!r}"
        if not isinstance(model, str) or not model:
            raise ConfigurationError(f"{where}: model= must name the model to ask for")
        self.model = model
        self.service, self.base_url = self._endpoint(where, service, base_url)
        self._api_key = self._key(where, api_key, api_key_env)
        self.rpm = check_quota("rpm", rpm)
        self.tpm = check_quota("tpm", tpm)
        self.quota_wait = _number(f"{where}: quota_wait", quota_wait, 0, 3600)
        self.quota_period = _number(f"{where}: quota_period", quota_period, 0.1, 86_400)
        self.quota_margin = (
            None
            if quota_margin is None
            else _number(f"{where}: quota_margin", quota_margin, 0, self.quota_period)
        )
        if not isinstance(refund, bool):
            raise ConfigurationError(f"{where}: refund must be True or False, got {refund!r}")
        self.refund = refund
        if (
            isinstance(completion_allowance, bool)
            or not isinstance(completion_allowance, int)
            or not (1 <= completion_allowance <= 1_000_000)
        ):
            raise ConfigurationError(
                f"{where}: completion_allowance must be a whole number 1..1000000 of tokens, "
                f"got {completion_allowance!r}"
            )
        self.completion_allowance = completion_allowance
        if strategy not in STRATEGIES:
            raise ConfigurationError(
                f"{where}: strategy must be one of {', '.join(sorted(STRATEGIES))}, "
                f"got {strategy!r}"
            )
        if breaker is not None and not isinstance(breaker, BreakerPolicy):
            raise ConfigurationError(f"{where}: breaker must be a BreakerPolicy or None")
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ConfigurationError(f"{where}: max_concurrent must be a whole number")
        self.strategy = strategy
        self.breaker = breaker
        self.max_concurrent = max_concurrent
        self.timeouts = _Timeouts(
            _number(f"{where}: connect_timeout", connect_timeout, 0.001, 3600),
            _number(f"{where}: read_timeout", read_timeout, 0.001, 3600),
            _number(f"{where}: total_timeout", total_timeout, 0.001, 86_400),
        )

    @staticmethod
    def _endpoint(where: str, service: str | None, base_url: str | None) -> tuple[str | None, str]:
        from shoal.registry import validate_service_name

        if (service is None) == (base_url is None):
            raise ConfigurationError(
                f"{where}: give either service= (a registered service of model replicas) "
                "or base_url= (one endpoint, e.g. https://api.openai.com/v1)"
            )
        if service is not None:
            return validate_service_name(service), ""
        url = httpx.URL(str(base_url).rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigurationError(
                f"{where}: base_url must be an http(s) URL like https://api.example.com/v1"
            )
        return None, str(url)

    @staticmethod
    def _key(where: str, api_key: str | None, api_key_env: str | None) -> str | None:
        if api_key is not None and api_key_env is not None:
            raise ConfigurationError(f"{where}: give api_key= or api_key_env=, not both")
        if api_key_env is not None:
            value = os.environ.get(api_key_env)
            if not value:
                raise ConfigurationError(
                    f"{where}: api_key_env={api_key_env!r} names an environment variable "
                    "that is not set; set it or pass api_key="
                )
            return value
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise ConfigurationError(f"{where}: api_key must be a non-empty string")
        return api_key

    @property
    def instance(self) -> str:
        """The instance name of a base_url provider: its host (and port)."""
        return httpx.URL(self.base_url).netloc.decode() if self.base_url else ""

    @property
    def identity(self) -> tuple[str, str, str]:
        """What answers this provider's calls — name, model and service or base URL
        (without credentials) — for keys that must tell providers apart."""
        return (self.name, self.model, self.service or self._public_url)

    @property
    def _public_url(self) -> str:
        return str(httpx.URL(self.base_url).copy_with(username=None, password=None))

    def __repr__(self) -> str:
        target = f"service={self.service!r}" if self.service else f"base_url={self._public_url!r}"
        key = "'***'" if self._api_key else "None"
        return f"Provider({self.name!r}, model={self.model!r}, {target}, api_key={key})"


class _Ticket:
    """One attempt's room in its provider's quota, reconciled when it ends."""

    def __init__(self, quota: Quota | None, admission: Admission | None) -> None:
        self._quota = quota
        self._admission = admission

    async def settle(self, usage: Usage | None, *, failed: bool) -> None:
        if self._quota is not None and self._admission is not None:
            admission, self._admission = self._admission, None  # once
            await self._quota.settle(admission, usage, failed=failed)


_OUTCOMES: list[tuple[type[LLMError], str]] = [
    (QuotaExceeded, "quota_exceeded"),
    (LLMStreamBroken, "stream_broken"),
    (LLMRateLimited, "rate_limited"),
    (LLMServerError, "server_error"),
    (LLMTimeout, "timeout"),
    (LLMConnectionError, "connection_error"),
    (LLMBadRequest, "bad_request"),
    (LLMAuthError, "auth_error"),
]


def _outcome(exc: LLMError) -> str:
    return next((label for kind, label in _OUTCOMES if isinstance(exc, kind)), "error")


class ProviderPool:
    """A fallback chain of providers, used like one model (``ChatModel``)."""

    def __init__(
        self,
        client: Client,
        providers: Sequence[Provider],
        *,
        retry: RetryPolicy = POOL_RETRY,
    ) -> None:
        providers = list(providers)
        if not providers or not all(isinstance(p, Provider) for p in providers):
            raise ConfigurationError("ProviderPool needs a list of one or more Provider objects")
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"provider names must differ, got {names}")
        if not isinstance(retry, RetryPolicy):
            raise ConfigurationError("retry must be a shoal.resilience.RetryPolicy")
        self.providers = providers
        self.retry = retry
        self._client = client
        self._quotas = {p.name: self._quota(p) for p in providers}
        self._http: dict[str, httpx.AsyncClient] = {}
        self._llms: dict[tuple[str, str], LLMClient] = {}

    @property
    def identity(self) -> str:
        """The chain this pool calls — each provider's (name, model, service or
        base URL) in order — so a response cache tells pools of different models
        apart (a pool has no one ``model``)."""
        return "pool:" + msgspec.json.encode([p.identity for p in self.providers]).decode()

    def _quota(self, p: Provider) -> Quota | None:
        if p.rpm is None and p.tpm is None:
            return None
        return Quota(
            self._client, p.name, rpm=p.rpm, tpm=p.tpm, period=p.quota_period,
            margin=p.quota_margin, wait=p.quota_wait, refund=p.refund,
        )  # fmt: skip

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pools (the service pools are the client's) and the
        quotas (see Quota.aclose)."""
        for quota in self._quotas.values():
            if quota is not None:
                await quota.aclose()
        for http in self._http.values():
            await http.aclose()
        self._http.clear()
        self._llms.clear()

    # --- calls ---------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion:
        """The whole answer, from the first provider of the chain that gives one."""
        failures: list[tuple[str, BaseException]] = []
        for provider in self.providers:
            try:
                answer = await self._complete_on(provider, messages, key, tools, params)
            except _FALLS_BACK as exc:
                self._failed(provider, exc, failures)
                continue
            metrics.LLM_ANSWERS.labels(provider.name, "model").inc()
            return answer
        raise self._exhausted(failures)

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamDelta]:
        """The answer as it is written (see LLMClient.stream), from the first
        provider that starts one; the last delta's Completion names who answered."""
        failures: list[tuple[str, BaseException]] = []
        for provider in self.providers:
            async with contextlib.AsyncExitStack() as stack:
                started = time.perf_counter()
                try:
                    opened = await self._open_stream(provider, stack, messages, key, tools, params)
                except _FALLS_BACK as exc:
                    self._failed(provider, exc, failures)
                    continue
                metrics.LLM_TIME_TO_FIRST_TOKEN.labels(provider.name).observe(
                    time.perf_counter() - started
                )
                relay = self._relay(provider, *opened)
                stack.push_async_callback(relay.aclose)  # type: ignore[attr-defined]
                async for delta in relay:
                    yield delta
                return
        raise self._exhausted(failures)

    # --- one provider ----------------------------------------------------------------

    async def _complete_on(
        self,
        provider: Provider,
        messages: Sequence[Mapping[str, Any]],
        key: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        params: dict[str, Any],
    ) -> Completion:
        tried: list[str] = []
        deadline = time.monotonic() + provider.timeouts.total
        async for attempt in self.retry.retrying(deadline):
            with attempt:
                sent = _capped(provider, params)
                ticket = await self._admit(provider, messages, tools, sent)
                usage, failed = None, True
                try:
                    async with self._target(provider, key, tried) as (llm, instance):
                        answer = await llm.complete(messages, tools=tools, **sent)
                    usage, failed = answer.usage, False
                finally:
                    await ticket.settle(usage, failed=failed)
                return msgspec.structs.replace(answer, provider=provider.name, instance=instance)
        raise AssertionError("unreachable: tenacity either returns or raises")

    async def _open_stream(
        self,
        provider: Provider,
        stack: contextlib.AsyncExitStack,
        messages: Sequence[Mapping[str, Any]],
        key: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        params: dict[str, Any],
    ) -> tuple[StreamDelta, AsyncIterator[StreamDelta], str, _Ticket]:
        """Start a stream and wait for its first delta, retrying until then; the
        replica's pick stays open on ``stack`` while the stream is read."""
        tried: list[str] = []
        deadline = time.monotonic() + provider.timeouts.total
        async for attempt in self.retry.retrying(deadline):
            with attempt:
                sent = _capped(provider, params)
                ticket = await self._admit(provider, messages, tools, sent)
                inner = contextlib.AsyncExitStack()
                try:
                    llm, instance = await inner.enter_async_context(
                        self._target(provider, key, tried)
                    )
                    deltas = llm.stream(messages, tools=tools, **sent)
                    inner.push_async_callback(deltas.aclose)  # type: ignore[attr-defined]
                    first = await self._first(deltas)
                except BaseException as exc:
                    await ticket.settle(None, failed=True)
                    if not await inner.__aexit__(type(exc), exc, exc.__traceback__):
                        raise
                    raise AssertionError("unreachable: a pick never swallows an error") from exc
                stack.push_async_exit(inner.pop_all())
                return first, deltas, instance, ticket
        raise AssertionError("unreachable: tenacity either returns or raises")

    @staticmethod
    async def _first(deltas: AsyncIterator[StreamDelta]) -> StreamDelta:
        try:
            return await anext(deltas)
        except LLMStreamBroken as exc:
            # cut before any token: the caller has seen nothing, so it may be retried
            raise LLMConnectionError(f"{exc} (before the first token)") from None

    async def _relay(
        self,
        provider: Provider,
        first: StreamDelta,
        deltas: AsyncIterator[StreamDelta],
        instance: str,
        ticket: _Ticket,
    ) -> AsyncIterator[StreamDelta]:
        usage: Usage | None = None
        try:
            delta: StreamDelta | None = first
            while delta is not None:
                if delta.done and delta.completion is not None:
                    usage = delta.completion.usage
                    named = msgspec.structs.replace(
                        delta.completion, provider=provider.name, instance=instance
                    )
                    delta = msgspec.structs.replace(delta, completion=named)
                    metrics.LLM_ANSWERS.labels(provider.name, "model").inc()
                yield delta
                delta = await anext(deltas, None)
        finally:
            # a broken or abandoned stream used its tokens: kept as estimated
            await ticket.settle(usage, failed=False)

    async def _admit(
        self,
        provider: Provider,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        params: dict[str, Any],
    ) -> _Ticket:
        quota = self._quotas[provider.name]
        if quota is None:
            return _Ticket(None, None)
        estimate = estimate_tokens(messages, tools, params.get("max_tokens"))
        return _Ticket(quota, await quota.admit(estimate))

    @contextlib.asynccontextmanager
    async def _target(
        self, provider: Provider, key: str | None, tried: list[str]
    ) -> AsyncIterator[tuple[LLMClient, str]]:
        """The client for this attempt's replica (or the fixed endpoint); the
        attempt's outcome is counted and, for a replica, told to its breaker."""
        if provider.service is None:
            with self._counted(provider):
                yield self._llm(provider, provider.base_url), provider.instance
            return
        pool = self._client.services(
            provider.service,
            strategy=provider.strategy,
            breaker=provider.breaker,
            retry=NO_RETRY,
            timeout=min(provider.timeouts.total, 3600.0),
            max_concurrent=provider.max_concurrent,
        )
        async with pool.pick(key, exclude=tried) as endpoint:
            tried.append(endpoint.id)
            try:
                with self._counted(provider):
                    yield self._llm(provider, endpoint.url), endpoint.id
            except (LLMBadRequest, LLMAuthError):
                endpoint.outcome = "caller_error"  # the request's or the key's fault
                raise
            except LLMRateLimited as exc:
                endpoint.refused()  # busy, not broken
                exc.elsewhere = pool.has_alternative(tried)
                raise
            except LLMStreamBroken:
                raise  # after the first token (a stall included): never retried
            except LLMTimeout as exc:
                # a slow replica's timeout says nothing of another's: try one there,
                # never the same one again (it would likely time out once more)
                exc.retryable = pool.has_alternative(tried)
                raise
            except GeneratorExit:
                endpoint.outcome = "cancelled"  # the reader stopped: no verdict
                raise

    @contextlib.contextmanager
    def _counted(self, provider: Provider) -> Any:
        try:
            yield
        except LLMError as exc:
            metrics.LLM_REQUESTS.labels(provider.name, _outcome(exc)).inc()
            raise
        metrics.LLM_REQUESTS.labels(provider.name, "ok").inc()

    def _llm(self, provider: Provider, url: str) -> LLMClient:
        llm = self._llms.get((provider.name, url))
        if llm is None:
            t = provider.timeouts
            http = self._http.get(provider.name)
            if http is None:
                timeout = httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.read)
                limits = httpx.Limits(
                    max_connections=None, max_keepalive_connections=provider.max_concurrent
                )
                http = self._http[provider.name] = httpx.AsyncClient(timeout=timeout, limits=limits)
            llm = self._llms[provider.name, url] = LLMClient(
                url, provider._api_key or "", provider.model, retry=NO_RETRY,
                connect_timeout=t.connect, read_timeout=t.read, total_timeout=t.total,
                http_client=http,
            )  # fmt: skip
        return llm

    # --- failures --------------------------------------------------------------------

    def _failed(
        self, provider: Provider, exc: BaseException, failures: list[tuple[str, BaseException]]
    ) -> None:
        if isinstance(exc, LLMBadRequest):
            raise exc  # another provider would reject it too: the caller must fix it
        failures.append((provider.name, exc))

    def _exhausted(self, failures: list[tuple[str, BaseException]]) -> BaseException:
        if len(failures) == 1 and isinstance(failures[0][1], QuotaExceeded):
            return failures[0][1]  # the one provider's quota: QuotaExceeded says it best
        return ProvidersFailed(failures)


def _capped(provider: Provider, params: dict[str, Any]) -> dict[str, Any]:
    """The request's parameters for this provider: under a tokens quota, a request
    without ``max_tokens`` gets the provider's completion allowance, so the answer
    cannot use more than was estimated and admitted for it."""
    if provider.tpm is None or params.get("max_tokens") is not None:
        return params
    return {**params, "max_tokens": provider.completion_allowance}
