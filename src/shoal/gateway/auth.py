"""Who is calling, and may they: API keys with scopes, and per-key rate limits.

Keys live in the engine (shoal.apikeys), and every request reads its key from there:
a revoked key stops working at once on every gateway, with no cache to expire.
Rate limits are token buckets in the engine too (shoal.coordination.ratelimit), so
all gateways behind a load balancer share one budget per key.

When no key exists, a gateway on the loopback interface is open (everything a local
process could do with the engine directly anyway); once a key exists, every request
needs one. A gateway bound to another interface always needs keys, unless it was
started with ``--insecure``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from shoal.apikeys import SCOPES, ApiKey
from shoal.gateway.problems import ApiError
from shoal.gateway.state import GatewayState, gateway_state, is_loopback

ANY_KEYS_TTL_S = 1.0  # how long "are there keys at all?" is remembered (open mode only)
ANONYMOUS = "anonymous"

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key, as an alternative header."
)

HOW_TO_CREATE = "create one with: shoal keys create --name NAME --scopes read,submit"


class Caller:
    """The authenticated caller of one request (``key`` None: an open gateway)."""

    def __init__(self, key: ApiKey | None) -> None:
        self.key = key

    @property
    def label(self) -> str:
        return self.key.id if self.key else ANONYMOUS

    def has(self, scope: str) -> bool:
        return self.key is None or scope in self.key.scopes


async def keys_enforced(state: GatewayState) -> bool:
    """Whether requests need a key. On loopback that is "does any key exist?",
    remembered for ANY_KEYS_TTL_S; when it is stale, the requests of that moment
    share one look at the engine (one in-flight check, not one per request)."""
    if state.config.keys_required:
        return True
    if time.monotonic() - state.any_keys_checked > ANY_KEYS_TTL_S:
        if state.any_keys_check is None or state.any_keys_check.done():
            state.any_keys_check = asyncio.ensure_future(_look_for_keys(state))
        await asyncio.shield(state.any_keys_check)
    return state.any_keys


async def _look_for_keys(state: GatewayState) -> None:
    """Stamped after the answer: while the first look runs, nobody passes unchecked."""
    state.any_keys = await state.keystore.required()
    state.any_keys_checked = time.monotonic()


def _presented(
    credentials: HTTPAuthorizationCredentials | None, header_key: str | None
) -> str | None:
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    return header_key


def _loopback_name(authority: str) -> bool:
    """Whether a Host header (or an Origin's host) names this machine's loopback."""
    host = authority.rsplit("@", 1)[-1]
    if host.startswith("["):  # [::1]:8000
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.lower() == "localhost" or is_loopback(host)


def _check_open_request(request: Request) -> None:
    """An open gateway (no keys) answers only requests addressed to loopback: a web
    page the user visits can point its own domain at 127.0.0.1 (DNS rebinding) and
    would otherwise drive the cluster from the user's browser."""
    host = request.headers.get("host", "")
    origin = request.headers.get("origin")
    origin_host = origin.split("://", 1)[-1] if origin and origin != "null" else None
    if not _loopback_name(host) or (origin_host is not None and not _loopback_name(origin_host)):
        raise ApiError(
            403, "Forbidden",
            "this gateway has no API keys, so it only answers requests addressed to "
            f"localhost (Host {host!r}); {HOW_TO_CREATE}",
        )  # fmt: skip


async def _authenticate(request: Request, state: GatewayState, presented: str | None) -> Caller:
    if not await keys_enforced(state):
        if not state.config.insecure:
            _check_open_request(request)
        return Caller(None)
    if not presented:
        raise ApiError(
            401, "Unauthorized",
            f"an API key is required: send 'Authorization: Bearer <key>'; {HOW_TO_CREATE}",
            {"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    key = await state.keystore.authenticate(presented)
    if key is None:
        raise ApiError(
            401, "Unauthorized", "unknown or revoked API key", {"WWW-Authenticate": "Bearer"}
        )
    return Caller(key)


async def _rate_limit(state: GatewayState, caller: Caller) -> None:
    key = caller.key
    if key is None:
        return
    rate = key.rate if key.rate is not None else state.config.key_rate
    if rate is None:
        return
    if key.burst is not None:
        burst = key.burst
    elif key.rate is not None:  # a key with a rate of its own: a second's worth at once
        burst = max(1, math.ceil(key.rate))
    else:
        burst = state.config.key_burst
    decision = await state.bucket.take(key.id, rate=rate, burst=burst)
    if not decision.allowed:
        state.metrics.rate_limited(key.id)
        wait = max(1, math.ceil(decision.retry_after))
        raise ApiError(
            429, "RateLimited",
            f"rate limit of key {key.name!r} reached ({rate:g} requests/s, burst "
            f"{burst}); retry after {wait}s",
            {"Retry-After": str(wait)},
        )  # fmt: skip


def require(scope: str) -> Callable[..., Awaitable[Caller]]:
    """A route dependency: the caller must hold ``scope`` (and be within its rate)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        header_key: Annotated[str | None, Depends(api_key_header)],
    ) -> Caller:
        state = gateway_state(request)
        caller = await _authenticate(request, state, _presented(credentials, header_key))
        if not caller.has(scope):
            assert caller.key is not None
            raise ApiError(
                403, "Forbidden",
                f"API key {caller.key.name!r} lacks the {scope!r} scope (it has: "
                f"{', '.join(caller.key.scopes)})",
            )  # fmt: skip
        await _rate_limit(state, caller)
        request.state.caller = caller
        return caller

    return dependency


Read = Annotated[Caller, Depends(require("read"))]
Submit = Annotated[Caller, Depends(require("submit"))]
Message = Annotated[Caller, Depends(require("message"))]
Admin = Annotated[Caller, Depends(require("admin"))]
