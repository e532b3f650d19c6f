"""Prometheus metrics of Shoal nodes and gateways, on a registry of Shoal's own.

Why our own ``REGISTRY`` rather than prometheus_client's global one: an application
that embeds Shoal keeps its metrics apart from ours, and a test process (many
nodes in one process) starts from a known set. Every name starts with ``shoal_``.

Three kinds, by who updates them:

- **node-side**: what this process's nodes did — attempts by capability and
  outcome, run time and queue wait, takeovers, duplicates, agent activations,
  turns and partition moves; plus gauges read from the live nodes when scraped.
- **gateway-side**: defined here, incremented by the gateway (HTTP requests, rate
  limiting, submissions) through ``observe_http``, ``rate_limited`` and
  ``tasks_submitted``.
- **cluster-wide**: gauges of the whole namespace read from the engine by
  ``refresh_cluster_gauges`` (queues, nodes, partitions, backlogs), for the one
  scrape target that should report them: the gateway's ``/metrics``.

Why the per-attempt figures are not plain prometheus_client metrics: they are on
a node's hot path (~20k tasks/s), where labelled children cost ~2 µs an attempt
(a lock per update) — about a tenth of a node's CPU per no-op task. They are kept
as plain ints on the node's event loop (``TaskStats``, ~0.3 µs an attempt) and
turned into metric families only when scraped (``_TaskCollector``). Everything
rarer uses ordinary Counters.
"""

from __future__ import annotations

import socket
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from shoal.errors import ConfigurationError

if TYPE_CHECKING:
    from shoal.client import Client
    from shoal.cluster import ClusterState

REGISTRY = CollectorRegistry()

# Handler run time and queue wait span no-op tasks (well under a millisecond) to
# LLM calls of minutes, so the buckets do too.
TASK_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
# the buckets' "le" labels as the text format writes them, computed once
_LE = [repr(float(bound)) for bound in TASK_BUCKETS] + ["+Inf"]
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# finish.lua's outcome kinds, as the metric labels say them; None: the attempt was
# abandoned (its node was declared dead meanwhile), "crashed": the runner raised.
OUTCOME_LABELS: dict[str | None, str] = {
    "ok": "succeeded", "retry": "retried", "dead": "dead", "failed": "failed",
    "cancelled": "cancelled", "requeue": "handed_back", None: "abandoned", "crashed": "crashed",
}  # fmt: skip


# --- node-side: per-attempt figures, kept as plain ints ---------------------------------


class Buckets:
    """A histogram's counts per bucket (not cumulative) and sum, updated on one thread."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(TASK_BUCKETS) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(TASK_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> tuple[list[tuple[str, float]], float]:
        """(le, count) pairs as the exposition wants them, and the sum. The counts are
        copied at once, so the +Inf bucket (the count) is consistent with the others."""
        counts, total = self.counts.copy(), self.total
        running, pairs = 0, []
        for le, count in zip(_LE, counts, strict=True):
            running += count
            pairs.append((le, float(running)))
        return pairs, total


class TaskStats:
    """One capability's attempts on this process's nodes."""

    __slots__ = ("outcomes", "run", "started", "wait")

    def __init__(self) -> None:
        self.started = 0
        self.outcomes = dict.fromkeys(OUTCOME_LABELS.values(), 0)
        self.run = Buckets()
        self.wait = Buckets()


TASKS: dict[str, TaskStats] = {}  # by capability (the attempt hook reads it directly)


def task_stats(capability: str) -> TaskStats:
    stats = TASKS.get(capability)
    if stats is None:
        stats = TASKS[capability] = TaskStats()
    return stats


class _TaskCollector(Collector):
    """Turns ``TaskStats`` into metric families when scraped."""

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        started, finished, run, wait = families = self._families()
        for capability, stats in sorted(TASKS.copy().items()):
            started.add_metric([capability], stats.started)
            for outcome, count in stats.outcomes.copy().items():
                finished.add_metric([capability, outcome], count)
            run.add_metric([capability], *stats.run.cumulative())
            wait.add_metric([capability], *stats.wait.cumulative())
        return families

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily(
                "shoal_tasks_started",
                "Attempts started on this process's nodes, by capability (addressed-agent "
                "tasks included).",
                labels=["capability"],
            ),
            CounterMetricFamily(
                "shoal_tasks_finished",
                "Attempts ended on this process's nodes, by capability and outcome: "
                "succeeded, retried, dead, failed, cancelled, handed_back (a draining node "
                "re-queued it), abandoned (the node was declared dead meanwhile), crashed. "
                "The engine's record is the truth for the task: a late duplicate is refused "
                "there (see shoal_duplicate_outcomes_total).",
                labels=["capability", "outcome"],
            ),
            HistogramMetricFamily(
                "shoal_task_run_seconds",
                "How long handlers ran, per attempt, by capability.",
                labels=["capability"],
            ),
            HistogramMetricFamily(
                "shoal_task_queue_wait_seconds",
                "How long attempts waited in their queue (or mailbox) before a node started "
                "them: from when the entry was queued (at submit, or when a delayed task or "
                "retry became due) to the start, by capability.",
                labels=["capability"],
            ),
        ]


# --- node-side: live gauges, read from the nodes when scraped ----------------------------

_NODES: dict[str, Callable[[], Mapping[str, Any]]] = {}
_NODES_LOCK = threading.Lock()
_NODE_GAUGES = {  # field of Node._load() -> (metric name, help)
    "in_flight": ("shoal_node_in_flight", "Capability tasks running on the node now."),
    "free": ("shoal_node_free_slots", "Free task slots of the node (concurrency - in flight)."),
    "active_agents": ("shoal_node_active_agents", "Agents active (in memory) on the node."),
    "partitions": ("shoal_node_partitions", "Agent partitions whose lease the node holds."),
    "config_version": ("shoal_node_config_version", "The live config version the node applied."),
}


def track_node(node_id: str, load: Callable[[], Mapping[str, Any]]) -> None:
    """Report a node's live figures (``load``, as its heartbeat reads them) on scrape."""
    with _NODES_LOCK:
        _NODES[node_id] = load


def untrack_node(node_id: str) -> None:
    with _NODES_LOCK:
        _NODES.pop(node_id, None)


class _NodeCollector(Collector):
    def describe(self) -> Iterable[Metric]:
        gauges = _NODE_GAUGES.values()
        return [GaugeMetricFamily(name, text, labels=["node"]) for name, text in gauges]

    def collect(self) -> Iterable[Metric]:
        with _NODES_LOCK:
            nodes = sorted(_NODES.items())
        families = {
            field: GaugeMetricFamily(name, text, labels=["node"])
            for field, (name, text) in _NODE_GAUGES.items()
        }
        for node_id, load in nodes:
            figures = load()
            for field, family in families.items():
                family.add_metric([node_id], float(figures.get(field, 0)))
        return list(families.values())


REGISTRY.register(_TaskCollector())
REGISTRY.register(_NodeCollector())


# --- node-side: rarer events -------------------------------------------------------------

NODES_DECLARED_DEAD = Counter(
    "shoal_nodes_declared_dead",
    "Nodes this process declared dead (silent past dead_after) and took the work of.",
    registry=REGISTRY,
)
TASKS_RECLAIMED = Counter(
    "shoal_tasks_reclaimed",
    "Tasks a dead node had started, taken over by this process: requeued, or "
    "dead_lettered when they had no attempt left.",
    ["outcome"],
    registry=REGISTRY,
)
DUPLICATE_OUTCOMES = Counter(
    "shoal_duplicate_outcomes",
    "Outcomes this process's nodes sent that the engine refused: the task had been "
    "finished elsewhere, or re-run after a takeover (the first recorded result wins).",
    registry=REGISTRY,
)
AGENT_ACTIVATIONS = Counter(
    "shoal_agent_activations",
    "Agents activated (instance created, state loaded) on this process's nodes.",
    ["agent_type"],
    registry=REGISTRY,
)
AGENT_DEACTIVATIONS = Counter(
    "shoal_agent_deactivations",
    "Agent activations that ended on this process's nodes: idle, evicted, or their "
    "partition moved or was lost.",
    ["agent_type"],
    registry=REGISTRY,
)
AGENT_TURNS = Counter(
    "shoal_agent_turns",
    "Mailbox entries agents handled, by kind: task (addressed task), msg (send or "
    "request), pub (published), del (state deletion), bcast (broadcast).",
    ["agent_type", "kind"],
    registry=REGISTRY,
)
PARTITION_CHANGES = Counter(
    "shoal_partition_changes",
    "Agent partition leases this process's nodes acquired, released (handed over or "
    "drained) or lost (not renewed in time).",
    ["agent_type", "change"],
    registry=REGISTRY,
)

_turn_children: dict[tuple[str, str], Any] = {}


def agent_turn(agent_type: str, kind: str) -> None:
    """Count one turn (its child looked up once: ``labels()`` costs ~1 µs)."""
    child = _turn_children.get((agent_type, kind))
    if child is None:
        child = _turn_children[agent_type, kind] = AGENT_TURNS.labels(agent_type, kind)
    child.inc()


def partitions_changed(change: str, parts: Iterable[tuple[str, int]]) -> None:
    for agent_type, _ in parts:
        PARTITION_CHANGES.labels(agent_type, change).inc()


def tasks_reclaimed(requeued: int, dead_lettered: int) -> None:
    if requeued:
        TASKS_RECLAIMED.labels("requeued").inc(requeued)
    if dead_lettered:
        TASKS_RECLAIMED.labels("dead_lettered").inc(dead_lettered)


# --- gateway-side (incremented by the gateway) ----------------------------------------------

HTTP_REQUESTS = Counter(
    "shoal_http_requests",
    "HTTP requests the gateway answered, by route template (not the raw path, so the "
    "label set stays bounded), method and status code.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
HTTP_REQUEST_SECONDS = Histogram(
    "shoal_http_request_duration_seconds",
    "How long the gateway took to answer, by route template and method.",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
RATE_LIMITED = Counter(
    "shoal_rate_limited",
    "Requests refused by a rate limit, by API key id ('anonymous' without a key).",
    ["key"],
    registry=REGISTRY,
)
TASKS_SUBMITTED = Counter(
    "shoal_tasks_submitted",
    "Tasks accepted through the gateway, by capability.",
    ["capability"],
    registry=REGISTRY,
)


GATEWAY_WAITING = Gauge(
    "shoal_gateway_waiting_requests",
    "Requests the gateway holds while they wait: event streams, ?wait= polls and agent "
    "requests (bounded by --max-waits).",
    registry=REGISTRY,
)


def observe_http(route: str, method: str, status: int, seconds: float) -> None:
    """One answered request (``route`` is the template, e.g. ``/tasks/{task_id}``)."""
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_REQUEST_SECONDS.labels(route, method).observe(seconds)


def rate_limited(key_id: str | None) -> None:
    RATE_LIMITED.labels(key_id or "anonymous").inc()


def tasks_submitted(capability: str, count: int = 1) -> None:
    TASKS_SUBMITTED.labels(capability).inc(count)


# --- cluster-wide gauges, read from the engine ------------------------------------------------


def _gauge(name: str, text: str, labels: list[str]) -> Gauge:
    return Gauge(name, text, labels, registry=REGISTRY)


CLUSTER_QUEUE_DEPTH = _gauge(
    "shoal_cluster_queue_depth",
    "Entries in a queue not yet acknowledged (waiting + pending).",
    ["capability", "priority"],
)
CLUSTER_QUEUE_WAITING = _gauge(
    "shoal_cluster_queue_waiting", "Entries no node has taken yet.", ["capability", "priority"]
)
CLUSTER_QUEUE_PENDING = _gauge(
    "shoal_cluster_queue_pending", "Entries running on a node.", ["capability", "priority"]
)
CLUSTER_QUEUE_OLDEST_AGE = _gauge(
    "shoal_cluster_queue_oldest_age_seconds",
    "Age of the oldest entry of a queue (0 when empty).",
    ["capability", "priority"],
)
# Dead letters and duplicates are kept per capability in the engine (one dead-letter
# stream and one counter for all priorities): labelling them by priority would repeat
# the same number and make sum() count it thrice.
CLUSTER_DEAD_LETTERS = _gauge(
    "shoal_cluster_dead_letters", "Tasks in a capability's dead-letter queue.", ["capability"]
)
CLUSTER_DUPLICATES = _gauge(
    "shoal_cluster_duplicates",
    "Late outcomes of a capability's tasks refused by the engine (first result wins).",
    ["capability"],
)
CLUSTER_NODES = _gauge(
    "shoal_cluster_nodes",
    "Nodes by state: alive, suspect (a heartbeat is late), dead (declared dead in the last hour).",
    ["state"],
)
CLUSTER_NODE_IN_FLIGHT = _gauge(
    "shoal_cluster_node_in_flight", "Tasks running on a live node (its last heartbeat).", ["node"]
)
CLUSTER_NODE_FREE = _gauge(
    "shoal_cluster_node_free_slots", "Free task slots of a live node (last heartbeat).", ["node"]
)
CLUSTER_NODE_CPU = _gauge(
    "shoal_cluster_node_cpu_percent", "CPU use of a live node's process, percent.", ["node"]
)
CLUSTER_NODE_RSS = _gauge(
    "shoal_cluster_node_rss_bytes", "Resident memory of a live node's process.", ["node"]
)
CLUSTER_PARTITIONS_OWNED = _gauge(
    "shoal_cluster_partitions_owned",
    "Partitions of an agent type whose lease a node holds.",
    ["node", "agent_type"],
)
CLUSTER_PARTITIONS_UNOWNED = _gauge(
    "shoal_cluster_partitions_unowned",
    "Partitions of an agent type no node holds a lease on.",
    ["agent_type"],
)
CLUSTER_AGENT_BACKLOG = _gauge(
    "shoal_cluster_agent_backlog",
    "Entries waiting in an agent type's mailboxes.",
    ["agent_type"],
)
CLUSTER_DELAYED = Gauge(
    "shoal_cluster_delayed_tasks",
    "Tasks scheduled for later (delays and retry back-off).",
    registry=REGISTRY,
)
_CLUSTER_FAMILIES = (
    CLUSTER_QUEUE_DEPTH, CLUSTER_QUEUE_WAITING, CLUSTER_QUEUE_PENDING, CLUSTER_QUEUE_OLDEST_AGE,
    CLUSTER_DEAD_LETTERS, CLUSTER_DUPLICATES, CLUSTER_NODES, CLUSTER_NODE_IN_FLIGHT,
    CLUSTER_NODE_FREE, CLUSTER_NODE_CPU, CLUSTER_NODE_RSS, CLUSTER_PARTITIONS_OWNED,
    CLUSTER_PARTITIONS_UNOWNED, CLUSTER_AGENT_BACKLOG,
)  # fmt: skip
NODE_STATES = ("alive", "suspect", "dead")


async def refresh_cluster_gauges(client: Client) -> None:
    """Read the cluster's state from the engine and set the cluster-wide gauges (for
    a gateway's ``/metrics``: call it before ``render``)."""
    set_cluster_gauges(await client.cluster())


def set_cluster_gauges(state: ClusterState) -> None:
    """Set the cluster-wide gauges to ``state``. Each labelled family is cleared first,
    so a node that left or a queue that went away disappears instead of showing its
    last value forever. No await in here: a scrape on the same event loop never sees
    a half-filled family."""
    for family in _CLUSTER_FAMILIES:
        family.clear()
    for queue in state.queues:
        labels = (queue.capability, queue.priority)
        CLUSTER_QUEUE_DEPTH.labels(*labels).set(queue.depth)
        CLUSTER_QUEUE_WAITING.labels(*labels).set(queue.waiting)
        CLUSTER_QUEUE_PENDING.labels(*labels).set(queue.pending)
        CLUSTER_QUEUE_OLDEST_AGE.labels(*labels).set(queue.oldest_age_s or 0.0)
        CLUSTER_DEAD_LETTERS.labels(queue.capability).set(queue.dead_letters)
        CLUSTER_DUPLICATES.labels(queue.capability).set(queue.duplicates)
    states = dict.fromkeys(NODE_STATES, 0)
    for node in state.nodes:
        states[node.state] = states.get(node.state, 0) + 1
        if node.state == "dead":
            continue  # its last heartbeat's figures are history, not load
        CLUSTER_NODE_IN_FLIGHT.labels(node.id).set(node.in_flight)
        CLUSTER_NODE_FREE.labels(node.id).set(node.free)
        CLUSTER_NODE_CPU.labels(node.id).set(node.cpu_percent)
        CLUSTER_NODE_RSS.labels(node.id).set(node.rss_bytes)
    for name, count in states.items():
        CLUSTER_NODES.labels(name).set(count)
    for agent_type in state.agent_types:
        for node_id, owned in agent_type.owners.items():
            CLUSTER_PARTITIONS_OWNED.labels(node_id, agent_type.name).set(owned)
        CLUSTER_PARTITIONS_UNOWNED.labels(agent_type.name).set(agent_type.unowned)
        CLUSTER_AGENT_BACKLOG.labels(agent_type.name).set(agent_type.backlog)
    CLUSTER_DELAYED.set(state.delayed)


# --- exposition ----------------------------------------------------------------------------


def render(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The metrics in Prometheus' text format: (body, content type), for any handler."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


HEALTH_PATH = "/healthz"  # alive: restart the process if this fails
READY_PATH = "/readyz"  # ready: send it work (route to it) only while this succeeds

Probe = Callable[[], tuple[bool, str]]  # (ok, why) for a health endpoint


class MetricsServer:
    """``/metrics`` of this process on ``host:port`` (port 0: a free one, see ``port``),
    served from a daemon thread; with probes, also ``/healthz`` and ``/readyz`` (200
    or 503 with the reason as text), so an orchestrator can probe a node on the port
    it already scrapes.

    prometheus_client's own ``start_http_server`` serves metrics on every path; its
    WSGI app behind a small path switch keeps its exposition and adds the probes."""

    def __init__(
        self, host: str, port: int, health: Probe | None = None, ready: Probe | None = None
    ) -> None:
        self._probes = {HEALTH_PATH: health, READY_PATH: ready}
        self._metrics_app = make_wsgi_app(REGISTRY)
        try:
            server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
            self._server = make_server(
                host, port, self._app, server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.host = host

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        probe = self._probes.get(environ.get("PATH_INFO", ""))
        if probe is None:
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        ok, why = probe()
        status = "200 OK" if ok else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [why.encode() + b"\n"]

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access line on stderr per scrape or probe (as prometheus_client does)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


# --- service calls (shoal.services; any process that calls services) -------------------------

SERVICE_CALLS = Counter(
    "shoal_service_calls",
    "Calls to registered services made from this process, by service, instance and "
    "outcome: ok, failed (counted by the instance's breaker) or refused (a 429: the "
    "instance works but said to come back later).",
    ["service", "instance", "outcome"],
    registry=REGISTRY,
)
SERVICE_CALL_SECONDS = Histogram(
    "shoal_service_call_duration_seconds",
    "How long one attempt of a service call took, by service.",
    ["service"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
SERVICE_REJECTED = Counter(
    "shoal_service_rejected",
    "Service calls refused before reaching the network, by reason: circuit_open, "
    "bulkhead_full, no_instance.",
    ["service", "reason"],
    registry=REGISTRY,
)
SERVICE_RETRIES = Counter(
    "shoal_service_retries",
    "Service call attempts that were retries of a failed attempt.",
    ["service"],
    registry=REGISTRY,
)
SERVICE_FALLBACKS = Counter(
    "shoal_service_fallback_answers",
    "Answers of fallback chains, by chain and the step that answered.",
    ["chain", "source"],
    registry=REGISTRY,
)
SERVICE_BREAKER_STATE = Gauge(
    "shoal_service_breaker_state",
    "Each watched instance's circuit breaker as this process sees it: 0 closed, "
    "1 half-open, 2 open.",
    ["service", "instance"],
    registry=REGISTRY,
)
BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}


def fallback_answered(chain: str, source: str) -> None:
    SERVICE_FALLBACKS.labels(chain, source).inc()


# --- the two-level cache (shoal.coordination.cache; any process that uses one) --------------


class CacheStats:
    """One cache's figures in this process, as plain ints: a local hit must stay a
    dict lookup of a few µs, and a labelled Counter's ``inc()`` takes a lock."""

    __slots__ = (
        "dropped", "invalidated", "local_hits", "local_misses", "remote_hits", "remote_misses",
        "sizes",
    )  # fmt: skip

    def __init__(self) -> None:
        self.local_hits = 0
        self.local_misses = 0
        self.remote_hits = 0
        self.remote_misses = 0
        self.invalidated = 0  # local copies dropped by another process's write
        self.dropped = 0  # whole local levels dropped (subscription lost or replaced)
        # The Cache objects of that name (each has ``local_bytes()``), held weakly:
        # a cache whose client was never closed must not live on for the metric.
        self.sizes: weakref.WeakSet[Any] = weakref.WeakSet()


CACHES: dict[str, CacheStats] = {}  # by cache name, shared by the clients of the process


def cache_stats(name: str) -> CacheStats:
    stats = CACHES.get(name)
    if stats is None:
        stats = CACHES[name] = CacheStats()
    return stats


class _CacheCollector(Collector):
    """Turns ``CacheStats`` into metric families when scraped."""

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        hits, misses, invalidated, dropped, size = families = self._families()
        for name, stats in sorted(CACHES.copy().items()):
            hits.add_metric([name, "local"], stats.local_hits)
            hits.add_metric([name, "remote"], stats.remote_hits)
            misses.add_metric([name, "local"], stats.local_misses)
            misses.add_metric([name, "remote"], stats.remote_misses)
            invalidated.add_metric([name], stats.invalidated)
            dropped.add_metric([name], stats.dropped)
            size.add_metric([name], float(sum(c.local_bytes() for c in list(stats.sizes))))
        return families

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily(
                "shoal_cache_hits",
                "Cache reads answered, by cache and level: local (this process's LRU) or "
                "remote (the engine, after a local miss).",
                labels=["cache", "level"],
            ),
            CounterMetricFamily(
                "shoal_cache_misses",
                "Cache reads not answered by a level, by cache and level (a local miss goes "
                "on to the engine; a remote miss finds nothing there either).",
                labels=["cache", "level"],
            ),
            CounterMetricFamily(
                "shoal_cache_invalidations",
                "Local copies dropped because another process wrote or deleted the key.",
                labels=["cache"],
            ),
            CounterMetricFamily(
                "shoal_cache_local_drops",
                "Times this process dropped a cache's whole local level because its "
                "invalidation subscription broke or was re-established.",
                labels=["cache"],
            ),
            GaugeMetricFamily(
                "shoal_cache_local_bytes",
                "Bytes the cache's local level holds in this process (bounded by "
                "max_local_bytes per client).",
                labels=["cache"],
            ),
        ]


REGISTRY.register(_CacheCollector())
# --- sagas (shoal.coordination.saga) -----------------------------------------------------

SAGAS_ENDED = Counter(
    "shoal_sagas_ended",
    "Sagas whose coordinator in this process ended them, by status: succeeded, "
    "compensated, cancelled, compensation_failed.",
    ["status"],
    registry=REGISTRY,
)
SAGA_RESUMES = Counter(
    "shoal_saga_resumes",
    "Sagas this process's runner resumed from their log (after a takeover, a node's "
    "stop, or an engine error).",
    registry=REGISTRY,
)
SAGAS_DRIVEN = Gauge(
    "shoal_sagas_driven",
    "Sagas this process's SagaRunner drives now (at most the node's max_sagas).",
    registry=REGISTRY,
)


def saga_ended(status: str) -> None:
    SAGAS_ENDED.labels(status).inc()


# --- model calls (shoal.llm) -------------------------------------------------------------

LLM_TOKENS = Counter(
    "shoal_llm_tokens",
    "Model tokens used, as the provider reported them, by agent type, provider, model, "
    'the Shoal API key that submitted the task ("-" when none) and kind (prompt or '
    "completion).",
    ["agent_type", "provider", "model", "api_key", "kind"],
    registry=REGISTRY,
)
LLM_REQUESTS = Counter(
    "shoal_llm_requests",
    "Model calls by provider and outcome: ok, rate_limited, server_error, timeout, "
    "connection_error, stream_broken, bad_request, auth_error, quota_exceeded.",
    ["provider", "outcome"],
    registry=REGISTRY,
)
LLM_ANSWERS = Counter(
    "shoal_llm_answers",
    "Model answers by the provider that gave them (after failover along a fallback "
    "chain, the one that answered) and whether the answer came from the response cache.",
    ["provider", "source"],
    registry=REGISTRY,
)
LLM_TIME_TO_FIRST_TOKEN = Histogram(
    "shoal_llm_time_to_first_token_seconds",
    "Seconds from sending a streamed model call to its first content token, by provider.",
    ["provider"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
LLM_CACHE = Counter(
    "shoal_llm_response_cache",
    "Deterministic model requests looked up in the response cache, by agent type and "
    "result (hit or miss).",
    ["agent_type", "result"],
    registry=REGISTRY,
)
LLM_QUOTA_WAIT = Histogram(
    "shoal_llm_quota_wait_seconds",
    "Seconds a model call waited for its provider's cluster-wide quota (requests and "
    "tokens per minute), by provider.",
    ["provider"],
    buckets=HTTP_BUCKETS,
    registry=REGISTRY,
)
LLM_QUOTA_EXCEEDED = Counter(
    "shoal_llm_quota_exceeded",
    "Model calls refused with QuotaExceeded (the wait for quota would be too long, or "
    "the request is bigger than the quota allows at once), by provider and kind "
    "(requests or tokens).",
    ["provider", "kind"],
    registry=REGISTRY,
)
