"""OpenTelemetry spans made of the W3C ``traceparent`` every task and message carries.

Off by default, and then free: no OpenTelemetry module is even imported, and each
hook is one ``if`` on the module flag ``ENABLED``. ``configure()`` (called by every
Client and node as it starts) turns it on when

- the application installed an SDK ``TracerProvider`` of its own (that provider is
  used — this is also how tests plug in the SDK's in-memory exporter), or
- the standard variables ask for it: ``OTEL_TRACES_EXPORTER`` (``otlp``,
  ``console``; ``none`` keeps it off), ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``. Shoal then sets up a provider (service
  name from ``OTEL_SERVICE_NAME``, else the caller's default) exporting over
  OTLP/HTTP in batches.

``OTEL_SDK_DISABLED=true`` keeps it off whatever else is set.

The spans, and how they link up:

- ``submit <capability>`` (PRODUCER, client): its context *is* the traceparent the
  task carries, so the task's spans are its children; its parent is the explicit
  ``_traceparent`` if given, else the caller's current span (e.g. a gateway's HTTP
  server span). ``send``/``request <agent type>`` and ``publish <topic>`` likewise
  for messages.
- ``queue wait <capability>`` (node): from when the entry was queued to the start.
- ``run <capability>`` (CONSUMER, node), one per attempt; attempts after the first
  also link to the submit span, so a retry on another node after a kill is found
  from the first. The handler runs with it as the current span, and ``ctx.call``/
  ``send``/``request``/``publish`` pass it on, so sub-tasks and messages are children.
- ``handle <agent type>`` (CONSUMER, node): one per agent message turn.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from shoal import protocol
from shoal.errors import ConfigurationError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext

ENABLED = False  # read by the hooks on every attempt: keep it a plain module flag
_state: _Tracing | None = None

_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
EXPORTERS = ("otlp", "console")
FAILED_OUTCOMES = frozenset({"retried", "dead", "failed", "crashed"})


# --- turning it on and off ------------------------------------------------------------


class _Tracing:
    """What enabled tracing works with (OpenTelemetry is imported only now)."""

    def __init__(self, provider: Any, owned: bool) -> None:
        from opentelemetry import context, trace

        from shoal import __version__

        self.provider = provider
        self.owned = owned  # created by Shoal: Shoal shuts it down
        self.tracer = provider.get_tracer("shoal", __version__)
        self.context = context
        self.trace = trace


def configure(service_name: str = "shoal-client") -> bool:
    """Turn tracing on if the application or the OTEL_* variables ask for it (see the
    module docstring); True if it is on. Once on it stays on (the first caller's
    ``service_name`` is the default); while off, each call looks again — a few
    environment reads — so a provider installed after Shoal was imported counts."""
    global ENABLED, _state
    if ENABLED:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    provider, owned = _application_provider(), False
    if provider is None:
        exporters = _exporters_asked_for()
        if not exporters:
            return False
        provider, owned = _make_provider(service_name, exporters), True
    _state = _Tracing(provider, owned)
    ENABLED = True
    return True


def _application_provider() -> Any:
    """The application's SDK TracerProvider, if it installed one. (Without the SDK
    imported there can be none: no need to import anything to find out.)"""
    sdk = sys.modules.get("opentelemetry.sdk.trace")
    if sdk is None:
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, sdk.TracerProvider) else None


def _exporters_asked_for() -> list[str]:
    asked = os.environ.get("OTEL_TRACES_EXPORTER", "")
    names = [n.strip().lower() for n in asked.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if not names:
        endpoints = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return ["otlp"] if any(os.environ.get(e) for e in endpoints) else []
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ConfigurationError(
            f"OTEL_TRACES_EXPORTER={os.environ['OTEL_TRACES_EXPORTER']!r}: Shoal exports "
            f"traces with {', '.join(EXPORTERS)} (or none), not {', '.join(unknown)}"
        )
    return names


def _make_provider(service_name: str, exporters: list[str]) -> Any:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(exporter)))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):  # nobody set one
        trace.set_tracer_provider(provider)  # so the application's own spans go there too
    return provider


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol_ = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol_ != "http/protobuf":
        raise ConfigurationError(
            f"OTLP protocol {protocol_!r}: Shoal exports traces over OTLP/HTTP "
            "(http/protobuf); point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP "
            "port (usually 4318)"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def flush(timeout_s: float = 5.0) -> None:
    """Export what is buffered (before a process ends: a node calls it as it stops)."""
    if _state is not None:
        _state.provider.force_flush(int(timeout_s * 1000))


def reset() -> None:
    """Turn tracing off again (for tests). A provider Shoal created is shut down; an
    application's own is left alone (so is OpenTelemetry's global provider, which a
    process sets once)."""
    global ENABLED, _state
    state, _state, ENABLED = _state, None, False
    if state is not None and state.owned:
        state.provider.shutdown()


# --- W3C traceparent -------------------------------------------------------------------


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid W3C ``traceparent``, else None.
    Versions above 00 are read as 00 (the spec's forward compatibility); an all-zero
    id, version ff, or extra fields on version 00 are invalid."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def extract_traceparent(headers: Mapping[str, str]) -> str | None:
    """The caller's ``traceparent`` header, validated and normalised, or None."""
    value = headers.get("traceparent")
    if value is None:  # a plain dict is case-sensitive; HTTP header names are not
        value = next((v for k, v in headers.items() if k.lower() == "traceparent"), None)
    parsed = parse_traceparent(value)
    return "00-{}-{}-{}".format(*parsed) if parsed else None


def carried_traceparent(parent: str | None) -> str:
    """The traceparent a new task or message carries. With tracing on, ``parent`` is
    the context of the producer span made for it (see ``producer``): carried as is,
    so the consumer's spans are that span's children. Off, a fresh span id under the
    parent's trace id (one trace id still spans a task and its sub-tasks)."""
    if ENABLED and parent:
        return parent
    return protocol.child_traceparent(parent)


def _format(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _span_context(state: _Tracing, traceparent: str | None) -> SpanContext | None:
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    trace_id, span_id, flags = parsed
    span_context: SpanContext = state.trace.SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True,
        trace_flags=state.trace.TraceFlags(int(flags, 16)),
    )  # fmt: skip
    return span_context


def _parent(state: _Tracing, span_context: SpanContext | None) -> Context:
    """A context whose current span is the remote parent (an empty one: a new trace)."""
    context: Context = state.context.Context()
    if span_context is not None:
        remote = state.trace.NonRecordingSpan(span_context)
        context = state.trace.set_span_in_context(remote, context)
    return context


# --- spans -------------------------------------------------------------------------------


class Producer:
    """A submit or send under way. ``traceparent`` is what the task or message carries
    (with tracing off: the caller's, unchanged)."""

    __slots__ = ("_span", "traceparent")

    def __init__(self, traceparent: str | None, span: Span | None = None) -> None:
        self.traceparent = traceparent
        self._span = span

    def annotate(self, key: str, value: str | int) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def __enter__(self) -> Producer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._span is not None:
            _end(self._span, exc)


def producer(
    operation: str, target: str, traceparent: str | None, attributes: Mapping[str, str]
) -> Producer:
    """``with producer("submit", capability, _traceparent, {...}) as p:`` — a PRODUCER
    span whose parent is ``traceparent`` if given, else the current span."""
    if _state is None:
        return Producer(traceparent)
    parent_sc = _span_context(_state, traceparent)
    parent = _parent(_state, parent_sc) if parent_sc is not None else None  # None: current
    span = _state.tracer.start_span(
        f"{operation} {target}", context=parent, kind=_state.trace.SpanKind.PRODUCER,
        attributes=dict(attributes),
    )  # fmt: skip
    return Producer(_format(span), span)


class WorkSpan:
    """A node's span around one attempt or turn, current while the handler runs."""

    __slots__ = ("_span", "_token", "traceparent")

    def __init__(self, span: Span, parent: Context) -> None:
        assert _state is not None
        self._span = span
        self._token = _state.context.attach(_state.trace.set_span_in_context(span, parent))
        self.traceparent = _format(span)

    def end(self, outcome: str, error: BaseException | None) -> None:
        if _state is None:  # turned off meanwhile (tests)
            return
        self._span.set_attribute("shoal.outcome", outcome)
        _state.context.detach(self._token)
        _end(self._span, error if outcome in FAILED_OUTCOMES else None)


def _end(span: Span, error: BaseException | None) -> None:
    if error is not None:
        assert _state is not None
        span.record_exception(error)
        span.set_status(_state.trace.Status(_state.trace.StatusCode.ERROR, _describe(error)))
    span.end()


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def start_attempt(
    task_id: str, capability: str, attempt: int, traceparent: str | None,
    node_id: str, agent_id: str | None, queued_ms: int,
) -> WorkSpan:  # fmt: skip
    """The ``queue wait`` span (ended at once, from ``queued_ms``) and the attempt's
    ``run`` span, its child of the task's traceparent (the submit span)."""
    assert _state is not None
    parent_sc = _span_context(_state, traceparent)
    parent = _parent(_state, parent_sc)
    attributes: dict[str, str | int] = {
        "shoal.task_id": task_id, "shoal.capability": capability, "shoal.attempt": attempt,
        "shoal.node": node_id,
    }  # fmt: skip
    if agent_id:
        attributes["shoal.agent_id"] = agent_id
    now_ns = time.time_ns()
    wait = _state.tracer.start_span(
        f"queue wait {capability}", context=parent, attributes=attributes,
        start_time=min(queued_ms * 1_000_000, now_ns),
    )  # fmt: skip
    wait.end(end_time=now_ns)
    links = None
    if attempt > 1 and parent_sc is not None:  # a retry: found from the first attempt too
        links = [_state.trace.Link(parent_sc, {"shoal.link": "submitted by"})]
    span = _state.tracer.start_span(
        f"run {capability}", context=parent, kind=_state.trace.SpanKind.CONSUMER,
        attributes=attributes, links=links, start_time=now_ns,
    )  # fmt: skip
    return WorkSpan(span, parent)


def start_turn(
    kind: str, agent_id: str, traceparent: str | None, node_id: str, topic: str | None
) -> WorkSpan:
    """The span of an agent's message turn, a child of the message's traceparent."""
    assert _state is not None
    parent = _parent(_state, _span_context(_state, traceparent))
    attributes = {"shoal.agent_id": agent_id, "shoal.node": node_id, "shoal.message_kind": kind}
    if topic:
        attributes["shoal.topic"] = topic
    span = _state.tracer.start_span(
        f"handle {agent_id.partition('/')[0]}", context=parent,
        kind=_state.trace.SpanKind.CONSUMER, attributes=attributes,
    )  # fmt: skip
    return WorkSpan(span, parent)


class HttpSpan:
    """``with http_server_span(...) as span:`` in a gateway; ``span.status(code)`` once
    the response status is known. A no-op with tracing off."""

    __slots__ = ("_method", "_span", "_token", "traceparent")

    def __init__(self, method: str, route: str, traceparent: str | None) -> None:
        self._method = method
        self._span: Span | None = None
        self._token: object = None
        self.traceparent: str | None = None
        if _state is None:
            return
        parent = _parent(_state, _span_context(_state, traceparent))
        self._span = _state.tracer.start_span(
            f"{method} {route}", context=parent, kind=_state.trace.SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
        )  # fmt: skip
        self.traceparent = _format(self._span)
        self._token = _state.context.attach(_state.trace.set_span_in_context(self._span, parent))

    def route(self, template: str) -> None:
        """Name the span after the route that answered, once routing found it."""
        if self._span is not None:
            self._span.update_name(f"{self._method} {template}")
            self._span.set_attribute("http.route", template)

    def status(self, code: int) -> None:
        if self._span is not None:
            self._span.set_attribute("http.response.status_code", code)
            if code >= 500 and _state is not None:
                self._span.set_status(_state.trace.Status(_state.trace.StatusCode.ERROR))

    def __enter__(self) -> HttpSpan:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._span is None or _state is None:
            return
        _state.context.detach(self._token)
        _end(self._span, exc)


def http_server_span(method: str, route: str, traceparent: str | None) -> HttpSpan:
    """A SERVER span for one gateway request, current inside the ``with`` (so a task
    submitted there joins the caller's trace); ``traceparent`` from
    ``extract_traceparent(request.headers)``."""
    return HttpSpan(method, route, traceparent)
