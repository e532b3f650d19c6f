"""Cluster state, dead letters, health and metrics."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from shoal.errors import ShoalError
from shoal.gateway import responses
from shoal.gateway.auth import Admin, Read
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import (
    CAPABILITY_PATTERN,
    Health,
    RedriveBody,
    Redriven,
    ok,
    public_dead_letter,
)
from shoal.gateway.state import gateway_state

router = APIRouter()

Capability = Annotated[str, Path(pattern=CAPABILITY_PATTERN, description="Capability name.")]
BODY_ERRORS = schema_responses(400, 413)  # routes that read a JSON body
READY_TIMEOUT_S = 2.0
log = logging.getLogger("shoal.gateway")
PROMETHEUS_TEXT: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "This gateway's metrics and the cluster's, in Prometheus' text format.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
}


@router.get(
    "/v1/cluster",
    tags=["cluster"],
    summary="Nodes, queues, agent types and partitions",
    response_class=Response,
    responses=ok("ClusterState", "The cluster as the engine sees it now.") | COMMON_ERRORS,
)
async def cluster(request: Request, caller: Read) -> Response:
    return responses.json(await gateway_state(request).client.cluster())


@router.get(
    "/v1/dead-letters/{capability}",
    tags=["dead letters"],
    summary="Dead-lettered tasks of a capability",
    response_class=Response,
    responses=ok("DeadLetter", "Dead tasks, oldest first.", array=True) | COMMON_ERRORS,
)
async def dead_letters(
    capability: Capability,
    request: Request,
    caller: Read,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Response:
    dead = await gateway_state(request).client.dead_letters(capability, limit)
    return responses.json([public_dead_letter(d) for d in dead])


@router.post(
    "/v1/dead-letters/{capability}/redrive",
    tags=["dead letters"],
    summary="Queue dead tasks again",
    response_class=Response,
    responses=ok("Redriven", "The tasks queued again.")
    | schema_responses(404)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def redrive(
    capability: Capability, body: RedriveBody, request: Request, caller: Admin
) -> Response:
    """Queue the given dead tasks (or all of the capability's) again with fresh
    attempts. An id that is not in the dead-letter queue is a 404 and nothing moves."""
    redriven = await gateway_state(request).client.redrive(capability, body.task_ids)
    return responses.json(Redriven(redriven))


@router.get(
    "/metrics",
    tags=["health"],
    summary="Prometheus metrics",
    response_class=Response,
    responses=PROMETHEUS_TEXT | COMMON_ERRORS,
)
async def metrics(request: Request, caller: Read) -> Response:
    """The gateway's own metrics (HTTP requests, rate limiting, submissions) and
    cluster-wide gauges read from the engine now (queues, nodes, partitions)."""
    state = gateway_state(request)
    body, content_type = await state.metrics.exposition(state.client, state.waits.held)
    return Response(body, media_type=content_type)


@router.get(
    "/healthz",
    tags=["health"],
    summary="The gateway process is up",
    response_class=Response,
    responses=ok("Health", "Always ok while the process serves."),
)
async def healthz() -> Response:
    return responses.json(Health("ok"))


@router.get(
    "/readyz",
    tags=["health"],
    summary="The gateway can serve: the engine answers",
    response_class=Response,
    responses=ok("Health", "Ready.") | {503: ok("Health", "Not ready.")[200]},
)
async def readyz(request: Request) -> Response:
    """200 when the engine answers a PING within 2 s; 503 (with the reason) when not,
    so a load balancer sends traffic to other gateways meanwhile."""
    client = gateway_state(request).client
    try:
        async with asyncio.timeout(READY_TIMEOUT_S), client.errors():
            await client.redis.ping()
    except (ShoalError, TimeoutError) as exc:
        # The reason, without the engine's address (this route needs no key): the
        # gateway's log has the whole message.
        log.warning("not ready: %s", exc or "the engine did not answer in time")
        return responses.json(Health("unavailable", _reason(exc)), status=503)
    return responses.json(Health("ready"))


def _reason(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"the engine did not answer within {READY_TIMEOUT_S:g}s"
    return f"the engine is unavailable ({type(exc).__name__})"
