"""A task's event stream over HTTP resumes after a reconnect — to another gateway,
after the node running the task was killed and another took it over — with every
event exactly once and in order."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec

from shoal import Client, Settings

from .agents import Toolbox
from .conftest import eventually, node_process, running_node
from .gateways import gateway_process


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Parse an SSE body: yield each event's id, type and JSON data."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield {
                    "id": fields.get("id"),
                    "event": fields.get("event", "message"),
                    "data": msgspec.json.decode(fields["data"]),
                }
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def read_until(
    base: str, task_id: str, last_id: str | None, stop: Any
) -> list[dict[str, Any]]:
    """Events from one connection, resuming after ``last_id``, until ``stop(event)``."""
    got: list[dict[str, Any]] = []
    headers = {"Last-Event-ID": last_id} if last_id else {}
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as http,
        http.stream("GET", f"/v1/tasks/{task_id}/events", headers=headers) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for event in sse_events(response):
            got.append(event)
            if stop(event):
                break
    return got


async def test_sse_resumes_on_another_gateway_after_the_node_running_the_task_is_killed(
    client: Client, settings: Settings
) -> None:
    with (
        gateway_process(settings) as (gateway_a, _),
        gateway_process(settings) as (gateway_b, _),
        node_process(settings, "tests.sse_app", "--name", "first") as first,
    ):
        await client.wait_for_hosts("tick", timeout=20)
        async with httpx.AsyncClient(base_url=gateway_a) as http:
            reply = await http.post(
                "/v1/tasks", json={"capability": "tick", "args": {"steps": 30, "interval": 0.05}}
            )
        assert reply.status_code == 201
        task_id = reply.json()["id"]

        # Read a few events from gateway A, then drop the connection.
        seen = await read_until(gateway_a, task_id, None, lambda e: e["event"] == "progress"
                                and e["data"]["data"]["message"].endswith("step 4"))  # fmt: skip
        assert seen[-1]["data"]["data"]["message"] == "attempt 1 step 4"

        # The node running it dies; a second node takes the task over (attempt 2).
        with node_process(settings, "tests.sse_app", "--name", "second"):
            first.send_signal(signal.SIGKILL)
            first.wait()
            await eventually(
                lambda: _attempt(client, task_id, 2), "the task running again on 'second'", 20
            )
            # Reconnect to gateway B with the last id seen: the rest, once, to the end.
            rest = await read_until(
                gateway_b, task_id, seen[-1]["id"], lambda e: e["event"] == "done"
            )

    events = seen + rest
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert ids == sorted(ids, key=lambda i: tuple(int(x) for x in i.split("-")))
    recorded = await client.event_history(task_id)
    assert ids == [e.id for e in recorded], "an event was skipped"
    messages = [e["data"]["data"]["message"] for e in events if e["event"] == "progress"]
    assert "attempt 2 step 29" in messages
    assert events[-1]["event"] == "done"
    assert (await client.status(task_id)).status == "succeeded"


async def _attempt(client: Client, task_id: str, attempt: int) -> bool:
    info = await client.status(task_id)
    return info.attempts >= attempt and info.node == "second" and info.status == "running"


async def test_sse_stream_of_an_unknown_task_is_a_404(client: Client, settings: Settings) -> None:
    with gateway_process(settings) as (gateway, _):
        async with httpx.AsyncClient(base_url=gateway) as http:
            reply = await http.get(f"/v1/tasks/{'0' * 28}/events")
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "TaskNotFound"


async def test_a_task_that_ended_unfollowed_streams_its_done_event(
    client: Client, settings: Settings
) -> None:
    """Nobody followed it and it emitted nothing, so it had no stream; following it
    now still ends with 'done' (an SSE client would otherwise reconnect forever)."""
    async with running_node([Toolbox], settings):
        handle = await client.submit("echo", value=1)
        await handle.result(timeout=10)
    assert await client.redis.exists(client.keys.events(handle.id)) == 0
    with gateway_process(settings) as (gateway, _):
        first = await read_until(gateway, handle.id, None, lambda e: e["event"] == "done")
        again = await read_until(gateway, handle.id, None, lambda e: e["event"] == "done")
    assert [e["event"] for e in first] == ["done"] == [e["event"] for e in again]
    assert first[0]["id"] == again[0]["id"], "written once"
    assert first[0]["data"]["data"] == {"status": "succeeded"}
