"""/v1/tasks: submit, inspect, wait for, cancel, list and follow tasks."""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from shoal.errors import (
    EngineError,
    EngineUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskFailed,
)
from shoal.gateway import responses, sse
from shoal.gateway.auth import Caller, Read, Submit
from shoal.gateway.problems import COMMON_ERRORS, ApiError, schema_responses
from shoal.gateway.schemas import (
    CAPABILITY_PATTERN,
    MAX_WAIT_S,
    Cancelled,
    Submitted,
    TaskResult,
    TaskSubmission,
    ok,
    public_page,
    public_task,
)
from shoal.gateway.state import GatewayState, gateway_state
from shoal.options import TaskOptions
from shoal.protocol import STATUSES
from shoal.tasklist import MAX_LIMIT

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
log = logging.getLogger("shoal.gateway")

TASK_ID = r"^[0-9a-f]{28}$"
# An event's stream id, ms-seq: at most 19 digits a part, so it fits the engine's
# 64-bit numbers (a longer one was an engine error, a 500, instead of a 422).
EVENT_ID_PATTERN = r"^\d{1,19}-\d{1,19}$"
TaskId = Annotated[str, Path(pattern=TASK_ID, description="A task id (28 hex digits).")]
Wait = Annotated[
    float | None,
    Query(ge=0, le=MAX_WAIT_S, description="Wait up to this many seconds for the task to end."),
]
# One SSE event as a client parses it; ``data`` is an Event as JSON (or, for an
# ``error`` event, an ErrorBody's type and message).
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "description": "Resume after this event (Last-Event-ID)."},
        "event": {"type": "string", "description": "The event's kind, or 'error'."},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["data"],
}
EVENTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The task's events as SSE; `id` resumes after the event, the data "
        "is an Event; the stream ends after the 'done' event.",
        "content": {"text/event-stream": {"schema": SSE_EVENT}},
    },
    204: {"description": "Resumed after the last event of a task that has ended."},
}
BODY_ERRORS = schema_responses(400, 413)  # routes that read a JSON body


async def task_result(state: GatewayState, task_id: str, wait: float | None) -> TaskResult:
    """The task, after waiting up to ``wait`` seconds for it to end."""
    client = state.client
    result: Any = None
    if wait:
        # On a failure, a cancel or the end of the wait, the record says how it ended
        # (or that it goes on).
        with contextlib.suppress(TaskFailed, TaskCancelled, ResultTimeout):
            result = await client.result(task_id, timeout=wait)
    info = await client.status(task_id)
    if info.status == "succeeded" and result is None and info.has_result:
        result = await client.result(task_id)
    return TaskResult(public_task(info), result)


def _scoped(caller: Caller, idempotency_key: str | None) -> str | None:
    """Idempotency keys are per API key: two callers' 'invoice-42' are two tasks, and
    a key with only the submit scope cannot reach another caller's task (and its
    result) by guessing its idempotency key."""
    if idempotency_key is None or caller.key is None:
        return idempotency_key
    return f"{caller.key.id}:{idempotency_key}"


@router.post(
    "",
    summary="Submit a task",
    status_code=201,
    response_class=Response,
    responses=ok("Submitted", "The task is queued.", status=201)
    | schema_responses(404)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def submit_task(
    body: TaskSubmission, request: Request, caller: Submit, wait: Wait = None
) -> Response:
    """Queue a task. With ``?wait=seconds`` the answer also carries the task after
    waiting for it to end (or the wait to run out: then ``outcome.task.status`` says
    where it is). A full queue is a 503 with Retry-After: nothing was queued."""
    state = gateway_state(request)
    options = TaskOptions.build(
        priority=body.priority, delay=body.delay, eta=body.eta, timeout=body.timeout,
        deadline=body.deadline, max_attempts=body.max_attempts,
        idempotency_key=_scoped(caller, body.idempotency_key),
    )  # fmt: skip
    # The arguments go as a mapping, never as keywords of submit(): a handler may
    # well take 'timeout' or 'priority', and '_parent' must not be settable from HTTP.
    # The task is charged to the caller's key (its id, never the secret).
    handle = await state.client.submit_arguments(
        body.capability, body.args, options, agent=body.agent,
        _traceparent=request.state.traceparent,
        _submitted_by=caller.key.id if caller.key is not None else None,
    )  # fmt: skip
    state.metrics.submitted(body.capability)
    outcome = await _outcome_after(state, caller, handle.id, wait) if wait is not None else None
    return responses.json(
        Submitted(handle.id, existing=not handle.is_new, outcome=outcome),
        status=201,
        headers={"Location": f"/v1/tasks/{handle.id}"},
    )


async def _outcome_after(
    state: GatewayState, caller: Caller, task_id: str, wait: float
) -> TaskResult | None:
    """The task after the wait. It is queued already, so nothing here may turn the
    answer into an error that loses its id (a retry would queue it twice): a wait
    the gateway cannot hold answers the task as it is now, and an engine failure
    during the wait answers no outcome — the id lets the caller ask again."""
    try:
        slot = state.waits.take(caller.label)
    except ApiError:
        slot = None
    try:
        if slot is None:
            return await task_result(state, task_id, None)
        async with slot:
            return await task_result(state, task_id, wait)
    except (EngineUnavailable, EngineError) as exc:
        log.warning("task %s queued, but waiting for it failed: %s", task_id, exc)
        return None


@router.get(
    "",
    summary="List tasks",
    response_class=Response,
    responses=ok("TaskPage", "Tasks, newest first.") | COMMON_ERRORS,
)
async def list_tasks(
    request: Request,
    caller: Read,
    capability: Annotated[str | None, Query(pattern=CAPABILITY_PATTERN)] = None,
    status: Annotated[
        str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$", description="Status.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
    cursor: Annotated[
        str | None, Query(pattern=TASK_ID, description="A page's `next`: continue after it.")
    ] = None,
) -> Response:
    """Tasks created within the retention period, newest first. Pass ``next`` back
    as ``cursor`` for the following page (null: nothing older)."""
    page = await gateway_state(request).client.list_tasks(
        capability=capability, status=status, limit=limit, cursor=cursor
    )
    return responses.json(public_page(page))


@router.get(
    "/{task_id}",
    summary="Get a task",
    response_class=Response,
    responses=ok("TaskResult", "The task and its result.") | schema_responses(404) | COMMON_ERRORS,
)
async def get_task(task_id: TaskId, request: Request, caller: Read, wait: Wait = None) -> Response:
    """Status, attempts, timing, error history and, once it succeeded, the result.
    ``?wait=seconds`` long-polls: the answer comes when the task ends or the wait
    runs out, whichever is first."""
    state = gateway_state(request)
    if not wait:
        return responses.json(await task_result(state, task_id, wait))
    async with state.waits.take(caller.label):
        return responses.json(await task_result(state, task_id, wait))


@router.post(
    "/{task_id}/cancel",
    summary="Cancel a task",
    response_class=Response,
    responses=ok("Cancelled", "What the cancel did.") | schema_responses(404) | COMMON_ERRORS,
)
async def cancel_task(task_id: TaskId, request: Request, caller: Submit) -> Response:
    """'cancelled' (it had not started and never will), 'cancelling' (it runs: it
    ends 'cancelled'), or 'already_<status>' if it had ended."""
    return responses.json(Cancelled(await gateway_state(request).client.cancel(task_id)))


@router.get(
    "/{task_id}/events",
    summary="Follow a task's events (Server-Sent Events)",
    response_class=StreamingResponse,
    responses=EVENTS_RESPONSES | schema_responses(404) | COMMON_ERRORS,
)
async def task_events(
    task_id: TaskId,
    request: Request,
    caller: Read,
    last_event_id: Annotated[
        str | None,
        Header(pattern=EVENT_ID_PATTERN, description="Resume after this event (SSE reconnect)."),
    ] = None,
    after: Annotated[
        str | None, Query(pattern=EVENT_ID_PATTERN, description="Resume after this event id.")
    ] = None,
) -> Response:
    """Every event of the task in order, live until it ends. Reconnecting with
    ``Last-Event-ID`` (or ``?after=``) continues after that event: each event is
    delivered once, even when the node running the task died and another took over."""
    state = gateway_state(request)
    resume = last_event_id or after
    info = await state.client.status(task_id)  # 404 now, not after the stream has begun
    if resume and info.done and not await state.client.event_history(task_id, resume):
        # Nothing follows and nothing will: 204 tells an EventSource to stop
        # reconnecting (it reconnects after any normal end of a stream).
        return Response(status_code=204)
    slot = state.waits.take(caller.label)
    return StreamingResponse(
        sse.stream(state.client, task_id, resume, on_end=slot.release),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        background=BackgroundTask(slot.release),  # also if the stream never started
    )
