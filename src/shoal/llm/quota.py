"""Cluster-wide quotas of a model provider: requests and tokens per minute.

A provider (OpenAI, a hosted gateway, a shared vLLM) grants so many requests and
so many tokens a minute to an organisation, not to a process. Every Shoal process
that calls it therefore takes from the same two token buckets in the engine
(``shoal.coordination.ratelimit``: atomic, on the engine's clock), named
``ratelimit:llmquota:<provider>.requests`` / ``.tokens``.

**No minute over the quota.** A bucket of ``burst`` tokens refilled at ``rate`` a
second admits up to ``burst + 60 * rate`` in a minute (it starts full). So a quota
of ``Q`` per minute becomes ``burst = Q * quota_burst`` (default 10 %) and
``rate = (Q - burst) / 60``: any 60-second window admits at most ``Q``, and a
steady load gets 90 % of it. A bigger ``quota_burst`` lets bigger single
requests and bursts through at the cost of the steady rate.

**Tokens are estimated before the call** (the provider counts them when it
answers, too late to wait for): prompt characters / 4 (about 4 characters a token
in English; JSON of tool definitions included) plus ``max_tokens``, or
``DEFAULT_COMPLETION_TOKENS`` when the request sets none. After the answer the
estimate is reconciled with the usage the provider reported (the larger of its
total and prompt + completion):

* **Used more: a debt.** The extra is taken whatever the bucket holds; the bucket
  goes negative and later calls wait it off. The debt is floored at one quota's
  worth (``-Q``): a single runaway answer cannot block the provider for more than
  about a period; beyond it is forgiven (logged).
* **Used less: a late refund.** The unused tokens go back one quota period after
  the call ended, by a timer in this process, so they are never spent again in
  the window the call was counted in. A process that dies before its timer fires
  loses the refund: the bucket just refills later than it could (conservative).

A failed call gives its tokens back (late, as any refund); its request still
counts, as it does at the provider.

**Bounded waits.** A call waits up to ``quota_wait`` seconds for room, then fails
with ``QuotaExceeded`` naming the provider, the limit and how long it would have
taken. A request that needs more tokens than the bucket can ever hold (its
``burst``) fails at once: waiting would never help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shoal.coordination.ratelimit import MAX_BURST, MAX_RATE, MIN_RATE, TokenBucket
from shoal.errors import ConfigurationError, ShoalError
from shoal.llm.errors import LLMError
from shoal.llm.types import Usage
from shoal.observability import metrics

if TYPE_CHECKING:
    from shoal.client import Client

__all__ = ["DEFAULT_COMPLETION_TOKENS", "Admission", "Quota", "QuotaExceeded", "estimate_tokens"]

log = logging.getLogger("shoal.llm.quota")

BUCKETS = "llmquota"  # the token buckets' name (see shoal.keys: ratelimit:<name>:<key>)
CHARS_PER_TOKEN = 4
DEFAULT_COMPLETION_TOKENS = 1024  # a request without max_tokens is assumed to use this many
# per minute: the bucket's refill (Q - B) / 60 must stay within the rate limiter's
# MAX_RATE (1e6 tokens a second, ~6e7 a minute); a bigger tier is out of reach
MAX_QUOTA = 50_000_000


class QuotaExceeded(LLMError):
    """A provider's cluster-wide quota has no room for this call within the wait
    allowed (or ever, for a request bigger than the quota admits at once).

    ``provider``; ``kind`` is "requests" or "tokens"; ``wait`` the seconds until
    there would have been room (None: never, the request is too big).
    """

    def __init__(self, provider: str, kind: str, message: str, wait: float | None) -> None:
        super().__init__(message, None)
        self.provider = provider
        self.kind = kind
        self.wait = wait


def estimate_tokens(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    max_tokens: int | None,
) -> int:
    """Tokens a request will use, before it is sent: its prompt's characters / 4
    (message contents, tool calls and tool definitions) plus the completion
    allowance (``max_tokens``, else DEFAULT_COMPLETION_TOKENS)."""
    chars = 0
    for message in messages:
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else len(json.dumps(content or ""))
        if message.get("tool_calls"):
            chars += len(json.dumps(message["tool_calls"]))
    if tools:
        chars += len(json.dumps(list(tools)))
    allowance = max_tokens if max_tokens is not None else DEFAULT_COMPLETION_TOKENS
    return max(1, -(-chars // CHARS_PER_TOKEN) + allowance)


@dataclass(frozen=True)
class _Limit:
    """One per-period limit as a token bucket that never admits more than
    ``quota`` in any ``period`` seconds."""

    kind: str  # "requests" or "tokens"
    key: str
    quota: int
    burst: int
    rate: float

    @classmethod
    def of(cls, provider: str, kind: str, quota: int, period: float, burst: float) -> _Limit:
        """The bucket of ``quota`` per ``period`` s; ConfigurationError when the rate
        limiter cannot hold it (a refill too slow or too fast for its bounds)."""
        size = min(MAX_BURST, max(1, int(quota * burst)))
        rate = (quota - size) / period
        if not MIN_RATE <= rate <= MAX_RATE:
            short = "rpm" if kind == "requests" else "tpm"
            raise ConfigurationError(
                f"provider {provider!r}: {short}={quota} per quota_period={period:g}s refills "
                f"its bucket at {rate:.6g} {kind}/s, outside the rate limiter's "
                f"{MIN_RATE:g}..{MAX_RATE:.0f}: "
                + ("raise the quota or shorten quota_period" if rate < MIN_RATE
                   else "lower the quota or lengthen quota_period")
            )  # fmt: skip
        return cls(kind, f"{provider}.{kind}", quota, size, rate)

    def bucket(self, count: int) -> tuple[float, int, int]:
        return (self.rate, self.burst, count)


@dataclass
class Admission:
    """Room taken for one call: its request and its estimated tokens."""

    tokens: int
    waited: float
    at: float = field(default_factory=time.monotonic)  # when the room was taken


class Quota:
    """The requests-per-minute and tokens-per-minute limits of one provider, shared
    by every process of the namespace. Either may be None (not limited)."""

    def __init__(
        self,
        client: Client,
        provider: str,
        *,
        rpm: int | None,
        tpm: int | None,
        period: float = 60.0,
        burst: float = 0.1,
        wait: float = 10.0,
    ) -> None:
        self.provider = provider
        self.period = period
        self.wait = wait
        self._buckets = TokenBucket(client, BUCKETS)
        self.requests = _Limit.of(provider, "requests", rpm, period, burst) if rpm else None
        self.tokens = _Limit.of(provider, "tokens", tpm, period, burst) if tpm else None
        self._refunds: set[asyncio.Task[None]] = set()  # refunds waiting for their time

    async def admit(self, estimate: int) -> Admission:
        """Take room for one call of ``estimate`` tokens, waiting up to ``wait``
        seconds; QuotaExceeded when there is none in time (or ever)."""
        if self.tokens is not None and estimate > self.tokens.burst:
            self._refused("tokens")
            raise QuotaExceeded(
                self.provider,
                "tokens",
                f"provider {self.provider!r}: this request needs about {estimate} tokens "
                f"(prompt/4 + max_tokens), more than its tokens-per-minute quota of "
                f"{self.tokens.quota} admits at once ({self.tokens.burst}, quota_burst): "
                "lower max_tokens, shorten the prompt or raise quota_burst",
                None,
            )
        started = time.monotonic()
        deadline = started + self.wait
        while True:
            refused = await self._try(estimate)
            if refused is None:
                waited = time.monotonic() - started
                metrics.LLM_QUOTA_WAIT.labels(self.provider).observe(waited)
                return Admission(estimate, waited)
            kind, pause = refused
            if time.monotonic() + pause > deadline:
                metrics.LLM_QUOTA_WAIT.labels(self.provider).observe(time.monotonic() - started)
                self._refused(kind)
                raise self._exceeded(kind, pause)
            # room appears at a known moment; jitter spreads callers refused together
            await asyncio.sleep(pause + random.uniform(0, min(pause, 0.01)))

    async def settle(self, admission: Admission, usage: Usage | None, *, failed: bool) -> None:
        """Reconcile the estimate with what the call used: a debt for tokens used
        beyond it (at once), a refund of the unused ones (one period from now; a
        failed call's whole estimate), nothing when the server reported no usage.
        Never raises: the call is over, bookkeeping must not fail it."""
        if self.tokens is None:
            return
        used = 0 if failed else used_tokens(usage, admission.tokens)
        difference = admission.tokens - used
        if difference > 0:
            self._refund_later(difference)
        elif difference < 0:
            await self._owe(-difference)

    async def _owe(self, extra: int) -> None:
        limit = self.tokens
        assert limit is not None
        try:
            owed = await self._buckets.owe(
                limit.key, rate=limit.rate, burst=limit.burst, cost=extra, floor=limit.quota
            )
        except ShoalError as exc:
            log.warning(
                "provider %s: %d tokens of debt not recorded: %s", self.provider, extra, exc
            )
            return
        if owed < extra:
            log.info(
                "provider %s: %d tokens used beyond the estimate were forgiven (the debt "
                "is capped at one quota, %d)",
                self.provider,
                extra - owed,
                limit.quota,
            )

    def _refund_later(self, unused: int) -> None:
        """Give ``unused`` back one period from now: a refund spent at once could be
        spent within the window its call was counted in, passing the quota."""
        task = asyncio.get_running_loop().create_task(self._refund(unused))
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    async def _refund(self, unused: int) -> None:
        limit = self.tokens
        assert limit is not None
        await asyncio.sleep(self.period)
        try:
            await self._buckets.give_each({limit.key: limit.bucket(unused)})
        except ShoalError as exc:
            log.warning(
                "provider %s: %d unused tokens not given back: %s", self.provider, unused, exc
            )

    async def aclose(self) -> None:
        """Drop the refunds still waiting, as a process that ends would: giving
        them back early could pass the quota, and their timers must not outlive
        the pool. The bucket refills without them (conservative)."""
        pending = list(self._refunds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _try(self, estimate: int) -> tuple[str, float] | None:
        """Take a request and the tokens, both or neither: None when taken, else
        the limit that refused and the seconds until it has room."""
        if self.requests is not None:
            decision = await self._buckets.take(
                self.requests.key, rate=self.requests.rate, burst=self.requests.burst
            )
            if not decision.allowed:
                return "requests", decision.retry_after
        if self.tokens is not None:
            decision = await self._buckets.take(
                self.tokens.key, rate=self.tokens.rate, burst=self.tokens.burst, cost=estimate
            )
            if not decision.allowed:
                if self.requests is not None:  # the request goes back: it was not made
                    await self._buckets.give_each({self.requests.key: self.requests.bucket(1)})
                return "tokens", decision.retry_after
        return None

    def _exceeded(self, kind: str, pause: float) -> QuotaExceeded:
        limit = self.requests if kind == "requests" else self.tokens
        assert limit is not None
        per = "minute" if self.period == 60 else f"{self.period:g}s"
        return QuotaExceeded(
            self.provider,
            kind,
            f"provider {self.provider!r}: its {kind}-per-minute quota ({limit.quota} per "
            f"{per}, shared by the cluster) has no room for {pause:.1f}s, longer than "
            f"quota_wait={self.wait:g}s",
            pause,
        )

    def _refused(self, kind: str) -> None:
        metrics.LLM_QUOTA_EXCEEDED.labels(self.provider, kind).inc()
        metrics.LLM_REQUESTS.labels(self.provider, "quota_exceeded").inc()


def used_tokens(usage: Usage | None, estimate: int) -> int:
    """The tokens a finished call used: what the server reported (the larger of its
    total and prompt + completion: servers disagree on which they fill in), or the
    estimate when it reported none."""
    if usage is None:
        return estimate
    return max(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens)


def check_limits(
    provider: str, rpm: int | None, tpm: int | None, period: float, burst: float
) -> None:
    """Fail now (ConfigurationError) for quotas the rate limiter cannot enforce,
    rather than at the provider's first call."""
    for kind, quota in (("requests", rpm), ("tokens", tpm)):
        if quota:
            _Limit.of(provider, kind, quota, period, burst)


def check_quota(name: str, value: Any) -> int | None:
    """An rpm/tpm argument: None, or a whole number 2..MAX_QUOTA."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_QUOTA:
        raise ConfigurationError(
            f"{name} must be a whole number of {(name[0] == 'r' and 'requests') or 'tokens'} "
            f"per minute within 2..{MAX_QUOTA}, or None for no limit; got {value!r}"
        )
    return value
