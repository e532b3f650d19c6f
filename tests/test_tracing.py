"""Tracing: one trace from a submit in this process through a node in another process
(queue wait, run, sub-task, agent message), retries linked, and nothing at all when
tracing is off."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from shoal import Client, Settings
from shoal.errors import ConfigurationError
from shoal.observability import tracing
from tests.conftest import REPO, node_env, node_process
from tests.tracing_app import SPANS_FILE, span_record

Span = dict[str, Any]


def _unset_global_provider() -> None:
    """OpenTelemetry lets a process set its global provider once; tests undo it through
    its private attributes (as its own test utilities do), so that other tests run
    untraced whatever the order."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def sdk_spans() -> Iterator[InMemorySpanExporter]:
    """This process installs an SDK provider of its own, as an application would, with
    the in-memory exporter; Shoal must trace into it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.reset()
    _unset_global_provider()
    trace.set_tracer_provider(provider)
    assert tracing.configure(), "the application's SDK provider turns tracing on"
    yield exporter
    tracing.reset()
    provider.shutdown()
    _unset_global_provider()


@pytest.fixture
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No provider, no OTEL_* variables; tracing off before and after."""
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    tracing.reset()
    _unset_global_provider()
    yield
    tracing.reset()
    _unset_global_provider()


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s["name"] == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}: {[s['name'] for s in spans]}"
    return found[0]


async def traced_node_run(
    client: Client, settings: Settings, tmp_path: Path, capability: str, **kwargs: Any
) -> tuple[Any, list[Span]]:
    """Run one task on a node process of tests.tracing_app; its result and the node's
    spans, which it writes when it stops (the process exit is the signal: no polling)."""
    spans_file = tmp_path / "node-spans.json"
    with node_process(
        settings, "tests.tracing_app", "--name", "tracer", env={SPANS_FILE: str(spans_file)}
    ) as node:
        await client.wait_for_hosts(capability)
        result = await client.call(capability, result_timeout=30, **kwargs)
        node.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.wait, 30) == 0
    return result, json.loads(spans_file.read_text())


async def test_one_trace_covers_submit_queue_wait_run_sub_task_and_agent_message(
    client: Client, settings: Settings, sdk_spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    result, node_spans = await traced_node_run(
        client, settings, tmp_path, "traced_parent", text="ink"
    )
    assert result == {"child": "INK", "reply": "wrote ink"}
    submit = one([span_record(s) for s in sdk_spans.get_finished_spans()], "submit traced_parent")
    assert submit["kind"] == "PRODUCER" and submit["parent_id"] is None
    trace_id = submit["trace_id"]
    assert {s["trace_id"] for s in node_spans} == {trace_id}, "one trace across both processes"

    wait, run = one(node_spans, "queue wait traced_parent"), one(node_spans, "run traced_parent")
    assert wait["parent_id"] == run["parent_id"] == submit["span_id"]
    assert wait["start"] <= wait["end"] <= run["start"]
    assert run["kind"] == "CONSUMER" and run["status"] == "UNSET" and run["links"] == []
    attributes = run["attributes"]
    assert attributes["shoal.capability"] == "traced_parent" and attributes["shoal.attempt"] == 1
    assert attributes["shoal.node"] == "tracer" and len(attributes["shoal.task_id"]) == 28

    sub_submit = one(node_spans, "submit traced_child")
    assert sub_submit["kind"] == "PRODUCER" and sub_submit["parent_id"] == run["span_id"]
    assert one(node_spans, "run traced_child")["parent_id"] == sub_submit["span_id"]
    assert one(node_spans, "queue wait traced_child")["parent_id"] == sub_submit["span_id"]

    request = one(node_spans, "request pen")
    assert request["parent_id"] == run["span_id"]
    turn = one(node_spans, "handle pen")
    assert turn["parent_id"] == request["span_id"] and turn["kind"] == "CONSUMER"
    assert turn["attributes"]["shoal.agent_id"] == "pen/one"


async def test_a_retried_task_has_a_run_span_per_attempt_the_second_linked_to_the_submit(
    client: Client, settings: Settings, sdk_spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    result, node_spans = await traced_node_run(client, settings, tmp_path, "traced_retry")
    assert result == 2
    submit = one([span_record(s) for s in sdk_spans.get_finished_spans()], "submit traced_retry")
    runs = sorted(
        (s for s in node_spans if s["name"] == "run traced_retry"),
        key=lambda s: s["attributes"]["shoal.attempt"],
    )
    assert [r["attributes"]["shoal.attempt"] for r in runs] == [1, 2]
    assert all(r["parent_id"] == submit["span_id"] for r in runs)
    first, second = runs
    assert first["status"] == "ERROR" and first["events"] == ["exception"]
    assert first["attributes"]["shoal.outcome"] == "retried" and first["links"] == []
    assert second["status"] == "UNSET" and second["attributes"]["shoal.outcome"] == "succeeded"
    assert second["links"] == [{"trace_id": submit["trace_id"], "span_id": submit["span_id"]}]


async def test_a_task_submitted_in_an_http_server_span_joins_the_callers_trace(
    client: Client, sdk_spans: InMemorySpanExporter
) -> None:
    caller = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    explicit = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"
    with tracing.http_server_span(
        "POST", "/tasks", tracing.extract_traceparent({"Traceparent": caller})
    ) as request:
        joined = await client.submit("echo", value=1)  # no node needed: it just waits
        own = await client.submit("other", _traceparent=explicit)
        request.status(202)
    spans = [span_record(s) for s in sdk_spans.get_finished_spans()]
    http, submit = one(spans, "POST /tasks"), one(spans, "submit echo")
    assert http["kind"] == "SERVER" and http["attributes"]["http.response.status_code"] == 202
    assert (http["trace_id"], http["parent_id"]) == ("ab" * 16, "cd" * 8)
    assert submit["parent_id"] == http["span_id"] and submit["trace_id"] == "ab" * 16
    carried = (await joined.status()).traceparent
    assert carried == f"00-{submit['trace_id']}-{submit['span_id']}-01", "the task's parent"
    other = one(spans, "submit other")
    assert (other["trace_id"], other["parent_id"]) == ("12" * 16, "34" * 8), "explicit wins"
    assert (await own.status()).traceparent == f"00-{'12' * 16}-{other['span_id']}-01"


def test_traceparent_headers_are_validated() -> None:
    good = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-" + "00f067aa0ba902b7" + "-01"
    assert tracing.extract_traceparent({"traceparent": good}) == good
    assert tracing.extract_traceparent({"TraceParent": f" {good} "}) == good
    assert tracing.extract_traceparent({"traceparent": good.upper()}) is None
    assert tracing.extract_traceparent({"traceparent": good + "-extra"}) is None, "v00: 4 fields"
    future = "01" + good[2:] + "-more"
    assert tracing.extract_traceparent({"traceparent": future}) == good, "read as version 00"
    zero_trace = f"00-{'0' * 32}-00f067aa0ba902b7-01"
    zero_span = f"00-4bf92f3577b34da6a3ce929d0e0e4736-{'0' * 16}-01"
    for bad in ("ff" + good[2:], zero_trace, zero_span, "00-abc-def-01", ""):
        assert tracing.extract_traceparent({"traceparent": bad}) is None, bad
    assert tracing.extract_traceparent({}) is None


def test_the_otel_variables_decide_and_sdk_disabled_wins(
    no_tracing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not tracing.configure(), "nothing asks for tracing"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    assert not tracing.configure(), "'none' keeps it off even with an endpoint"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigurationError, match="otlp, console"):
        tracing.configure()
    monkeypatch.delenv("OTEL_TRACES_EXPORTER")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configure() and not tracing.ENABLED, "OTEL_SDK_DISABLED wins"
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "my-gateway")
    assert tracing.configure("shoal-gateway") and tracing.ENABLED, "an endpoint turns it on"
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "installed as the process's provider"
    assert provider.resource.attributes["service.name"] == "my-gateway"


UNTRACED_PROBE = """
import asyncio, json, os, sys
from opentelemetry import context, trace  # loaded anyway: redis-py uses its metrics API
from shoal import Client, Settings
from shoal.node import Node, NodeConfig
from shoal.observability import tracing
from tests.agents import Toolbox
from tests.stateful import Counter, Relay

calls = []
def counting(module, name):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

for name in ("get_tracer_provider", "get_tracer", "set_span_in_context", "get_current_span",
             "NonRecordingSpan", "SpanContext", "Link"):
    counting(trace, name)
for name in ("attach", "detach", "get_current", "Context"):
    counting(context, name)

async def main():
    settings = Settings(url=os.environ["SHOAL_REDIS_URL"], namespace=os.environ["SHOAL_NAMESPACE"])
    node = Node([Toolbox, Counter, Relay], settings, NodeConfig(concurrency=8))
    running = asyncio.create_task(node.run())
    async with Client(settings=settings) as client:
        await client.wait_for_hosts("parent")
        await client.call("parent", n=2, result_timeout=30)  # sub-tasks through ctx.call
        await client.call("ask", target="counter/x", message="hi", agent="relay/r",
                          result_timeout=30)  # an agent message through ctx.request
    node.stop()
    await running
    print(json.dumps({
        "enabled": tracing.ENABLED,
        "otel_calls": calls,
        "sdk_trace_loaded": "opentelemetry.sdk.trace" in sys.modules,
    }))

asyncio.run(main())
"""


def test_with_tracing_off_the_hot_path_never_calls_opentelemetry(settings: Settings) -> None:
    """A fresh process, no OTEL_* variables: a node runs tasks, sub-tasks and agent
    messages; tracing stays off, the SDK's tracing is never even imported (so no
    provider can exist), and no OpenTelemetry tracing function is called."""
    env = {k: v for k, v in node_env(settings).items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", UNTRACED_PROBE], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"enabled": False, "otel_calls": [], "sdk_trace_loaded": False}
