"""The gateway's HTTP contract, endpoint by endpoint and error by error, against a real
engine, real nodes and a real gateway on a real socket.

Every JSON answer any test here gets is checked on the way (``checked`` below): it
never holds a traceback, its status is one the OpenAPI document lists for the route,
and its body validates against the schema documented for that status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis

from shoal import Client, Settings
from shoal.apikeys import KeyStore
from shoal.engine import EmbeddedEngine
from shoal.gateway import GatewayConfig, create_app
from shoal.node import Node
from tests.agents import Toolbox
from tests.conftest import eventually, running_node
from tests.gateways import api_routes, bearer, gateway_process, read_sse, serving
from tests.stateful import Counter, Relay

OPENAPI = create_app(Settings()).openapi()
SCHEMA = schemathesis.openapi.from_dict(OPENAPI)

# The contract: every route of the API. The OpenAPI document must list exactly these
# (a route added without a test fails test_openapi_lists_every_route).
ROUTES = {
    ("POST", "/v1/tasks"), ("GET", "/v1/tasks"), ("GET", "/v1/tasks/{task_id}"),
    ("POST", "/v1/tasks/{task_id}/cancel"), ("GET", "/v1/tasks/{task_id}/events"),
    ("GET", "/v1/agents"), ("GET", "/v1/agent-types"), ("GET", "/v1/agents/{agent_type}/{key}"),
    ("GET", "/v1/agents/{agent_type}/{key}/state"),
    ("POST", "/v1/agents/{agent_type}/{key}/messages"),
    ("POST", "/v1/agents/{agent_type}/{key}/requests"), ("POST", "/v1/topics/{topic}/messages"),
    ("GET", "/v1/cluster"), ("GET", "/v1/dead-letters/{capability}"),
    ("POST", "/v1/dead-letters/{capability}/redrive"), ("GET", "/v1/keys"), ("POST", "/v1/keys"),
    ("DELETE", "/v1/keys/{key}"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    # tested in tests/test_gateway_services.py:
    ("GET", "/v1/services"), ("GET", "/v1/services/{name}"),
    ("POST", "/v1/services/{name}/instances"),
    ("PUT", "/v1/services/{name}/instances/{instance_id}/heartbeat"),
    ("PUT", "/v1/services/{name}/instances/{instance_id}/status"),
    ("DELETE", "/v1/services/{name}/instances/{instance_id}"),
    # tested in tests/test_sagas.py:
    ("GET", "/v1/sagas"), ("GET", "/v1/sagas/{saga_id}"), ("POST", "/v1/sagas/{saga_id}/cancel"),
    ("POST", "/v1/sagas/{saga_id}/retry-compensation"),
}  # fmt: skip
# tested in tests/test_gateway_config.py:
ROUTES |= {
    ("GET", "/v1/config"), ("GET", "/v1/config/history"), ("GET", "/v1/config/{key}"),
    ("PUT", "/v1/config/{key}"), ("DELETE", "/v1/config/{key}"),
}  # fmt: skip


async def checked(response: httpx.Response) -> None:
    """Every JSON answer: no traceback, a documented status, a body of the documented shape."""
    if not response.headers.get("content-type", "").startswith("application/json"):
        return
    await response.aread()
    assert "Traceback" not in response.text, response.text
    operation = SCHEMA.find_operation_by_path(response.request.method, response.request.url.path)
    if operation is None:  # not an API route (an unknown path, the OpenAPI document)
        return
    assert operation.responses.find_by_status_code(response.status_code) is not None, (
        f"{operation.label} answered {response.status_code}, which its OpenAPI entry does "
        f"not list: {response.text}"
    )
    operation.validate_response(response)


def http(url: str, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url, timeout=30, event_hooks={"response": [checked]}, **kwargs
    )


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway (open: on loopback, no keys) serving this test's namespace."""
    async with serving(settings) as url, http(url) as client:
        yield client


@pytest.fixture
async def node(settings: Settings) -> AsyncIterator[Node]:
    async with running_node([Toolbox, Counter, Relay], settings) as running:
        yield running


def error_of(response: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_, error
    return error


async def submit(api: httpx.AsyncClient, capability: str, **fields: Any) -> dict[str, Any]:
    params = {"wait": fields.pop("wait")} if "wait" in fields else None
    response = await api.post("/v1/tasks", json={"capability": capability, **fields}, params=params)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def task(api: httpx.AsyncClient, task_id: str, wait: float | None = None) -> dict[str, Any]:
    response = await api.get(f"/v1/tasks/{task_id}", params={"wait": wait} if wait else None)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- POST /v1/tasks ------------------------------------------------------------------


async def test_submitting_a_task_answers_201_with_its_location_and_it_runs(
    api: httpx.AsyncClient, node: Node
) -> None:
    response = await api.post("/v1/tasks", json={"capability": "add", "args": {"a": 2, "b": 40}})
    assert response.status_code == 201
    submitted = response.json()
    assert len(submitted["id"]) == 28
    assert submitted["existing"] is False and submitted["outcome"] is None
    assert response.headers["location"] == f"/v1/tasks/{submitted['id']}"
    done = (await api.get(response.headers["location"], params={"wait": 10})).json()
    assert done["task"]["status"] == "succeeded" and done["result"]["sum"] == 42


async def test_submit_with_wait_answers_with_the_outcome(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "echo", args={"value": {"nested": [1, "two"]}}, wait=10)
    outcome = submitted["outcome"]
    assert outcome["task"]["id"] == submitted["id"]
    assert outcome["task"]["status"] == "succeeded"
    assert outcome["result"] == {"nested": [1, "two"]}


async def test_submit_with_a_wait_that_runs_out_says_where_the_task_is(
    api: httpx.AsyncClient, node: Node
) -> None:
    started = time.monotonic()
    submitted = await submit(api, "sleepy", args={"seconds": 30}, wait=0.3)
    assert time.monotonic() - started < 5
    assert submitted["outcome"]["task"]["status"] in ("queued", "running")
    assert submitted["outcome"]["result"] is None
    cancel = await api.post(f"/v1/tasks/{submitted['id']}/cancel")
    assert cancel.json()["outcome"] in ("cancelled", "cancelling")
    assert (await task(api, submitted["id"], wait=10))["task"]["status"] == "cancelled"


async def test_a_task_for_an_agent_runs_on_that_agent_with_its_state(
    api: httpx.AsyncClient, node: Node
) -> None:
    first = await submit(api, "increment", agent="counter/a", args={"by": 2}, wait=10)
    second = await submit(api, "increment", agent="counter/a", args={"by": 3}, wait=10)
    other = await submit(api, "increment", agent="counter/b", wait=10)
    assert [first["outcome"]["result"], second["outcome"]["result"]] == [2, 5]
    assert other["outcome"]["result"] == 1
    state = (await api.get("/v1/agents/counter/a/state")).json()
    assert state == {"agent": "counter/a", "state": {"n": 5}}


async def test_a_task_for_an_unknown_agent_type_is_404(api: httpx.AsyncClient) -> None:
    response = await api.post("/v1/tasks", json={"capability": "increment", "agent": "nosuch/a"})
    error = error_of(response, 404, "UnknownAgentType")
    assert "'nosuch'" in error["message"]


async def test_priority_delay_eta_and_max_attempts_are_recorded(api: httpx.AsyncClient) -> None:
    low = await submit(api, "echo", priority="low", max_attempts=7)
    info = (await task(api, low["id"]))["task"]
    assert info["priority"] == "low" and info["max_attempts"] == 7 and info["status"] == "queued"

    delayed = (await task(api, (await submit(api, "echo", delay=60))["id"]))["task"]
    assert delayed["status"] == "scheduled"
    assert abs(delayed["scheduled_for"] - (delayed["created_at"] + 60_000)) < 1000

    eta = datetime.now(UTC) + timedelta(hours=1)
    at = (await task(api, (await submit(api, "echo", eta=eta.isoformat()))["id"]))["task"]
    assert at["status"] == "scheduled"
    assert at["scheduled_for"] == int(eta.timestamp() * 1000)


async def test_timeout_deadline_and_max_attempts_take_effect(
    api: httpx.AsyncClient, node: Node
) -> None:
    timed = await submit(api, "sleepy", args={"seconds": 30}, timeout=0.2, max_attempts=1, wait=10)
    assert timed["outcome"]["task"]["status"] in ("failed", "dead")
    assert timed["outcome"]["task"]["error"]["type"].endswith("TaskTimeout")

    # Due after its deadline: it never starts.
    late = await submit(api, "echo", delay=0.3, deadline=0.1, wait=10)
    assert late["outcome"]["task"]["status"] == "expired"
    assert late["outcome"]["task"]["attempts"] == 0
    assert late["outcome"]["task"]["error"]["type"].endswith("DeadlineExceeded")

    flaky = await submit(api, "flaky", args={"succeed_on": 3}, max_attempts=2, wait=10)
    assert flaky["outcome"]["task"]["status"] in ("failed", "dead")
    assert flaky["outcome"]["task"]["attempts"] == 2
    enough = await submit(api, "flaky", args={"succeed_on": 3}, max_attempts=3, wait=10)
    assert enough["outcome"]["result"] == 3


async def test_an_idempotency_key_answers_the_first_task_as_existing(
    api: httpx.AsyncClient,
) -> None:
    first = await submit(api, "echo", args={"value": 1}, idempotency_key="order-7")
    again = await submit(api, "echo", args={"value": 2}, idempotency_key="order-7")
    other = await submit(api, "echo", args={"value": 3}, idempotency_key="order-8")
    assert first["existing"] is False
    assert again["id"] == first["id"] and again["existing"] is True
    assert other["id"] != first["id"] and other["existing"] is False


# --- GET /v1/tasks/{id} --------------------------------------------------------------


async def test_get_with_wait_answers_as_soon_as_the_task_ends(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "sleepy", args={"seconds": 0.5})
    started = time.monotonic()
    done = await task(api, submitted["id"], wait=60)
    assert done["task"]["status"] == "succeeded" and done["result"] == "woke"
    assert time.monotonic() - started < 10, "the long poll answered when the task ended"


async def test_get_with_wait_answers_when_the_wait_runs_out(api: httpx.AsyncClient) -> None:
    submitted = await submit(api, "echo")  # no node: it stays queued
    started = time.monotonic()
    info = await task(api, submitted["id"], wait=0.5)
    assert 0.4 < time.monotonic() - started < 5
    assert info["task"]["status"] == "queued" and info["task"]["hosted"] is False


async def test_a_failed_task_shows_its_error_without_the_traceback(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "permanent")
    failed = await task(api, submitted["id"], wait=10)
    assert failed["task"]["status"] == "failed" and failed["result"] is None
    error = failed["task"]["error"]
    assert error["type"] == "tests.agents.PermanentError"
    assert error["message"] == "no point retrying"
    assert error["traceback"] is None, "tracebacks are for operators (shoal task --traceback)"
    assert [e["message"] for e in failed["task"]["errors"]] == ["no point retrying"]


async def test_an_unknown_task_is_404(api: httpx.AsyncClient) -> None:
    error = error_of(await api.get(f"/v1/tasks/{'0' * 28}"), 404, "TaskNotFound")
    assert "0" * 28 in error["message"]


# --- POST /v1/tasks/{id}/cancel ------------------------------------------------------


async def test_cancel_a_queued_task_then_again(api: httpx.AsyncClient) -> None:
    submitted = await submit(api, "echo")
    first = await api.post(f"/v1/tasks/{submitted['id']}/cancel")
    assert first.status_code == 200 and first.json() == {"outcome": "cancelled"}
    again = await api.post(f"/v1/tasks/{submitted['id']}/cancel")
    assert again.json() == {"outcome": "already_cancelled"}
    assert (await task(api, submitted["id"]))["task"]["status"] == "cancelled"


async def test_cancel_a_running_task(api: httpx.AsyncClient, node: Node) -> None:
    submitted = await submit(api, "sleepy", args={"seconds": 30})

    async def running() -> bool:
        return (await task(api, submitted["id"]))["task"]["status"] == "running"

    await eventually(running, "the task runs")
    response = await api.post(f"/v1/tasks/{submitted['id']}/cancel")
    assert response.json() == {"outcome": "cancelling"}
    assert (await task(api, submitted["id"], wait=10))["task"]["status"] == "cancelled"


async def test_cancel_an_unknown_task_is_404(api: httpx.AsyncClient) -> None:
    error_of(await api.post(f"/v1/tasks/{'0' * 28}/cancel"), 404, "TaskNotFound")


# --- GET /v1/tasks -------------------------------------------------------------------


async def test_list_filters_by_capability_and_status(api: httpx.AsyncClient) -> None:
    echoes = [(await submit(api, "echo", args={"value": i}))["id"] for i in range(4)]
    adds = [(await submit(api, "add", args={"a": i, "b": i}))["id"] for i in range(3)]
    for task_id in echoes[:2]:
        await api.post(f"/v1/tasks/{task_id}/cancel")

    async def listed(**params: Any) -> list[str]:
        response = await api.get("/v1/tasks", params=params)
        assert response.status_code == 200, response.text
        return [t["id"] for t in response.json()["tasks"]]

    assert await listed(capability="add") == adds[::-1], "newest first"
    assert await listed(status="cancelled") == echoes[:2][::-1]
    assert await listed(capability="echo", status="queued") == echoes[2:][::-1]
    assert set(await listed()) == {*echoes, *adds}
    assert await listed(capability="nobody") == []


async def test_list_pages_through_every_task_exactly_once(api: httpx.AsyncClient) -> None:
    ids = [(await submit(api, "echo", args={"value": i}))["id"] for i in range(11)]
    await submit(api, "add", args={"a": 1, "b": 1})  # filtered out on every page
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(20):  # 11 tasks at 3 a page: 4 pages (a bounded loop)
        params: dict[str, Any] = {"capability": "echo", "limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/tasks", params=params)).json()
        assert len(page["tasks"]) <= 3
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]


# --- GET /v1/tasks/{id}/events (Server-Sent Events) ---------------------------------


async def follow(
    api: httpx.AsyncClient, task_id: str, **kwargs: Any
) -> tuple[httpx.Response, list[dict[str, Any]]]:
    """The whole stream; it must end by itself (after the 'done' event)."""
    async with asyncio.timeout(20), api.stream("GET", f"/v1/tasks/{task_id}/events", **kwargs) as r:
        return r, await read_sse(r)


async def test_events_stream_live_in_order_and_end_after_done(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "report", args={"steps": 3}, delay=0.5)  # followed before it runs
    response, events = await follow(api, submitted["id"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["progress"] * 3 and kinds[-1] == "done"
    assert [e["data"]["data"]["message"] for e in events[:3]] == ["step 1", "step 2", "step 3"]
    assert "log" in kinds and kinds.count("done") == 1
    ids = [tuple(int(part) for part in e["id"].split("-")) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "in order, each once"
    for event in events:  # the SSE fields repeat the Event in the data
        assert event["data"]["id"] == event["id"] and event["data"]["kind"] == event["event"]
    assert "Traceback" not in str(events)


async def test_events_resume_after_the_last_event_id_or_after(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "report", args={"steps": 3}, delay=0.3)
    _, events = await follow(api, submitted["id"])
    assert len(events) >= 5
    for cut in (0, 2, len(events) - 2):
        _, rest = await follow(api, submitted["id"], headers={"Last-Event-ID": events[cut]["id"]})
        assert rest == events[cut + 1 :]
        _, rest = await follow(api, submitted["id"], params={"after": events[cut]["id"]})
        assert rest == events[cut + 1 :]
    _, nothing = await follow(api, submitted["id"], headers={"Last-Event-ID": events[-1]["id"]})
    assert nothing == []


async def test_events_of_a_failed_task_carry_no_traceback(
    api: httpx.AsyncClient, node: Node
) -> None:
    submitted = await submit(api, "permanent", delay=0.3)
    _, events = await follow(api, submitted["id"])
    assert events[-1]["event"] == "done"
    assert "Traceback" not in str(events)


async def test_events_of_an_unknown_task_are_404(api: httpx.AsyncClient) -> None:
    error_of(await api.get(f"/v1/tasks/{'0' * 28}/events"), 404, "TaskNotFound")


# --- agents --------------------------------------------------------------------------


async def test_agent_directory_types_one_agent_and_its_state(
    api: httpx.AsyncClient, node: Node
) -> None:
    await submit(api, "increment", agent="counter/a", args={"by": 4}, wait=10)
    agents = (await api.get("/v1/agents", params={"type": "counter"})).json()
    assert [a["id"] for a in agents] == ["counter/a"]
    assert agents[0]["state_size"] > 0
    everyone = (await api.get("/v1/agents")).json()
    assert "counter/a" in [a["id"] for a in everyone]

    types = {t["name"]: t for t in (await api.get("/v1/agent-types")).json()}
    assert {"counter", "relay"} <= types.keys()
    assert "increment" in types["counter"]["capabilities"]
    assert types["counter"]["handles_messages"] is True and types["counter"]["topics"] == [
        "findings"
    ]

    one = (await api.get("/v1/agents/counter/a")).json()
    assert (one["id"], one["type"], one["key"]) == ("counter/a", "counter", "a")
    state = (await api.get("/v1/agents/counter/a/state")).json()
    assert state == {"agent": "counter/a", "state": {"n": 4}}
    nobody = (await api.get("/v1/agents/counter/never-seen/state")).json()
    assert nobody == {"agent": "counter/never-seen", "state": None}


async def test_an_unknown_agent_type_is_404_everywhere(api: httpx.AsyncClient, node: Node) -> None:
    for response in (
        await api.get("/v1/agents/nosuch/a"),
        await api.get("/v1/agents/nosuch/a/state"),
        await api.post("/v1/agents/nosuch/a/messages", json={"message": 1}),
        await api.post("/v1/agents/nosuch/a/requests", json={"message": 1}),
    ):
        assert "'nosuch'" in error_of(response, 404, "UnknownAgentType")["message"]


async def test_a_message_is_accepted_202_and_reaches_the_agent(
    api: httpx.AsyncClient, node: Node
) -> None:
    response = await api.post("/v1/agents/counter/m/messages", json={"message": {"hello": 1}})
    assert response.status_code == 202 and response.json() == {"accepted": True}

    async def seen() -> Any:
        state = (await api.get("/v1/agents/counter/m/state")).json()["state"]
        return state and state.get("seen")

    assert await eventually(seen, "the message is handled") == [{"hello": 1}]


async def test_a_request_answers_with_the_reply(api: httpx.AsyncClient, node: Node) -> None:
    response = await api.post("/v1/agents/counter/r/requests", json={"message": "hi"})
    assert response.status_code == 200
    reply = response.json()["reply"]
    assert reply["count"] == 1 and reply["sender"] is None and reply["node"] == node.node_id


async def test_a_request_whose_handler_raises_is_502(api: httpx.AsyncClient, node: Node) -> None:
    response = await api.post("/v1/agents/counter/f/requests", json={"message": {"fail": True}})
    assert "asked to fail" in error_of(response, 502, "RequestFailed")["message"]


async def test_a_request_nobody_answers_in_time_is_504(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    async with running_node([Counter], settings):
        pass  # the agent type is known, and no node runs it now
    started = time.monotonic()
    response = await api.post(
        "/v1/agents/counter/late/requests", json={"message": 1, "timeout": 0.3}
    )
    error_of(response, 504, "RequestTimeout")
    assert time.monotonic() - started < 5


async def test_publishing_reaches_the_subscribed_type_by_source_key(
    api: httpx.AsyncClient, node: Node
) -> None:
    response = await api.post(
        "/v1/topics/findings/messages", json={"message": {"x": 1}, "source": "s1"}
    )
    assert response.status_code == 200 and response.json() == {"agent_types": 1}

    async def findings() -> Any:
        state = (await api.get("/v1/agents/counter/s1/state")).json()["state"]
        return state and state.get("findings")

    assert await eventually(findings, "the finding arrives") == [{"x": 1}]
    lonely = await api.post(
        "/v1/topics/nobody.listens/messages", json={"message": 1, "source": "a"}
    )
    assert lonely.json() == {"agent_types": 0}


# --- cluster, dead letters, health ---------------------------------------------------


async def test_cluster_shows_the_node_and_its_capabilities(
    api: httpx.AsyncClient, node: Node
) -> None:
    cluster = (await api.get("/v1/cluster")).json()
    nodes = {n["id"]: n for n in cluster["nodes"]}
    assert nodes[node.node_id]["state"] == "alive"
    assert {"echo", "increment"} <= set(nodes[node.node_id]["capabilities"])


async def test_dead_letters_list_and_redrive_given_ids_then_all(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        ids = [(await submit(api, "always_fails", wait=10))["id"] for _ in range(3)]
    dead = (await api.get("/v1/dead-letters/always_fails")).json()
    assert [d["task"]["id"] for d in dead] == ids, "oldest first"
    assert all(d["task"]["error"]["message"] == "this never works" for d in dead)

    unknown = await api.post(
        "/v1/dead-letters/always_fails/redrive", json={"task_ids": [ids[0], "f" * 28]}
    )
    assert "f" * 28 in error_of(unknown, 404, "TaskNotFound")["message"]
    assert len((await api.get("/v1/dead-letters/always_fails")).json()) == 3, "nothing moved"

    one = await api.post("/v1/dead-letters/always_fails/redrive", json={"task_ids": [ids[1]]})
    assert one.status_code == 200 and one.json() == {"task_ids": [ids[1]]}
    assert (await task(api, ids[1]))["task"]["status"] == "queued"
    rest = await api.post("/v1/dead-letters/always_fails/redrive", json={})
    assert sorted(rest.json()["task_ids"]) == sorted([ids[0], ids[2]])
    assert (await api.get("/v1/dead-letters/always_fails")).json() == []
    limited = await api.get("/v1/dead-letters/always_fails", params={"limit": 0})
    assert error_of(limited, 422, "ValidationError")["field"] == "query.limit"


async def test_healthz_and_readyz(api: httpx.AsyncClient) -> None:
    health = await api.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "detail": None}
    ready = await api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def test_readyz_is_503_while_the_engine_is_down_and_api_calls_too(
    own_engine: EmbeddedEngine,
) -> None:
    settings = Settings(url=own_engine.ensure().url, namespace="outage", engine_timeout=1)
    async with serving(settings) as url, http(url) as api:
        assert (await api.get("/readyz")).status_code == 200
        await asyncio.to_thread(own_engine.stop)
        started = time.monotonic()
        down = await api.get("/readyz")
        assert down.status_code == 503 and down.json()["status"] == "unavailable"
        assert down.json()["detail"] and time.monotonic() - started < 5
        assert settings.url and settings.url.split("@")[-1].split("/")[0] not in down.text, (
            "the engine's address is not told to callers without a key"
        )
        assert (await api.get("/healthz")).status_code == 200, "the process itself is fine"
        unavailable = error_of(await api.get("/v1/cluster"), 503, "EngineUnavailable")
        assert unavailable["message"] and unavailable["id"] is None
        await asyncio.to_thread(own_engine.ensure)

        async def ready() -> bool:
            return (await api.get("/readyz")).status_code == 200

        await eventually(ready, "ready again once the engine is back")


# --- error answers -------------------------------------------------------------------


async def test_unknown_routes_and_methods_answer_in_the_error_shape(api: httpx.AsyncClient) -> None:
    error_of(await api.get("/v1/nothing-here"), 404, "NotFound")
    error_of(await api.delete("/v1/tasks"), 405, "MethodNotAllowed")


async def test_a_body_over_the_limit_is_413_from_content_length(settings: Settings) -> None:
    async with serving(settings, GatewayConfig(port=0, max_body=1000)) as url, http(url) as api:
        big = {"capability": "echo", "args": {"value": "x" * 2000}}
        error = error_of(await api.post("/v1/tasks", json=big), 413, "PayloadTooLarge")
        assert "1000 bytes" in error["message"]
        assert (await api.get("/v1/tasks")).json()["tasks"] == [], "nothing was queued"


async def test_a_chunked_body_over_the_limit_is_413(settings: Settings) -> None:
    async def chunks(count: int) -> AsyncIterator[bytes]:
        yield b'{"capability": "echo", "args": {"value": "'
        for _ in range(count):
            yield b"x" * 300
        yield b'"}}'

    # A plain client: the body is a stream, which the OpenAPI check cannot read back.
    async with (
        serving(settings, GatewayConfig(port=0, max_body=1000)) as url,
        httpx.AsyncClient(base_url=url) as api,
    ):
        headers = {"content-type": "application/json"}
        small = await api.post("/v1/tasks", content=chunks(1), headers=headers)
        assert "content-length" not in small.request.headers
        assert small.request.headers["transfer-encoding"] == "chunked"
        assert small.status_code == 201, "a streamed body within the limit is read"
        big = await api.post("/v1/tasks", content=chunks(10), headers=headers)
        assert "content-length" not in big.request.headers
        assert "1000 bytes" in error_of(big, 413, "PayloadTooLarge")["message"]
        assert len((await api.get("/v1/tasks")).json()["tasks"]) == 1


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field"),
    [
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "priority": "urgent"}},
         "body.priority"),
        ("POST", "/v1/tasks", {"json": {"args": {}}}, "body.capability"),
        ("POST", "/v1/tasks", {"json": {"capability": "bad name"}}, "body.capability"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "colour": "red"}}, "body.colour"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "delay": -1}}, "body.delay"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "delay": 1e300}}, "body.delay"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "timeout": 1e300}}, "body.timeout"),
        ("POST", "/v1/tasks", {"content": '{"capability": "echo", "deadline": Infinity}'},
         "body.deadline"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "eta": "2030-01-01T00:00:00"}},
         "body.eta"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "max_attempts": 0}},
         "body.max_attempts"),
        ("POST", "/v1/tasks", {"content": '{"capability": "echo", "args": {"x": "\\ud800"}}'},
         "body.args"),
        ("POST", "/v1/tasks", {"json": {"capability": "echo", "agent": "no-slash"}}, "body.agent"),
        ("POST", "/v1/tasks?wait=301", {"json": {"capability": "echo"}}, "query.wait"),
        ("GET", "/v1/tasks?limit=0", {}, "query.limit"),
        ("GET", "/v1/tasks?status=sleeping", {}, "query.status"),
        ("GET", "/v1/tasks?cursor=nothex", {}, "query.cursor"),
        ("GET", "/v1/tasks/not-a-task-id", {}, "path.task_id"),
        ("GET", f"/v1/tasks/{'0' * 28}/events", {"headers": {"Last-Event-ID": "x"}},
         "header.last-event-id"),
        ("GET", "/v1/agents/Bad-Type/a", {}, "path.agent_type"),
        ("POST", "/v1/agents/counter/a/requests", {"json": {"message": 1, "timeout": 0}},
         "body.timeout"),
        ("POST", "/v1/agents/counter/a/messages", {"json": {}}, "body.message"),
        ("POST", "/v1/topics/findings/messages", {"json": {"message": 1, "source": "a b"}},
         "body.source"),
        ("POST", "/v1/dead-letters/echo/redrive", {"json": {"task_ids": ["zz"]}},
         "body.task_ids.0"),
        ("POST", "/v1/keys", {"json": {"name": "a b", "scopes": ["read"]}}, "body.name"),
        ("POST", "/v1/keys", {"json": {"name": "k", "scopes": ["root"]}}, "body.scopes.0"),
        ("POST", "/v1/keys", {"json": {"name": "k", "scopes": ["read"], "burst": 10**30}},
         "body.burst"),
    ],
)  # fmt: skip
async def test_an_invalid_field_is_422_naming_it(
    api: httpx.AsyncClient, method: str, path: str, kwargs: dict[str, Any], field: str
) -> None:
    if "content" in kwargs:
        kwargs = {**kwargs, "headers": {"content-type": "application/json"}}
    error = error_of(await api.request(method, path, **kwargs), 422, "ValidationError")
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")


async def test_a_body_that_is_not_json_is_refused_in_the_error_shape(
    api: httpx.AsyncClient,
) -> None:
    headers = {"content-type": "application/json"}
    not_json = await api.post("/v1/tasks", content=b"{oops", headers=headers)
    assert error_of(not_json, 422, "ValidationError")["field"].startswith("body")
    not_utf8 = await api.post("/v1/tasks", content=b'{"capability": "\xff"}', headers=headers)
    error_of(not_utf8, 400, "BadRequest")


async def test_a_key_over_its_rate_is_429_with_retry_after(
    settings: Settings, client: Client
) -> None:
    created = await KeyStore(client).create("slow", ["read"], rate=0.5, burst=1)
    async with serving(settings) as url, http(url, headers=bearer(created.secret)) as api:
        assert (await api.get("/v1/tasks")).status_code == 200
        limited = await api.get("/v1/tasks")
        error = error_of(limited, 429, "RateLimited")
        assert int(limited.headers["retry-after"]) >= 1
        assert "'slow'" in error["message"]


async def test_a_server_error_is_500_with_an_error_id_that_the_log_has(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    """A real fault, no mock: an API key record in the engine that is not a record.
    The caller learns an id and nothing of the inside; the log has the id and the
    traceback, for the operator the caller quotes it to."""
    await client.redis.hset(client.keys.api_keys, "0123456789ab", b"\xc1 not msgpack")
    log = tmp_path / "gateway.log"
    with gateway_process(settings, log=log) as (url, _):
        async with http(url, headers=bearer("shoal_0123456789ab_" + "A" * 43)) as api:
            response = await api.get("/v1/tasks")
    error = error_of(response, 500, "InternalError")
    assert len(error["id"]) == 16 and error["id"] in error["message"]
    assert "Traceback" not in response.text and "msgpack" not in response.text
    text = log.read_text()
    assert f"error {error['id']} on GET /v1/tasks" in text
    assert "Traceback (most recent call last)" in text and "is unreadable" in text


async def test_a_full_queue_is_503_queue_full_with_retry_after(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    async with running_node([Toolbox], settings):
        pass  # registers 'bounded' (max_queue_length=5), then goes away
    for _ in range(5):
        await submit(api, "bounded")
    full = await api.post("/v1/tasks", json={"capability": "bounded"})
    assert "is full" in error_of(full, 503, "QueueFull")["message"]
    assert full.headers["retry-after"] == "1"
    assert len((await api.get("/v1/tasks", params={"capability": "bounded"})).json()["tasks"]) == 5


# --- the OpenAPI document ------------------------------------------------------------


async def test_openapi_lists_every_route(api: httpx.AsyncClient, settings: Settings) -> None:
    document = (await api.get("/openapi.json")).json()
    listed = {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert listed == ROUTES
    served = api_routes(create_app(settings)).keys()
    assert served == ROUTES, "every route the app serves is documented, and tested here"
    assert document == json.loads(json.dumps(OPENAPI)), "the document these tests check against"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method.upper()} {path} has no summary"
            if path.startswith("/v1/"):
                assert {"401", "403", "422", "429", "500", "503"} <= operation["responses"].keys()
