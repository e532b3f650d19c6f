"""Plain ASGI middleware (no per-request task or body copy, unlike Starlette's
BaseHTTPMiddleware): the body size limit, and the per-request bookkeeping — metrics
by route and status, the incoming W3C ``traceparent``."""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.gateway.problems import ErrorBody, encode
from shoal.gateway.telemetry import GatewayMetrics
from shoal.observability import tracing


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def incoming_traceparent(scope: Scope) -> str | None:
    """A well-formed W3C traceparent from the request, else None (then a new trace)."""
    raw = _header(scope, b"traceparent")
    parsed = tracing.parse_traceparent(raw.decode("latin-1") if raw else None)
    return "00-{}-{}-{}".format(*parsed) if parsed else None


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
    label set) and status, times it, and hands routes the traceparent tasks and
    messages should carry: with tracing on, that of a SERVER span for the request
    (a child of the caller's ``traceparent``); off, the caller's own."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if tracing.ENABLED:
                with tracing.http_server_span(
                    scope["method"], scope["path"], incoming_traceparent(scope)
                ) as span:
                    state["traceparent"] = span.traceparent
                    await self.app(scope, receive, observed_send)
                    span.route(_route(scope))
                    span.status(status)
            else:
                state["traceparent"] = incoming_traceparent(scope)
                await self.app(scope, receive, observed_send)
        finally:
            route = _route(scope)
            self.metrics.request(scope["method"], route, status, time.perf_counter() - started)


def _route(scope: Scope) -> str:
    """The template of the route that answered (set by the router as it matched)."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"
