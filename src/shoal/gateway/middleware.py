"""Plain ASGI middleware (no per-request task or body copy, unlike Starlette's
BaseHTTPMiddleware): the body size limit, and the per-request bookkeeping — metrics
by route and status, the incoming W3C ``traceparent``."""

from __future__ import annotations

import re
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.gateway.problems import ErrorBody, encode
from shoal.gateway.telemetry import GatewayMetrics

_TRACEPARENT_RE = re.compile(rb"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def incoming_traceparent(scope: Scope) -> str | None:
    """A well-formed W3C traceparent from the request, else None (then a new trace)."""
    raw = _header(scope, b"traceparent")
    if raw is None or not _TRACEPARENT_RE.match(raw.strip().lower()):
        return None
    parts = raw.strip().lower().split(b"-")
    if parts[1] == b"0" * 32 or parts[2] == b"0" * 16:  # all-zero ids are invalid
        return None
    return raw.strip().lower().decode()


class BodyLimit:
    """413 for a body over ``max_body`` bytes: at once from Content-Length, or as
    soon as a streamed body passes the limit (nothing past it is read)."""

    def __init__(self, app: ASGIApp, max_body: int) -> None:
        self.app, self.max_body = app, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                # An HTTPException, as FastAPI answers any other error raised while it
                # reads the body with a 400 "error parsing the body".
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body is larger than the gateway's limit of {self.max_body} bytes"

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = encode(413, ErrorBody("PayloadTooLarge", self._message()))
        await response(scope, receive, send)


class Observed:
    """Counts each request by route template (not raw path: ids would explode the
    label set) and status, times it, and hands the incoming traceparent to routes."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["traceparent"] = incoming_traceparent(scope)
        started = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.request(
                scope["method"], _route(scope), status, time.perf_counter() - started
            )


def _route(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
