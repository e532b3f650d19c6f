"""A token bucket kept in the engine, so every process that limits a key shares it.

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
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.errors import ConfigurationError

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


def _validate_cost(cost: Any, burst: int) -> int:
    """A cost the bucket can ever pay: one it can never hold would be refused forever."""
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigurationError(f"cost must be a whole number of tokens >= 1, got {cost!r}")
    if cost > burst:
        raise ConfigurationError(
            f"cost {cost} is more than the bucket holds (burst {burst}): it could never be paid"
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
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"rate-limit name {name!r} is invalid: start with a letter or '_', then up to "
                "63 letters, digits, '_', '.' or '-'"
            )
        self._client = client
        self.name = name

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


def _decision(reply: list[Any]) -> RateDecision:
    allowed, remaining, retry_after = reply
    return RateDecision(bool(allowed), float(remaining), float(retry_after))
