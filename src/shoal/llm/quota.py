"""Cluster-wide quotas of a model provider: requests and tokens per minute.

A provider (OpenAI, a hosted gateway, a shared vLLM) grants so many requests and
so many tokens a minute to an organisation, not to a process, and counts a
request's tokens in the window of the request. Every Shoal process that calls it
therefore shares one **weighted sliding window log** per limit in the engine
(``scripts/quotawindow.lua``: atomic, on the engine's clock; keys
``llmquota:<provider>:<kind>``, see shoal.keys): each admitted request is an entry
stamped with its admission time and weighted with the tokens it counts for (1 for
the requests limit).

**No window over the quota.** A request is admitted only if, with it, the
entries of the last ``quota_period + margin`` seconds weigh no more than the
quota ``Q``: however the load is spread, any such window holds at most ``Q``.
Requests and tokens are admitted together or not at all.

**The margin** is for the way from here to the provider: a request reaches it
some milliseconds after its admission, and not always the same number (a new
connection, a busy event loop, a burst of calls sent together). A window as the
provider sees it therefore holds the admissions of a window shifted by those
delays; counting each entry for ``margin`` seconds longer (default 5 % of the
period: 3 s a minute) keeps the provider's own windows within ``Q`` as long as
the delays vary by less than the margin — measured on the test server: a burst
of 12 admitted together arrives spread over ~0.1 s. The cost: a steady load gets
``Q * period / (period + margin)`` (95 %) of the quota.

**Tokens are estimated before the call** (the provider counts them when it
answers, too late to wait for): the prompt's ASCII characters / 4 and one token
for every other character (JSON of tool definitions included) plus
``max_tokens`` — which a ProviderPool sets to the provider's completion allowance
(``DEFAULT_COMPLETION_TOKENS``) on a request that has none, so the answer cannot
outgrow it. After the answer the
request's entry is set to the usage the provider reported (the larger of its
total and prompt + completion) *if it is still in the window*:

* **Used less:** the difference is freed in the request's own window — exactly
  what the provider counted — unless the provider was built with
  ``refund=False`` (providers that count ``max_tokens`` at request time and never
  give it back): then the entry is never lowered.
* **Used more:** the window becomes over-full and later admissions wait until
  the entry leaves it. **The one limit:** the tokens used beyond their estimate by
  requests still in flight when another was admitted are not known yet, so a
  window can hold ``Q`` plus those under-estimates (unavoidable without knowing
  usage ahead; set ``max_tokens`` to keep estimates honest).

An entry that already left the window is not changed (its window is over). A
failed call's entry is set to 0 tokens (with ``refund``); its request still
counts, as it does at the provider. A process that dies mid-call leaves its
entries at their estimates until they leave the window (conservative).

**Bounded waits.** A call waits up to ``quota_wait`` seconds for room (the
script says when the oldest entries leave enough), then fails with
``QuotaExceeded`` naming the provider, the limit and how long it would have
taken. A request estimated above the quota itself fails at once: waiting would
never help.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoal.errors import ConfigurationError, ShoalError
from shoal.llm.errors import LLMError
from shoal.llm.types import Usage
from shoal.observability import metrics

if TYPE_CHECKING:
    from shoal.client import Client

__all__ = ["DEFAULT_COMPLETION_TOKENS", "Admission", "Quota", "QuotaExceeded", "estimate_tokens"]

log = logging.getLogger("shoal.llm.quota")

CHARS_PER_TOKEN = 4
DEFAULT_MARGIN = 0.05  # of the period: how much longer an entry counts (see the doc)
DEFAULT_COMPLETION_TOKENS = 1024  # a request without max_tokens is assumed to use this many
# a quota's total lives in a Lua number (a double): far below 2**53, and above any
# real tier (the biggest hosted ones are a few million tokens a minute)
MAX_QUOTA = 1_000_000_000


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
    """Tokens a request will use, before it is sent: its prompt's (message
    contents, tool calls and tool definitions: see ``_prompt_tokens``) plus the
    completion allowance (``max_tokens``, else DEFAULT_COMPLETION_TOKENS)."""
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        texts.append(content if isinstance(content, str) else json.dumps(content or ""))
        if message.get("tool_calls"):
            texts.append(json.dumps(message["tool_calls"]))
    if tools:
        texts.append(json.dumps(list(tools)))
    allowance = max_tokens if max_tokens is not None else DEFAULT_COMPLETION_TOKENS
    return max(1, sum(map(_prompt_tokens, texts)) + allowance)


def _prompt_tokens(text: str) -> int:
    """A conservative token count without the model's tokenizer: ASCII text at
    about four characters a token (English prose; code runs denser), every other
    character as a token of its own (CJK text is about one a character; other
    scripts are cheaper, so this errs high)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // CHARS_PER_TOKEN) + (len(text) - ascii_chars)


@dataclass(frozen=True)
class _Limit:
    """One per-period limit: its window's keys and its quota."""

    kind: str  # "requests" or "tokens"
    keys: tuple[str, str, str]  # the log, the amounts, the total (shoal.keys)
    quota: int


@dataclass
class Admission:
    """Room taken for one call: its entry (``id``) and its estimated tokens."""

    id: str
    tokens: int
    waited: float


class Quota:
    """The requests-per-minute and tokens-per-minute limits of one provider, shared
    by every process of the namespace. Either may be None (not limited).
    ``refund=False``: a call that used less than estimated still counts its
    estimate (providers that count max_tokens up front)."""

    def __init__(
        self,
        client: Client,
        provider: str,
        *,
        rpm: int | None,
        tpm: int | None,
        period: float = 60.0,
        margin: float | None = None,
        wait: float = 10.0,
        refund: bool = True,
    ) -> None:
        self.provider = provider
        self.period = period
        self.margin = period * DEFAULT_MARGIN if margin is None else margin
        self.wait = wait
        self.refund = refund
        self._client = client
        keys = client.keys
        self.requests = (
            _Limit("requests", keys.llm_quota(provider, "requests"), rpm) if rpm else None
        )
        self.tokens = _Limit("tokens", keys.llm_quota(provider, "tokens"), tpm) if tpm else None

    async def admit(self, estimate: int) -> Admission:
        """Take room for one call of ``estimate`` tokens, waiting up to ``wait``
        seconds; QuotaExceeded when there is none in time (or ever)."""
        if self.tokens is not None and estimate > self.tokens.quota:
            self._refused("tokens")
            raise QuotaExceeded(
                self.provider,
                "tokens",
                f"provider {self.provider!r}: this request needs about {estimate} tokens "
                f"(prompt/4 + max_tokens), more than its whole tokens-per-minute quota "
                f"({self.tokens.quota}): lower max_tokens or shorten the prompt",
                None,
            )
        entry = uuid.uuid4().hex
        started = time.monotonic()
        deadline = started + self.wait
        while True:
            refused = await self._try(entry, estimate)
            if refused is None:
                waited = time.monotonic() - started
                metrics.LLM_QUOTA_WAIT.labels(self.provider).observe(waited)
                return Admission(entry, estimate, waited)
            kind, pause = refused
            if time.monotonic() + pause > deadline:
                metrics.LLM_QUOTA_WAIT.labels(self.provider).observe(time.monotonic() - started)
                self._refused(kind)
                raise self._exceeded(kind, pause)
            # room appears at a known moment; jitter spreads callers refused together
            await asyncio.sleep(pause + random.uniform(0, min(pause, 0.01)))

    async def settle(self, admission: Admission, usage: Usage | None, *, failed: bool) -> None:
        """Set the call's entry to the tokens it used (0 when it failed; never
        lower than the estimate without ``refund``), if it is still in the window.
        Never raises: the call is over, bookkeeping must not fail it."""
        limit = self.tokens
        if limit is None:
            return
        used = 0 if failed else used_tokens(usage, admission.tokens)
        if used == admission.tokens or (used < admission.tokens and not self.refund):
            return  # nothing would change: spare the round trip
        args: list[str | int] = [self._client.keys.prefix, "settle", admission.id]
        args.append(self._window_ms())
        try:
            async with self._client.errors():
                await self._client.scripts.quotawindow(
                    list(limit.keys), [*args, limit.quota, used, int(self.refund)]
                )
        except ShoalError as exc:
            log.warning(
                "provider %s: the %d tokens a call used were not recorded (%d estimated): %s",
                self.provider,
                used,
                admission.tokens,
                exc,
            )

    async def aclose(self) -> None:
        """Nothing to release: every count lives in the engine and ends with its
        window (kept so pools can close their quotas whatever they hold)."""

    def _window_ms(self) -> int:
        return max(1, round((self.period + self.margin) * 1000))

    async def _try(self, entry: str, estimate: int) -> tuple[str, float] | None:
        """Count the request and its tokens, both or neither: None when counted,
        else the limit that refused and the seconds until it has room."""
        limits = [(lim, n) for lim, n in ((self.requests, 1), (self.tokens, estimate)) if lim]
        keys = [key for lim, _ in limits for key in lim.keys]
        args: list[str | int] = [self._client.keys.prefix, "admit", entry, self._window_ms()]
        for lim, amount in limits:
            args += [lim.quota, amount]
        async with self._client.errors():
            admitted, index, detail = await self._client.scripts.quotawindow(keys, args)
        if int(admitted):
            return None
        return limits[int(index) - 1][0].kind, float(detail)

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
