"""One trace from an HTTP request with a ``traceparent`` through the gateway, the
queue and a handler in a node process, to its sub-task and agent message."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal import Client, Settings
from tests.conftest import node_process
from tests.gateways import serving
from tests.test_tracing import one, sdk_spans
from tests.tracing_app import SPANS_FILE, span_record

__all__ = ["sdk_spans"]  # the fixture, used by name

CALLER = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


async def test_an_http_request_its_task_sub_task_and_agent_message_share_one_trace(
    client: Client, settings: Settings, sdk_spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    spans_file = tmp_path / "node-spans.json"
    with node_process(
        settings, "tests.tracing_app", "--name", "tracer", env={SPANS_FILE: str(spans_file)}
    ) as node:
        await client.wait_for_hosts("traced_parent")
        async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
            reply = await http.post(
                "/v1/tasks?wait=30",
                json={"capability": "traced_parent", "args": {"text": "ink"}},
                headers={"traceparent": CALLER},
            )
        assert reply.status_code == 201
        assert reply.json()["outcome"]["result"] == {"child": "INK", "reply": "wrote ink"}
        node.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.wait, 30) == 0
    node_spans = json.loads(spans_file.read_text())
    spans = [span_record(s) for s in sdk_spans.get_finished_spans()]

    server = one(spans, "POST /v1/tasks")
    assert server["kind"] == "SERVER"
    assert (server["trace_id"], server["parent_id"]) == ("ab" * 16, "cd" * 8)
    assert server["attributes"]["http.response.status_code"] == 201
    submit = one(spans, "submit traced_parent")
    assert submit["parent_id"] == server["span_id"]
    assert {s["trace_id"] for s in node_spans} == {"ab" * 16}, "the caller's trace throughout"
    run = one(node_spans, "run traced_parent")
    assert run["parent_id"] == submit["span_id"]
    assert one(node_spans, "submit traced_child")["parent_id"] == run["span_id"]
    assert one(node_spans, "handle pen")["trace_id"] == "ab" * 16
