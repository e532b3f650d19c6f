"""/v1/keys: API keys, for holders of the admin scope."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from shoal.gateway import responses
from shoal.gateway.auth import Admin
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import KeyRequest, ok
from shoal.gateway.state import gateway_state

router = APIRouter(prefix="/v1/keys", tags=["keys"])
BODY_ERRORS = schema_responses(400, 413)  # routes that read a JSON body


@router.get(
    "",
    summary="List API keys",
    response_class=Response,
    responses=ok("ApiKey", "The keys (never their secrets).", array=True) | COMMON_ERRORS,
)
async def list_keys(request: Request, caller: Admin) -> Response:
    return responses.json(await gateway_state(request).keystore.list())


@router.post(
    "",
    summary="Create an API key",
    status_code=201,
    response_class=Response,
    responses=ok("CreatedKey", "The key and its secret, shown this once.", status=201)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def create_key(body: KeyRequest, request: Request, caller: Admin) -> Response:
    """The secret is in this answer only: the engine keeps a hash of it."""
    created = await gateway_state(request).keystore.create(
        body.name, body.scopes, rate=body.rate, burst=body.burst
    )
    return responses.json(created, status=201)


@router.delete(
    "/{key}",
    summary="Revoke an API key",
    response_class=Response,
    responses=ok("ApiKey", "The revoked key.") | schema_responses(404) | COMMON_ERRORS,
)
async def revoke_key(
    key: Annotated[str, Path(min_length=1, max_length=64, description="Key id or name.")],
    request: Request,
    caller: Admin,
) -> Response:
    """Effective at once on every gateway: each request reads its key from the engine."""
    return responses.json(await gateway_state(request).keystore.revoke(key))
