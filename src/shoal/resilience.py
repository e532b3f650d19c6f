"""Resilience policies for calls to other services: circuit breaker settings, retry
policies (on tenacity), bulkheads, fallback chains — and the back-off every
reconnecting loop of Shoal uses.

The breaker's *state* is not kept here but in the engine (``services.lua``), so
every process sees one breaker per instance; this module holds the policy each
caller passes to the script. ``shoal.services`` combines them into one call site.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import tenacity

from shoal.errors import ConfigurationError, ShoalError

log = logging.getLogger("shoal.resilience")
T = TypeVar("T")


class Backoff:
    """Capped exponential back-off with jitter, for loops that retry after engine
    errors: 50 ms, 100 ms, 200 ms … up to ``cap``, each scaled by a random factor in
    [0.5, 1.0] so that many nodes reconnecting at once do not retry in lock-step."""

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.failures = 0

    def next_delay(self) -> float:
        """The delay before the next try; each call counts one more failure."""
        delay = min(self.cap, self.base * 2.0**self.failures)
        self.failures += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """A success: the next failure starts from ``base`` again."""
        self.failures = 0


# --- errors ----------------------------------------------------------------------


class CircuitOpen(ShoalError):
    """Every usable instance of the service is behind an open breaker: the call
    failed fast, without touching the network."""

    def __init__(self, service: str, instances: Sequence[str], retry_in: float) -> None:
        self.service = service
        self.instances = list(instances)
        self.retry_in = retry_in
        names = ", ".join(self.instances) or "none"
        super().__init__(
            f"service {service!r}: circuit open for every instance in rotation ({names}); "
            f"the next trial call is allowed in {retry_in:.1f}s"
        )


class NoInstance(ShoalError, LookupError):
    """The service has no instance in rotation (none registered, or all down,
    starting or draining)."""


class BulkheadFull(ShoalError):
    """The service's bulkhead is full: this process already has ``limit`` calls to
    it in flight. Raised at once (or after ``max_wait``), never queued for ever."""

    def __init__(self, service: str, limit: int, waited: float) -> None:
        self.service = service
        self.limit = limit
        after = f" after waiting {waited:.2f}s" if waited else ""
        super().__init__(
            f"service {service!r}: bulkhead full{after} — {limit} calls already in flight "
            "from this process; raise max_concurrent or slow the callers down"
        )


class ServiceCallFailed(ShoalError):
    """Every attempt of a call failed; ``attempts`` lists (instance, error) of each.
    ``response`` is the last HTTP response, when the last attempt got one."""

    def __init__(
        self,
        service: str,
        attempts: list[tuple[str, str]],
        response: httpx.Response | None = None,
    ) -> None:
        self.service = service
        self.attempts = attempts
        self.response = response
        tried = "; ".join(f"{instance}: {error}" for instance, error in attempts)
        super().__init__(f"service {service!r}: {len(attempts)} attempt(s) failed — {tried}")


class RetryableStatus(ShoalError):
    """An HTTP answer that says "try again" (429, 502, 503, 504, other 5xx), raised
    inside a call so the retry policy sees it; carries ``Retry-After`` if given."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status_code = response.status_code
        self.retry_after = parse_retry_after(response.headers.get("retry-after"))
        # another instance is in rotation: the next attempt goes there at once,
        # since this instance's Retry-After says nothing of the others
        self.elsewhere = False
        super().__init__(f"HTTP {response.status_code}")


class FallbackFailed(ShoalError):
    """Every step of a fallback chain failed; ``errors`` lists (step, error)."""

    def __init__(self, errors: list[tuple[str, BaseException]]) -> None:
        self.errors = errors
        steps = "; ".join(f"{name}: {exc}" for name, exc in errors)
        super().__init__(f"every step of the fallback chain failed — {steps}")


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date (RFC
    9110 §10.2.3); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds)


# --- circuit breaker policy -------------------------------------------------------


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class BreakerPolicy:
    """When an instance's breaker opens, and how it closes again.

    Closed → **open** after ``consecutive_failures`` failures in a row, or when at
    least ``min_calls`` calls over the last ``window`` seconds failed at
    ``failure_rate`` or more. Open → **half-open** after ``recovery`` seconds: up to
    ``half_open_trials`` trial calls go through; a success closes it, a failure
    opens it again. Passive health uses the same window: an error rate of
    ``degraded_rate`` or more marks the instance *degraded* (used only when no
    healthy instance is left) until it falls under half of that.
    """

    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_calls: int = 20
    window: float = 5.0
    recovery: float = 5.0
    half_open_trials: int = 1
    degraded_rate: float = 0.2

    def __post_init__(self) -> None:
        for name in ("consecutive_failures", "min_calls", "half_open_trials"):
            _check(_is_int(getattr(self, name)), f"{name} must be a whole number")
        for name in ("failure_rate", "window", "recovery", "degraded_rate"):
            _check(_is_number(getattr(self, name)), f"{name} must be a number")
        _check(self.consecutive_failures >= 1, "consecutive_failures must be >= 1")
        _check(0 < self.failure_rate <= 1, "failure_rate must be in (0, 1]")
        _check(self.min_calls >= 1, "min_calls must be >= 1")
        _check(0.1 <= self.window <= 3600, "window must be 0.1..3600 seconds")
        _check(0.01 <= self.recovery <= 3600, "recovery must be 0.01..3600 seconds")
        _check(self.half_open_trials >= 1, "half_open_trials must be >= 1")
        _check(0 < self.degraded_rate <= 1, "degraded_rate must be in (0, 1]")

    def outcome_args(self) -> list[str | int]:
        """The policy as services.lua's ``outcome`` op takes it."""
        return [
            self.consecutive_failures, repr(self.failure_rate), self.min_calls,
            int(self.window * 1000), repr(self.degraded_rate),
        ]  # fmt: skip


# --- retries ------------------------------------------------------------------------

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def default_retryable(exc: BaseException) -> bool:
    """Retry what another attempt (on another instance) may well fix: connection
    failures, timeouts, and 429/5xx answers. Not 4xx (the request is wrong),
    not CircuitOpen/NoInstance/BulkheadFull (no instance to try), not cancellation."""
    if isinstance(exc, RetryableStatus):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    retryable = getattr(exc, "retryable", None)
    if isinstance(retryable, bool):
        return retryable  # errors that say it themselves (shoal.llm.errors)
    return isinstance(exc, httpx.TransportError | TimeoutError)


def _told_retry_after(exc: BaseException | None) -> float | None:
    """The ``Retry-After`` an error carries (a RetryableStatus, an LLMRateLimited),
    unless the next attempt goes to another instance (``elsewhere``): this
    instance's Retry-After says nothing of the others."""
    after: Any = getattr(exc, "retry_after", None)
    if getattr(exc, "elsewhere", False) or not _is_number(after):
        return None
    return float(after)


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed call is tried again: up to ``attempts`` attempts in all, waiting
    ``backoff * 2**n`` (full jitter, capped at ``max_backoff``) between them — or what
    the server's ``Retry-After`` says, up to ``max_retry_after`` (a longer one ends
    the retries: waiting minutes inside a call helps nobody). Each retry goes to
    another instance when there is one."""

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 2.0
    retry_on: Callable[[BaseException], bool] = field(default=default_retryable)
    honour_retry_after: bool = True
    max_retry_after: float = 30.0

    def __post_init__(self) -> None:
        _check(_is_int(self.attempts), "attempts must be a whole number")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            _check(_is_number(getattr(self, name)), f"{name} must be a number of seconds")
        _check(callable(self.retry_on), "retry_on must be a function of the exception")
        _check(1 <= self.attempts <= 100, "attempts must be 1..100")
        _check(0 <= self.backoff <= 60, "backoff must be 0..60 seconds")
        _check(self.max_backoff >= self.backoff, "max_backoff must be >= backoff")
        _check(self.max_retry_after >= 0, "max_retry_after must be >= 0")

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = _told_retry_after(exc) if self.honour_retry_after else None
        if after is not None:
            return after
        jitter = tenacity.wait_random_exponential(multiplier=self.backoff, max=self.max_backoff)
        return float(jitter(state))

    def _should_retry(self, state: tenacity.RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, Exception) or not self.retry_on(exc):
            return False  # never a cancellation, whatever retry_on says
        after = _told_retry_after(exc) if self.honour_retry_after else None
        # told to come back later than we would wait: no retry
        return after is None or after <= self.max_retry_after

    def retrying(self, deadline: float | None = None) -> tenacity.AsyncRetrying:
        """A tenacity controller for one call: ``async for attempt in ...``. With a
        ``deadline`` (``time.monotonic()`` seconds), no retry whose wait would end
        after it: the last error is raised instead."""
        stop: Any = tenacity.stop_after_attempt(self.attempts)
        if deadline is not None:
            stop = stop | _stop_at(deadline)
        return tenacity.AsyncRetrying(
            stop=stop,
            wait=self._wait,
            retry=self._should_retry,
            reraise=True,
        )


NO_RETRY = RetryPolicy(attempts=1)


def _stop_at(deadline: float) -> Callable[[tenacity.RetryCallState], bool]:
    def stop(state: tenacity.RetryCallState) -> bool:
        return time.monotonic() + (state.upcoming_sleep or 0.0) >= deadline

    return stop


# --- bulkhead ----------------------------------------------------------------------------


class Bulkhead:
    """At most ``max_concurrent`` calls to one service in flight from this process;
    a call over the limit waits up to ``max_wait`` seconds (default: not at all)
    for a free place, then is refused with BulkheadFull. Bounding the wait is the
    point: a slow service must not pile up every caller's coroutine behind it."""

    def __init__(self, service: str, max_concurrent: int = 64, max_wait: float = 0.0) -> None:
        _check(
            _is_int(max_concurrent) and 1 <= max_concurrent <= 100_000,
            f"max_concurrent must be a whole number 1..100000, got {max_concurrent!r}",
        )
        _check(
            _is_number(max_wait) and 0 <= max_wait <= 3600,
            f"max_wait must be 0..3600 seconds, got {max_wait!r}",
        )
        self.service = service
        self.max_concurrent = max_concurrent
        self.max_wait = max_wait
        self._free = asyncio.Semaphore(max_concurrent)
        self.in_flight = 0

    @asynccontextmanager
    async def slot(self) -> Any:
        if self._free.locked():
            if not self.max_wait:
                raise BulkheadFull(self.service, self.max_concurrent, 0.0)
            try:
                async with asyncio.timeout(self.max_wait):
                    await self._free.acquire()
            except TimeoutError:
                raise BulkheadFull(self.service, self.max_concurrent, self.max_wait) from None
        else:
            await self._free.acquire()  # free: returns at once
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._free.release()


# --- fallback -------------------------------------------------------------------------


@dataclass(frozen=True)
class Answered:
    """A fallback chain's answer: the value, which step gave it, and what failed
    before it."""

    value: Any
    source: str
    failures: list[tuple[str, BaseException]]


Step = Callable[..., Awaitable[Any]]


class Fallback:
    """Try steps in order until one answers: ``Fallback(("vllm", call_vllm),
    ("hosted", call_hosted), ("canned", canned_answer))``. Each step is a name and
    an async function taking the chain's arguments; ``ServicePool`` objects work as
    steps too (see ``Services.fallback``). The answer records which step answered
    (``Answered.source``), and a metric counts it."""

    def __init__(
        self,
        *steps: tuple[str, Step],
        name: str = "fallback",
        catch: Callable[[BaseException], bool] | None = None,
    ) -> None:
        _check(len(steps) >= 1, "a fallback chain needs at least one step")
        for step in steps:
            _check(
                isinstance(step, tuple) and len(step) == 2 and callable(step[1]),
                f"each step is a (name, async function) pair, got {step!r:.80}",
            )
        self.name = name
        self.steps: list[tuple[str, Step]] = list(steps)
        self._catch = catch or (lambda exc: isinstance(exc, Exception))

    def __iter__(self) -> Iterator[tuple[str, Step]]:
        return iter(self.steps)

    async def __call__(self, *args: Any, **kwargs: Any) -> Answered:
        from shoal.observability.metrics import fallback_answered

        failures: list[tuple[str, BaseException]] = []
        for source, step in self.steps:
            try:
                result = step(*args, **kwargs)
                value = await result if inspect.isawaitable(result) else result
            except BaseException as exc:
                if not self._catch(exc):
                    raise
                log.info("fallback %s: %s failed (%s); trying the next", self.name, source, exc)
                failures.append((source, exc))
                continue
            fallback_answered(self.name, source)
            return Answered(value, source, failures)
        raise FallbackFailed(failures)
