"""Structured logs: one JSON object a line (or text on a terminal), carrying the ids
of the work that logged.

Why JSON by default off a terminal: log shippers (Loki, Elasticsearch, CloudWatch)
index fields, and a task's lines can then be found by ``task_id`` or joined with its
trace by ``trace_id`` across every node. A person at a terminal reads text.

The ids come from context variables, not from arguments: the node makes each
attempt's and agent turn's ``TaskContext`` current (``shoal.agent.current_context``,
which ``self.ctx`` reads too) and binds its id once (``bind_node``), so every line
logged meanwhile — by Shoal or by the handler's own loggers, in a sync handler's
thread too (its context is copied) — carries them, at no cost per attempt beyond
what the runner does anyway.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

from shoal.agent import current_context
from shoal.errors import ConfigurationError
from shoal.observability import tracing

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text", "auto")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_node: contextvars.ContextVar[str | None] = contextvars.ContextVar("shoal_log_node", default=None)
_process_node: str | None = None  # the node of a one-node process (`shoal node`): for its threads


def bind_node(node_id: str) -> None:
    """Lines logged from here on in this context (and tasks it starts) name the node."""
    _node.set(node_id)


def set_process_node(node_id: str | None) -> None:
    """The node of a process that runs exactly one: named on lines that have no node
    context (its heartbeat and lease threads)."""
    global _process_node
    _process_node = node_id


def context_fields() -> dict[str, str]:
    """The ids known in the current context: task_id, agent_id, node_id, trace_id."""
    fields: dict[str, str] = {}
    work = current_context.get(None)  # the attempt's or turn's TaskContext
    trace = None
    if work is not None:
        if work.task_id:
            fields["task_id"] = work.task_id
        if work.agent_id:
            fields["agent_id"] = work.agent_id
        trace = work.traceparent
    node = _node.get() or (work.node_id if work is not None else None) or _process_node
    if node:
        fields["node_id"] = node
    trace_id = _trace_id(trace)
    if trace_id:
        fields["trace_id"] = trace_id
    return fields


def _trace_id(traceparent: str | None) -> str | None:
    if traceparent and len(traceparent) >= 35:
        return traceparent[3:35]
    if tracing.ENABLED:  # e.g. a gateway request: the current span's trace
        from opentelemetry import trace

        ctx = trace.get_current_span().get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, exc
    (the formatted traceback, when there is one) and the context's ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        line.update(context_fields())
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the context's ids appended when there are any."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = context_fields()
        fields.pop("node_id", None)  # the same on every line of a node: noise on a terminal
        if not fields:
            return text
        ids = " ".join(f"{k.removesuffix('_id')}={v}" for k, v in fields.items())
        head, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{head} [{ids}]{newline}{rest}"


class _ShoalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(
    level: str | None = None, fmt: str | None = None, *, stream: TextIO | None = None
) -> None:
    """Log to ``stream`` (default stderr) at ``level`` in format ``fmt``: json, text, or
    auto (text on a terminal, JSON otherwise). Unset, they come from SHOAL_LOG_LEVEL
    and SHOAL_LOG_FORMAT, else info and auto. Installs one handler on the root logger,
    replacing one an earlier call installed; others are left alone."""
    level_name = _choice("log level", level or os.environ.get("SHOAL_LOG_LEVEL") or "info", LEVELS)
    fmt_name = _choice("log format", fmt or os.environ.get("SHOAL_LOG_FORMAT") or "auto", FORMATS)
    out = stream if stream is not None else sys.stderr
    if fmt_name == "auto":
        fmt_name = "text" if out.isatty() else "json"
    handler = _ShoalHandler(out)
    handler.setFormatter(JsonFormatter() if fmt_name == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ShoalHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name.upper())


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> str:
    name = value.strip().lower()
    if name not in allowed:
        raise ConfigurationError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return name
