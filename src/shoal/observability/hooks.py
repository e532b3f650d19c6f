"""What a node does around each attempt and agent turn (metrics, spans), and over its
own lifetime (tracing setup, its id on log lines, its /metrics server) — in one
place, so the node loop, the attempt runner and the agent host each make one call
and stay short.

The attempt hook is on the hot path: with tracing off it costs a few plain-int
updates and three clock reads (well under a microsecond).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from shoal.observability import logs, metrics, tracing

if TYPE_CHECKING:
    from shoal.agent import TaskContext
    from shoal.execution import Job, Outcome

_TASK_STATS = metrics.TASKS  # read directly on the hot path: a call less per attempt


class AttemptWatch:
    """Around one attempt: counts it, times it and its queue wait, and (tracing on)
    opens its span, whose context the handler's ``ctx`` then passes on. (Log lines
    get the attempt's ids from ``ctx``, which the runner makes current.)"""

    __slots__ = ("_span", "_start", "_stats")

    def __init__(self, job: Job, node_id: str, ctx: TaskContext) -> None:
        stats = self._stats = _TASK_STATS.get(job.capability) or metrics.task_stats(job.capability)
        stats.started += 1
        # a stream entry id starts with the engine's time (ms) at XADD: when it was queued
        now = time.time()
        queued_ms = int(job.entry_id.partition("-")[0] or now * 1000)
        waited = now - queued_ms / 1000
        stats.wait.observe(waited if waited > 0 else 0.0)  # < 0: the clocks differ a little
        self._span: tracing.WorkSpan | None = None
        if tracing.ENABLED:
            self._span = tracing.start_attempt(
                job.task_id, job.capability, job.attempt, job.traceparent, node_id,
                ctx.agent_id, queued_ms,
            )  # fmt: skip
            ctx.traceparent = self._span.traceparent
        self._start = time.perf_counter()

    def end(self, outcome: Outcome | None, error: BaseException | None) -> None:
        """``outcome`` None: abandoned, or (with ``error``) the runner itself raised."""
        stats = self._stats
        stats.run.observe(time.perf_counter() - self._start)
        if outcome is not None:
            label = metrics.OUTCOME_LABELS[outcome.kind]
        else:
            label = "crashed" if error is not None else "abandoned"
        stats.outcomes[label] += 1
        if self._span is not None:
            self._span.end(label, error)


class TurnWatch:
    """Around one agent message turn (tracing on): its span, whose context the
    handler's ``ctx`` then passes on."""

    __slots__ = ("_span",)

    def __init__(self, kind: str, node_id: str, ctx: TaskContext) -> None:
        self._span: tracing.WorkSpan | None = None
        if tracing.ENABLED:
            agent_id = ctx.agent_id or ""
            self._span = tracing.start_turn(kind, agent_id, ctx.traceparent, node_id, ctx.topic)
            ctx.traceparent = self._span.traceparent

    def end(self, error: BaseException | None) -> None:
        if self._span is not None:
            self._span.end("failed" if error is not None else "succeeded", error)


class NodeTelemetry:
    """A node's observability over its lifetime: tracing set up before it connects,
    its id on log lines, its live gauges, and its ``/metrics`` server if asked for."""

    def __init__(
        self,
        node_id: str,
        host: str,
        port: int | None,
        load: Callable[[], Mapping[str, Any]],
        health: metrics.Probe | None = None,
        ready: metrics.Probe | None = None,
    ) -> None:
        self.node_id = node_id
        self._host, self._port = host, port
        self._load = load
        self._health, self._ready = health, ready
        self._server: metrics.MetricsServer | None = None

    @property
    def metrics_port(self) -> int | None:
        """The port ``/metrics`` is served on (the one picked, when asked for port 0)."""
        return self._server.port if self._server is not None else None

    def start(self) -> None:
        """In the node's task, before it connects (its context is inherited by the
        node's loops, so their lines name the node)."""
        tracing.configure("shoal-node")
        logs.bind_node(self.node_id)
        if self._port is not None:
            self._server = metrics.MetricsServer(self._host, self._port, self._health, self._ready)
        metrics.track_node(self.node_id, self._load)

    async def stop(self) -> None:
        metrics.untrack_node(self.node_id)
        if self._server is not None:
            await asyncio.to_thread(self._server.close)  # waits for its serve loop's poll
            self._server = None
        if tracing.ENABLED:
            await asyncio.to_thread(tracing.flush)
