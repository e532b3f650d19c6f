"""/v1/agents and /v1/topics: the agent directory, agents' state, messages,
requests and topic publishing."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from shoal.errors import UnknownAgentType
from shoal.gateway import responses
from shoal.gateway.auth import Message, Read
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import (
    CAPABILITY_PATTERN,
    AgentState,
    Delivered,
    MessageBody,
    PublishBody,
    Published,
    Reply,
    RequestBody,
    ok,
)
from shoal.gateway.state import gateway_state

router = APIRouter(tags=["agents"])

AgentType = Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,63}$", description="Agent type.")]
AgentKey = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:@+=-]{1,200}$", description="Agent key.")]
BODY_ERRORS = schema_responses(400, 413)  # routes that read a JSON body


@router.get(
    "/v1/agents",
    summary="The agent directory",
    response_class=Response,
    responses=ok("AgentInfo", "Agents, active and/or with state.", array=True) | COMMON_ERRORS,
)
async def list_agents(
    request: Request,
    caller: Read,
    type: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = None,
    capability: Annotated[str | None, Query(pattern=CAPABILITY_PATTERN)] = None,
    active: bool | None = None,
    with_state: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Agents active on a node and/or with saved state, filtered by type, capability
    and those two facts."""
    found = await gateway_state(request).client.agents(
        type, capability=capability, active=active, with_state=with_state, limit=limit
    )
    return responses.json(found)


@router.get(
    "/v1/agent-types",
    summary="Registered agent types",
    response_class=Response,
    responses=ok("AgentTypeInfo", "The agent types nodes host.", array=True) | COMMON_ERRORS,
)
async def agent_types(request: Request, caller: Read) -> Response:
    types = await gateway_state(request).client.agent_types()
    return responses.json(sorted(types.values(), key=lambda t: t.name))


@router.get(
    "/v1/agents/{agent_type}/{key}",
    summary="One agent",
    response_class=Response,
    responses=ok("AgentInfo", "Where the agent is active, and its state's size.")
    | schema_responses(404)
    | COMMON_ERRORS,
)
async def get_agent(
    agent_type: AgentType, key: AgentKey, request: Request, caller: Read
) -> Response:
    return responses.json(await gateway_state(request).client.agent(f"{agent_type}/{key}"))


@router.get(
    "/v1/agents/{agent_type}/{key}/state",
    summary="An agent's saved state",
    response_class=Response,
    responses=ok("AgentState", "The state as last saved (null: none).")
    | schema_responses(404)
    | COMMON_ERRORS,
)
async def agent_state(
    agent_type: AgentType, key: AgentKey, request: Request, caller: Read
) -> Response:
    """The state, or null if the agent has none; 404 for a type no node has hosted
    (as for the agent itself: the client reads state of any type without asking)."""
    client, agent_id = gateway_state(request).client, f"{agent_type}/{key}"
    known = await client.agent_types()
    if agent_type not in known:
        raise UnknownAgentType(
            f"no node has hosted agent type {agent_type!r} (known types: "
            f"{', '.join(sorted(known)) or 'none yet'})"
        )
    return responses.json(AgentState(agent_id, await client.agent_state(agent_id)))


@router.post(
    "/v1/agents/{agent_type}/{key}/messages",
    summary="Send a message to an agent",
    status_code=202,
    response_class=Response,
    responses=ok("Delivered", "In the agent's mailbox.", status=202)
    | schema_responses(404)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def send_message(
    agent_type: AgentType, key: AgentKey, body: MessageBody, request: Request, caller: Message
) -> Response:
    """Fire and forget: the agent's handler gets it in turn, on whichever node owns
    it. A full mailbox is a 503 (nothing was written)."""
    await gateway_state(request).client.send(
        f"{agent_type}/{key}", body.message, _traceparent=request.state.traceparent
    )
    return responses.json(Delivered(), status=202)


@router.post(
    "/v1/agents/{agent_type}/{key}/requests",
    summary="Send a request to an agent and wait for its reply",
    response_class=Response,
    responses=ok("Reply", "The agent's reply.")
    | schema_responses(404, 502, 504)
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def send_request(
    agent_type: AgentType, key: AgentKey, body: RequestBody, request: Request, caller: Message
) -> Response:
    state = gateway_state(request)
    async with state.waits.take(caller.label):
        reply = await state.client.request(
            f"{agent_type}/{key}", body.message, timeout=body.timeout,
            _traceparent=request.state.traceparent,
        )  # fmt: skip
    return responses.json(Reply(reply))


@router.post(
    "/v1/topics/{topic}/messages",
    summary="Publish to a topic",
    response_class=Response,
    responses=ok("Published", "How many subscribed agent types got it.")
    | BODY_ERRORS
    | COMMON_ERRORS,
)
async def publish(
    topic: Annotated[str, Path(pattern=CAPABILITY_PATTERN, description="Topic name.")],
    body: PublishBody,
    request: Request,
    caller: Message,
) -> Response:
    """Durable fan-out: the agent keyed ``source`` of every agent type subscribed to
    the topic gets the message in its mailbox."""
    count = await gateway_state(request).client.publish(
        topic, body.message, source=body.source, _traceparent=request.state.traceparent
    )
    return responses.json(Published(count))
