"""/v1/services: the service registry (shoal.registry) over HTTP.

For what cannot link Shoal: a model server or tool API registers itself with a TTL
and heartbeats (every ttl/3; a 404 says it expired, so register again), and an
operator looks at instances and drains one before it stops. Reading needs the
``read`` scope; changing the registry, ``admin``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from shoal.errors import ConfigurationError
from shoal.gateway import responses
from shoal.gateway.auth import Admin, Read
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import (
    INSTANCE_ID_PATTERN,
    SERVICE_NAME_PATTERN,
    ZONE_PATTERN,
    InstanceRegistration,
    StatusChange,
    ok,
)
from shoal.gateway.state import gateway_state
from shoal.registry import InstanceState, Registry, Status, UnknownService

router = APIRouter(prefix="/v1/services", tags=["services"])

ServiceName = Annotated[str, Path(pattern=SERVICE_NAME_PATTERN, description="Service name.")]
InstanceId = Annotated[str, Path(pattern=INSTANCE_ID_PATTERN, description="Instance id.")]
BODY_ERRORS = schema_responses(400, 413)  # routes that read a JSON body
NOT_FOUND = schema_responses(404)


def _no_content(description: str) -> dict[int | str, dict[str, Any]]:
    return {204: {"description": description}}


def _registry(request: Request) -> Registry:
    return gateway_state(request).client.registry


def _service(name: str, states: list[InstanceState]) -> dict[str, Any]:
    return {"name": name, "instances": [s.describe() for s in states]}


def _missing(name: str, instance_id: str, hint: str = "") -> UnknownService:
    return UnknownService(f"service {name!r} has no instance {instance_id!r}{hint}")


async def _state(registry: Registry, name: str, instance_id: str) -> InstanceState:
    """One instance as stored now, with its health."""
    for state in await registry.instances(name):
        if state.id == instance_id:
            return state
    raise _missing(name, instance_id)


def parse_meta(pairs: list[str] | None) -> dict[str, str]:
    """``?meta=key:value`` filters (the value may contain ':')."""
    wanted: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise ConfigurationError(f"meta filter {pair!r:.80} is not key:value (e.g. model:qwen)")
        wanted[key] = value
    return wanted


@router.get(
    "",
    summary="List services and their instances",
    response_class=Response,
    responses=ok("Service", "Every service with an instance, by name.", array=True) | COMMON_ERRORS,
)
async def list_services(request: Request, caller: Read) -> Response:
    registry = _registry(request)
    found = []
    for name in await registry.services():
        states = await registry.instances(name)  # drops expired instances
        if states:
            found.append(_service(name, states))
    return responses.json(found)


@router.get(
    "/{name}",
    summary="A service's instances",
    response_class=Response,
    responses=ok("Service", "The instances that match the filters (maybe none).")
    | NOT_FOUND
    | COMMON_ERRORS,
)
async def get_service(
    name: ServiceName,
    request: Request,
    caller: Read,
    zone: Annotated[str | None, Query(pattern=ZONE_PATTERN, description="Only this zone.")] = None,
    status: Annotated[
        Status | None, Query(description="Only instances with this effective status.")
    ] = None,
    meta: Annotated[
        list[str] | None,
        Query(description="key:value; only instances with this metadata (repeatable)."),
    ] = None,
) -> Response:
    """404 if the service has no instance at all; filters that match none answer an
    empty list, so a caller can tell "unknown service" from "none in zone eu"."""
    wanted = parse_meta(meta)
    states = await _registry(request).instances(name)
    if not states:
        raise UnknownService(f"service {name!r} has no registered instance")
    return responses.json(_service(name, [s for s in states if s.matches(zone, status, wanted)]))


@router.post(
    "/{name}/instances",
    summary="Register an instance",
    status_code=201,
    response_class=Response,
    responses=ok("ServiceInstance", "The instance as registered.", status=201)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def register(
    name: ServiceName, body: InstanceRegistration, request: Request, caller: Admin
) -> Response:
    """Registering an id again updates it. With a ``ttl`` (30 s unless given) the
    instance expires unless heartbeated; ``"ttl": null`` makes it static."""
    registry = _registry(request)
    instance = await registry.register(
        name, body.url, id=body.id, zone=body.zone, weight=body.weight,
        metadata=body.metadata, status=body.status, ttl=body.ttl,
    )  # fmt: skip
    return responses.json((await _state(registry, name, instance.id)).describe(), status=201)


@router.put(
    "/{name}/instances/{instance_id}/heartbeat",
    summary="Heartbeat an instance",
    status_code=204,
    response_class=Response,
    responses=_no_content("Its TTL starts again.") | NOT_FOUND | COMMON_ERRORS,
)
async def heartbeat(
    name: ServiceName, instance_id: InstanceId, request: Request, caller: Admin
) -> Response:
    """404 once it expired or was deregistered: the registrant registers it again."""
    registry = _registry(request)
    hint = (
        f" (it expired or was deregistered): register it again, POST /v1/services/{name}/instances"
    )
    try:
        instance = await registry.instance(name, instance_id)
    except UnknownService:
        raise _missing(name, instance_id, hint) from None
    if not await registry.heartbeat(instance):
        raise _missing(name, instance_id, hint)
    return Response(status_code=204)


@router.put(
    "/{name}/instances/{instance_id}/status",
    summary="Set an instance's status",
    response_class=Response,
    responses=ok("ServiceInstance", "The instance with its new status.")
    | NOT_FOUND
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def set_status(
    name: ServiceName, instance_id: InstanceId, body: StatusChange, request: Request, caller: Admin
) -> Response:
    """E.g. ``draining`` before a replica stops: callers stop picking it within a second."""
    registry = _registry(request)
    await registry.set_status(name, instance_id, body.status)
    return responses.json((await _state(registry, name, instance_id)).describe())


@router.delete(
    "/{name}/instances/{instance_id}",
    summary="Deregister an instance",
    status_code=204,
    response_class=Response,
    responses=_no_content("It is gone; callers stop picking it within a second.")
    | NOT_FOUND
    | COMMON_ERRORS,
)
async def deregister(
    name: ServiceName, instance_id: InstanceId, request: Request, caller: Admin
) -> Response:
    if not await _registry(request).deregister(name, instance_id):
        raise _missing(name, instance_id)
    return Response(status_code=204)
