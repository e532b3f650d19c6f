"""Errors as HTTP answers: one JSON shape, a status a client can act on, and never a
stack trace. An unexpected failure is a 500 whose error id is also in the log, so an
operator can find the traceback a user reports."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal import errors
from shoal.coordination.config import ConfigConflict, ConfigNotSet
from shoal.registry import UnknownService

log = logging.getLogger("shoal.gateway")


class ErrorBody(msgspec.Struct, frozen=True):
    """What went wrong. ``type`` is stable (an error class name); ``message`` is for
    people; ``id`` is set on server errors and is in the gateway's log too."""

    type: str
    message: str
    id: str | None = None
    field: str | None = None  # for validation errors: the field at fault (a dotted path)


class ErrorResponse(msgspec.Struct, frozen=True):
    error: ErrorBody


class ApiError(Exception):
    """Raised by routes for an answer that is not a Shoal error (401, 403, 413, 429 ...)."""

    def __init__(
        self, status: int, type_: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


# Shoal errors a caller can act on, by the status that says so; checked in order
# (subclasses before their bases). Anything else is a 500.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (errors.ReplicationTimeout, 503),
    (errors.QueueFull, 503),
    (errors.EngineUnavailable, 503),
    (errors.NotHosted, 503),
    (errors.TaskNotFound, 404),
    (errors.UnknownAgentType, 404),
    (errors.KeyNotFound, 404),
    (errors.SagaNotFound, 404),
    (UnknownService, 404),
    (ConfigNotSet, 404),
    (ConfigConflict, 409),
    (errors.RequestTimeout, 504),
    (errors.RequestFailed, 502),
    (errors.SerializationError, 422),
    (errors.ConfigurationError, 422),
)
RETRY_AFTER_S = {503: "1"}  # back-pressure and outages: worth trying again shortly


def encode(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(ErrorResponse(body)),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def status_of(exc: Exception) -> int | None:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return None


async def shoal_error(request: Request, exc: Exception) -> Response:
    status = status_of(exc)
    if status is None:
        return await unexpected_error(request, exc)
    headers = {"Retry-After": RETRY_AFTER_S[status]} if status in RETRY_AFTER_S else None
    return encode(status, ErrorBody(type(exc).__name__, str(exc)), headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return encode(exc.status, ErrorBody(exc.type, exc.message), exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own answers (unknown route, wrong method) in our shape."""
    assert isinstance(exc, StarletteHTTPException)
    names = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge"}
    return encode(
        exc.status_code,
        ErrorBody(names.get(exc.status_code, "HTTPError"), str(exc.detail)),
        dict(exc.headers) if exc.headers else None,
    )


async def validation_error(request: Request, exc: Exception) -> Response:
    """422 naming the first field at fault, e.g. ``body.priority: Input should be ...``."""
    assert isinstance(exc, RequestValidationError)
    first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid request")
    text = f"{field}: {message}" if field else message
    more = len(exc.errors()) - 1
    if more > 0:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return encode(422, ErrorBody("ValidationError", text, field=field or None))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    error_id = uuid.uuid4().hex[:16]
    log.error(
        "error %s on %s %s", error_id, request.method, request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )  # fmt: skip
    return encode(
        500,
        ErrorBody(
            "InternalError",
            f"the gateway failed on this request; quote error id {error_id} to the operator",
            id=error_id,
        ),
    )


def schema_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give."""
    described = {
        400: "The body is not JSON text (e.g. not UTF-8).",
        401: "No API key, or an unknown or revoked one.",
        403: "The API key lacks the scope this route needs.",
        404: "No such task, agent type, key, dead letter or service instance.",
        409: "The setting is not at the version the request expected.",
        413: "The request body is larger than the gateway accepts.",
        422: "A field is invalid; the message names it.",
        429: "The API key's rate limit, or its share of waiting requests, is reached; "
        "see Retry-After.",
        500: "The gateway failed; the error id is in its log.",
        502: "The agent failed the request.",
        503: "The engine is unavailable, the queue is full, or the gateway holds all the "
        "waiting requests it may; see Retry-After.",
        504: "The agent did not answer in time.",
    }
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        s: {"description": described[s], "content": {"application/json": {"schema": ref}}}
        for s in statuses
    }


# What every /v1 route may answer besides its own: auth, validation, rate limit,
# server error, engine outage.
COMMON_ERRORS = schema_responses(401, 403, 422, 429, 500, 503)
