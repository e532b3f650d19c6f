"""What a gateway process holds: its configuration, one Client, the key store and
the rate limiter. Nothing here is the source of truth — that is the engine — so
gateways stay stateless and any number can run behind a load balancer."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from dataclasses import dataclass, field

from fastapi import Request

from shoal.apikeys import KeyStore
from shoal.client import Client
from shoal.coordination.ratelimit import TokenBucket
from shoal.errors import ConfigurationError
from shoal.gateway.telemetry import GatewayMetrics
from shoal.gateway.waits import DEFAULT_MAX_WAITS, DEFAULT_MAX_WAITS_PER_KEY, WaitLimits

DEFAULT_MAX_BODY = 1024 * 1024  # 1 MiB: task arguments are data, not file uploads
DEFAULT_KEY_RATE = 100.0  # requests per second per key, unless the key says otherwise
DEFAULT_KEY_BURST = 200


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


@dataclass(frozen=True)
class GatewayConfig:
    """How a gateway serves. ``insecure`` allows a non-loopback bind without keys."""

    host: str = "127.0.0.1"
    port: int = 8000
    insecure: bool = False
    max_body: int = DEFAULT_MAX_BODY
    key_rate: float | None = DEFAULT_KEY_RATE  # None: keys without a rate are unlimited
    key_burst: int = DEFAULT_KEY_BURST
    dashboard: bool = True
    max_waits: int = DEFAULT_MAX_WAITS  # streams, long-polls and requests held at once
    max_waits_per_key: int = DEFAULT_MAX_WAITS_PER_KEY

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be within 0..65535, got {self.port}")
        if self.max_body < 1:
            raise ConfigurationError(f"max_body must be >= 1 byte, got {self.max_body}")
        if self.key_rate is not None and self.key_rate <= 0:
            raise ConfigurationError(f"key_rate must be > 0 requests/s, got {self.key_rate}")
        if self.key_burst < 1:
            raise ConfigurationError(f"key_burst must be >= 1, got {self.key_burst}")
        if self.max_waits < 1 or self.max_waits_per_key < 1:
            raise ConfigurationError(
                f"max_waits and max_waits_per_key must be >= 1, got {self.max_waits} and "
                f"{self.max_waits_per_key}"
            )

    @functools.cached_property
    def keys_required(self) -> bool:
        """Off loopback, every request needs a key (unless started ``--insecure``).
        Cached: it is asked on every request, and parsing the address is not free."""
        return not is_loopback(self.host) and not self.insecure


@dataclass
class GatewayState:
    config: GatewayConfig
    client: Client
    keystore: KeyStore
    bucket: TokenBucket
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    any_keys: bool = False
    any_keys_checked: float = float("-inf")
    any_keys_check: asyncio.Future[None] | None = None  # the look at the engine under way
    waits: WaitLimits = field(init=False)

    def __post_init__(self) -> None:
        self.waits = WaitLimits(self.config.max_waits, self.config.max_waits_per_key)


def gateway_state(request: Request) -> GatewayState:
    """The state of the gateway serving ``request`` (set up by the app's lifespan)."""
    state: GatewayState = request.app.state.gateway
    return state
