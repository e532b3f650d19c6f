"""/v1/sagas: list sagas, show one with its steps and log, cancel one, retry the
compensations of one stuck in compensation_failed.

Sagas are started from code (``client.sagas.start``, or a handler's
``self.ctx.sagas``): a saga's steps name capabilities and arguments the
application owns. Reading needs the ``read`` scope; cancelling, ``submit`` (as
cancelling a task does); retrying compensations, ``admin`` (an operator's act).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from shoal.coordination.saga import STATUSES
from shoal.gateway import responses
from shoal.gateway.auth import Admin, Read, Submit
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import Cancelled, ok
from shoal.gateway.state import gateway_state

router = APIRouter(prefix="/v1/sagas", tags=["sagas"])

SAGA_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
SagaId = Annotated[str, Path(pattern=SAGA_ID_PATTERN, description="A saga id.")]
STATUS_PATTERN = "^(" + "|".join(STATUSES) + ")$"
NOT_FOUND = schema_responses(404)


@router.get(
    "",
    summary="List sagas",
    response_class=Response,
    responses=ok("SagaInfo", "Sagas newest first, with their steps (no logs).", array=True)
    | COMMON_ERRORS,
)
async def list_sagas(
    request: Request,
    caller: Read,
    status: Annotated[
        str | None, Query(pattern=STATUS_PATTERN, description="Only sagas in this status.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 50,
) -> Response:
    sagas = await gateway_state(request).client.sagas.list(status=status, limit=limit)
    return responses.json(sagas)


@router.get(
    "/{saga_id}",
    summary="A saga with its steps and log",
    response_class=Response,
    responses=ok("SagaInfo", "The saga, its steps and every transition of its log.")
    | NOT_FOUND
    | COMMON_ERRORS,
)
async def get_saga(saga_id: SagaId, request: Request, caller: Read) -> Response:
    return responses.json(await gateway_state(request).client.sagas.get(saga_id))


@router.post(
    "/{saga_id}/cancel",
    summary="Cancel a saga",
    response_class=Response,
    responses=ok("Cancelled", "What the cancel did.") | NOT_FOUND | COMMON_ERRORS,
)
async def cancel_saga(saga_id: SagaId, request: Request, caller: Submit) -> Response:
    """'cancelling' (its running step is cancelled and the steps that completed, or
    may have, are compensated: it ends 'cancelled'), or 'already_<status>' if it
    had ended."""
    return responses.json(Cancelled(await gateway_state(request).client.sagas.cancel(saga_id)))


@router.post(
    "/{saga_id}/retry-compensation",
    summary="Retry a stuck saga's compensations",
    response_class=Response,
    responses=ok("Cancelled", "{'outcome': 'retrying'}.") | NOT_FOUND | COMMON_ERRORS,
)
async def retry_compensation(saga_id: SagaId, request: Request, caller: Admin) -> Response:
    """For a saga in compensation_failed (after its cause was fixed): its failed
    compensation runs again, then the earlier ones; 422 for a saga in any other
    status."""
    outcome = await gateway_state(request).client.sagas.retry_compensation(saga_id)
    return responses.json(Cancelled(outcome))
