"""Agents for the tracing tests, run by a node process (``--app tests.tracing_app``).

Importing it installs an OpenTelemetry SDK provider of the application's own, with
the in-memory exporter, as an application would install its own provider: the node
must find it and trace into it. When the provider is flushed (the node does so as
it stops), the finished spans are written as JSON to ``$SHOAL_TEST_SPANS_FILE``:
written to a temporary name and renamed, so the file appears complete or not at all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shoal import Agent, Retry, capability, handler

SPANS_FILE = "SHOAL_TEST_SPANS_FILE"


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain JSON data (ids in hex, as in a traceparent)."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "status": span.status.status_code.name,
        "events": [event.name for event in span.events],
        "start": span.start_time,
        "end": span.end_time,
    }


class DumpOnFlush(SpanProcessor):
    """Writes every span the exporter holds to the file when the provider is flushed."""

    def __init__(self, exporter: InMemorySpanExporter, path: str) -> None:
        self._exporter = exporter
        self._path = Path(path)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        spans = [span_record(s) for s in self._exporter.get_finished_spans()]
        temporary = self._path.with_suffix(".partial")
        temporary.write_text(json.dumps(spans))
        temporary.replace(self._path)
        return True


exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
if os.environ.get(SPANS_FILE):
    provider.add_span_processor(DumpOnFlush(exporter, os.environ[SPANS_FILE]))
trace.set_tracer_provider(provider)


class Traced(Agent):
    @capability("traced_parent")
    async def traced_parent(self, text: str) -> dict[str, Any]:
        """A sub-task and an agent message, both inside the attempt's span."""
        child = await self.ctx.call("traced_child", text=text)
        reply = await self.ctx.request("pen/one", {"text": text}, timeout=10)
        return {"child": child, "reply": reply}

    @capability("traced_child")
    async def traced_child(self, text: str) -> str:
        return text.upper()

    @capability("traced_retry", backoff=0.01)
    async def traced_retry(self) -> int:
        if self.ctx.attempt == 1:
            raise Retry(delay=0, reason="once")
        return self.ctx.attempt


class Pen(Agent):
    """An addressed agent: its message turns are spans too."""

    @handler
    async def write(self, message: dict[str, Any]) -> str:
        return f"wrote {message['text']}"
