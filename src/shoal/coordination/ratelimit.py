"""Rate limits kept in the engine, so every process that limits a key shares them:
a token bucket, a sliding window log, and ``RateLimiter`` — the one to use from
code, which waits for room (bounded) or raises ``RateLimited``.

Token bucket (``TokenBucket``, ``ratelimit.lua``):

A bucket holds up to ``burst`` tokens and gains ``rate`` tokens a second; a call
takes ``cost`` tokens or is refused, told how long until they are there. This is
Shoal's one rate limiter — per API key in the gateway now, per capability or per
LLM token budget later — so it takes any bucket name, key, rate and size:

* **Shared.** The bucket lives in the engine, not in a process: a client limited
  to 10 requests a second gets 10 across all gateways, not 10 from each.
* **Atomic, one round trip.** ``ratelimit.lua`` refills and takes in one script,
  so concurrent callers never both spend the last token.
* **One clock.** The refill is measured on the engine's clock (``TIME``): the
  callers' clocks disagree, the engine's is the same for all of them.
* **Free when idle.** A bucket is stored only while it is short of full, with an
  expiry of the time it takes to refill; a million keys seen once cost nothing
  an hour later. ``rate`` and ``burst`` are not stored: each call says them, so
  changing a key's limit takes effect at its next call.
* **One key per bucket** (``ratelimit:<name>:<key>``, see shoal.keys), under the
  namespace's control hash tag, so the script runs on a Cluster as on one server.

Sliding window log (``SlidingWindow``, ``ratewindow.lua``): at most ``limit`` calls in
any ``window`` seconds, exactly — what a provider that counts "requests in the last
minute" enforces. It stores one sorted-set member per admitted call in the window,
so its memory grows with ``limit`` (bounded by MAX_WINDOW_LIMIT); a token bucket
stores two numbers whatever the rate, and is the better choice for high rates.
Same clock, atomicity and key layout as the bucket.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import TYPE_CHECKING, Any

import msgspec
import redis
from redis.exceptions import NoScriptError

from shoal.engine import translate
from shoal.errors import ConfigurationError, RateLimited, ShoalError

if TYPE_CHECKING:  # the client may use the limiter itself one day: no import cycle
    from shoal.client import Client

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_KEY_LENGTH = 512  # a bucket key names a caller (an API key id, an address): short


class RateDecision(msgspec.Struct, frozen=True):
    """The answer of one ``take``."""

    allowed: bool
    remaining: float  # tokens left after this call
    retry_after: float  # seconds until `cost` tokens are there (0 when allowed)


MAX_RATE = 1_000_000.0  # tokens per second; beyond, a limit limits nothing
MIN_RATE = 0.001  # one token in ~17 minutes; slower rates overflow the bucket's expiry
MAX_BURST = 1_000_000


def validate_rate(rate: Any) -> float:
    """A refill rate: a number of tokens per second within MIN_RATE..MAX_RATE."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float)
        or not MIN_RATE <= rate <= MAX_RATE
    ):
        raise ConfigurationError(
            f"rate must be a number of tokens per second within {MIN_RATE}..{MAX_RATE:.0f}, "
            f"got {rate!r}"
        )
    return float(rate)


def validate_burst(burst: Any) -> int:
    """A bucket size: a whole number of tokens, 1 to MAX_BURST."""
    if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= MAX_BURST:
        raise ConfigurationError(
            f"burst must be a whole number of tokens within 1..{MAX_BURST}, got {burst!r}"
        )
    return burst


def _validate_cost(cost: Any, capacity: int, holds: str = "the bucket holds (burst") -> int:
    """A cost that can ever be paid: one beyond the capacity would be refused forever."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigurationError(f"cost must be a whole number of tokens >= 1, got {cost!r}")
    if cost > capacity:
        raise ConfigurationError(
            f"cost {cost} is more than {holds} {capacity}): it could never be paid"
        )
    return cost


def _validate_key(key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"a rate-limit key must be a non-empty string of at most {MAX_KEY_LENGTH} "
            f"characters, got {key!r:.80}"
        )
    return key


class TokenBucket:
    """The buckets of one kind, ``name`` (e.g. ``"apikey"``), one per key.

    ``await TokenBucket(client, "apikey").take(key_id, rate=5, burst=10)`` takes a
    token from ``key_id``'s bucket; the client must be connected.
    """

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = _validate_name(name)

    async def take(self, key: str, *, rate: float, burst: int, cost: int = 1) -> RateDecision:
        """Take ``cost`` tokens from ``key``'s bucket (``burst`` big, refilled at
        ``rate`` a second), or refuse and say in how many seconds they will be there.

        Raises ConfigurationError for a bad argument (``cost > burst`` among them),
        EngineUnavailable / EngineError when the engine cannot answer.
        """
        rate, burst = validate_rate(rate), validate_burst(burst)
        cost = _validate_cost(cost, burst)
        keys = self._client.keys
        bucket = keys.ratelimit(self.name, _validate_key(key))
        async with self._client.errors():
            reply = await self._client.scripts.ratelimit(
                [bucket], [keys.prefix, repr(rate), burst, cost]
            )
        return _decision(reply)

    async def take_each(
        self, wanted: dict[str, tuple[float, int, int]]
    ) -> dict[str, tuple[int, RateDecision] | ShoalError]:
        """For each key, take as many whole tokens as its bucket has, up to the
        number asked (``key -> (rate, burst, most)``), all in one round trip: how
        many each gave (0: refused, with ``retry_after`` until one is there). A key
        whose call failed maps to its error (EngineError, EngineUnavailable), so one
        broken bucket does not cost the others their answer. Tokens taken and not
        used go back with ``give_each``."""
        calls = {
            key: self._call(key, rate, burst, most, "upto")
            for key, (rate, burst, most) in wanted.items()
        }
        replies = await self._run_each(calls)
        return {
            key: reply if isinstance(reply, ShoalError) else (int(reply[0]), _decision(reply))
            for key, reply in replies.items()
        }

    async def give_each(self, given: dict[str, tuple[float, int, int]]) -> None:
        """Put tokens taken by ``take_each`` and not used back (``key -> (rate,
        burst, count)``), in one round trip; a bucket never fills past ``burst``.
        Raises the first error (the tokens of a failed give are lost: the bucket
        only refills later than it could have)."""
        calls = {
            key: self._call(key, rate, burst, count, "give")
            for key, (rate, burst, count) in given.items()
        }
        for reply in (await self._run_each(calls)).values():
            if isinstance(reply, ShoalError):
                raise reply

    def _call(
        self, key: str, rate: float, burst: int, count: int, op: str
    ) -> tuple[list[str], list[str | int]]:
        rate, burst = validate_rate(rate), validate_burst(burst)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigurationError(f"a token count is a whole number >= 1, got {count!r}")
        keys = self._client.keys
        return [keys.ratelimit(self.name, _validate_key(key))], [
            keys.prefix, repr(rate), burst, count, op,
        ]  # fmt: skip

    async def _run_each(
        self, calls: dict[str, tuple[list[str], list[str | int]]]
    ) -> dict[str, Any]:
        """Each call's reply or its error (translated), one pipeline for all."""
        script = self._client.scripts.ratelimit
        with self._client.errors():
            if len(calls) == 1:
                ((key, call),) = calls.items()
                try:
                    return {key: await script(*call)}
                except redis.ResponseError as exc:
                    return {key: translate(exc, self._client.url)}
            pipe = self._client.redis.pipeline(transaction=False)
            for bucket, args in calls.values():
                script.queue(pipe, bucket, args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            results: dict[str, Any] = {}
            for (key, call), reply in zip(calls.items(), replies, strict=True):
                if isinstance(reply, NoScriptError):  # the engine restarted: load and rerun
                    try:
                        reply = await script(*call)
                    except redis.ResponseError as exc:
                        reply = exc
                if isinstance(reply, redis.RedisError):
                    reply = translate(reply, self._client.url)
                results[key] = reply
        return results


def _decision(reply: list[Any]) -> RateDecision:
    allowed, remaining, retry_after = reply
    return RateDecision(bool(allowed), float(remaining), float(retry_after))


MAX_WINDOW_LIMIT = 100_000  # members per window key: ~10 MB at most; beyond, use a bucket
MIN_WINDOW = 0.001
MAX_WINDOW = 86_400.0


def validate_window(limit: Any, window: Any) -> tuple[int, float]:
    """A sliding window: ``limit`` whole calls in ``window`` seconds."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_WINDOW_LIMIT:
        raise ConfigurationError(
            f"limit must be a whole number of calls within 1..{MAX_WINDOW_LIMIT} (a window "
            f"stores each call; for higher rates use a token bucket), got {limit!r}"
        )
    if (
        isinstance(window, bool)
        or not isinstance(window, int | float)
        or not MIN_WINDOW <= window <= MAX_WINDOW
    ):
        raise ConfigurationError(
            f"window must be a number of seconds within {MIN_WINDOW}..{MAX_WINDOW:.0f}, "
            f"got {window!r}"
        )
    return limit, float(window)


def _validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"rate-limit name {name!r} is invalid: start with a letter or '_', then up to "
            "63 letters, digits, '_', '.' or '-'"
        )
    return name


class SlidingWindow:
    """The sliding windows of one kind, ``name``, one per key:
    ``await SlidingWindow(client, "openai").take(org, limit=3000, window=60)``."""

    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self.name = _validate_name(name)

    async def take(self, key: str, *, limit: int, window: float, cost: int = 1) -> RateDecision:
        """Admit ``cost`` calls into ``key``'s window if, with them, no more than
        ``limit`` calls fall within the last ``window`` seconds; otherwise refuse
        and say in how many seconds they would fit."""
        limit, window = validate_window(limit, window)
        cost = _validate_cost(cost, limit, "the window admits (limit")
        keys = self._client.keys
        log = keys.ratewindow(self.name, _validate_key(key))
        async with self._client.errors():
            reply = await self._client.scripts.ratewindow(
                [log], [keys.prefix, limit, repr(window * 1000), cost]
            )
        return _decision(reply)


USER_PREFIX = "limit."  # user limiters' names: never the gateway's "apikey" buckets
MAX_LIMITER_NAME = 64 - len(USER_PREFIX)


class RateLimiter:
    """One named limit, shared by every process of the namespace, to call from code:
    a token bucket (``rate`` per second, ``burst`` at once) or a sliding window
    (``limit`` calls per ``window`` seconds) — give one pair.

    ``await limiter.acquire(key)`` waits until the call fits (up to ``timeout``)
    and raises ``RateLimited`` if it would not fit in time; ``await
    limiter.take(key)`` answers at once with a ``RateDecision``. Keys split one
    limit into independent ones (per customer, per model, ...).
    """

    def __init__(
        self,
        client: Client,
        name: str,
        *,
        rate: float | None = None,
        burst: int | None = None,
        limit: int | None = None,
        window: float | None = None,
    ) -> None:
        self.name = _validate_name(name)
        if len(name) > MAX_LIMITER_NAME:
            raise ConfigurationError(
                f"rate limiter name {name!r} is too long: at most {MAX_LIMITER_NAME} characters"
            )
        engine_name = USER_PREFIX + name
        if (rate is None) == (limit is None):
            raise ConfigurationError(
                f"rate limiter {name!r}: give either rate= (and burst=) for a token bucket "
                "or limit= and window= for a sliding window"
            )
        self._take: Any
        if rate is not None:
            if window is not None:
                raise ConfigurationError(f"rate limiter {name!r}: window= goes with limit=")
            self.rate = validate_rate(rate)
            self.burst = validate_burst(burst if burst is not None else max(1, round(rate)))
            self.kind = "token_bucket"
            bucket = TokenBucket(client, engine_name)
            self._take = lambda key, cost: bucket.take(
                key, rate=self.rate, burst=self.burst, cost=cost
            )
        else:
            if burst is not None:
                raise ConfigurationError(f"rate limiter {name!r}: burst= goes with rate=")
            if window is None:
                raise ConfigurationError(f"rate limiter {name!r}: limit= needs window= (seconds)")
            self.limit, self.window = validate_window(limit, window)
            self.kind = "sliding_window"
            sliding = SlidingWindow(client, engine_name)
            self._take = lambda key, cost: sliding.take(
                key, limit=self.limit, window=self.window, cost=cost
            )

    async def take(self, key: str = "default", *, cost: int = 1) -> RateDecision:
        """Take room for ``cost`` calls now, or be told when there will be."""
        decision: RateDecision = await self._take(key, cost)
        return decision

    async def acquire(
        self, key: str = "default", *, cost: int = 1, timeout: float | None = 10.0
    ) -> RateDecision:
        """Wait until ``cost`` calls fit, then take them. Raises ``RateLimited`` when
        they would not fit within ``timeout`` seconds (``None``: wait as long as it
        takes; ``0``: do not wait)."""
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0
        ):
            raise ConfigurationError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            decision = await self.take(key, cost=cost)
            if decision.allowed:
                return decision
            pause = decision.retry_after
            if deadline is not None and time.monotonic() + pause > deadline:
                raise RateLimited(self.name, key, decision.retry_after)
            # Waiting for time to pass is the point: room appears at a known moment.
            # A little jitter spreads callers that were refused together, so they do
            # not all come back in the same millisecond and refuse each other again.
            await asyncio.sleep(pause + random.uniform(0, min(pause, 0.01)))
