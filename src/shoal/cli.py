"""The ``shoal`` command. Thin: every command calls the library and prints the answer.

Errors are one readable line on stderr and a non-zero exit; ``--debug`` (or
SHOAL_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.table import Table

from shoal import protocol
from shoal.cli_cluster import register as register_cluster_commands
from shoal.cli_keys import keys_app
from shoal.cli_options import DataDir, LogFormat, LogLevel, Namespace, Redis, err, out
from shoal.client import Client
from shoal.cluster import ClusterState
from shoal.config_file import CONFIG_ENV, ENV_PREFIX, config_path, default_map, read_config
from shoal.errors import (
    ConfigurationError,
    RequestFailed,
    RequestTimeout,
    ResultTimeout,
    ShoalError,
    TaskFailed,
    UnknownAgentType,
)
from shoal.settings import Settings

T = TypeVar("T")

app = typer.Typer(
    help="Shoal: a distributed runtime for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
dlq_app = typer.Typer(help="Inspect and re-drive dead-lettered tasks.", no_args_is_help=True)
engine_app = typer.Typer(help="The embedded engine on its own.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(engine_app, name="engine")
app.add_typer(keys_app, name="keys")
register_cluster_commands(app)


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", envvar=CONFIG_ENV, help="Settings file (default: ./shoal.toml if present)."
        ),
    ] = None,
) -> None:
    """Shoal: a distributed runtime for AI agents.

    Every option can also be set by an environment variable, SHOAL_<COMMAND>_<OPTION>
    (e.g. SHOAL_NODE_CONCURRENCY=32), or in shoal.toml; flags win over variables,
    variables over the file.
    """
    path = config_path(config)
    if path is not None:
        ctx.default_map = default_map(ctx.command, read_config(path), path)


def _settings(redis: str | None, namespace: str | None, data_dir: Path | None) -> Settings:
    return Settings.from_env(redis, namespace, data_dir)


def _client(redis: str | None, namespace: str | None, data_dir: Path | None) -> Client:
    """The client every command uses: flags, then SHOAL_* variables, then defaults."""
    return Client(settings=_settings(redis, namespace, data_dir))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _ago(ms: int | None, now_ms: int) -> str:
    """How long ago an epoch-ms time was, shortly: 4.2s, 3m12s, 5h03m or 2d04h ago."""
    if ms is None:
        return "-"
    elapsed = max(0, now_ms - ms) / 1000
    if elapsed < 60:
        return f"{elapsed:.1f}s ago"
    s = int(elapsed)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m ago"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h ago"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.1f} MiB"


def _print_line(value: Any) -> None:
    """One line of JSON, exactly as it is: no rich markup, emoji codes or wrapping
    (``[true]`` would otherwise be read as markup, and a long result wrapped)."""
    out.out(json.dumps(value, default=repr), highlight=False)


def parse_message(text: str) -> Any:
    """A message given on the command line: JSON (a bare word is not taken as text)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigurationError(
            f'message {text!r} is not JSON ({exc}); pass JSON, e.g. \'{{"text": "hi"}}\', '
            "'3', or '\"hi\"' for a string"
        ) from None


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; a value that parses as JSON is taken as JSON, else as text."""
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ConfigurationError(
                f"argument {pair!r} is not key=value with a valid name (e.g. text=hello n=3)"
            )
        try:
            kwargs[key] = json.loads(raw)
        except ValueError:
            kwargs[key] = raw
    return kwargs


# --- node ------------------------------------------------------------------------


@app.command()
def node(
    app_module: Annotated[
        str, typer.Option("--app", "-a", help="Module with the Agent classes (pkg.module).")
    ],
    concurrency: Annotated[int, typer.Option(help="Tasks run at once.", min=1)] = 64,
    name: Annotated[str | None, typer.Option(help="Node id (default host-pid-random).")] = None,
    grace: Annotated[float, typer.Option(help="Seconds to finish work on SIGTERM.", min=0)] = 30,
    heartbeat_interval: Annotated[
        float, typer.Option(help="Seconds between heartbeats.", min=0.05)
    ] = 1.0,
    dead_after: Annotated[
        float, typer.Option(help="Silence after which a node counts as dead (seconds).")
    ] = 3.0,
    weight: Annotated[float, typer.Option(help="Relative capacity of this node.")] = 1.0,
    zone: Annotated[str, typer.Option(help="Zone / rack / region label.")] = "",
    max_active_agents: Annotated[
        int, typer.Option(help="Agents kept active at once; beyond, idle ones are deactivated.")
    ] = 10_000,
    idle_after: Annotated[
        float, typer.Option(help="Deactivate an agent without messages this long (seconds).")
    ] = 300.0,
    lease_time: Annotated[
        float | None,
        typer.Option(help="Lifetime of partition leases, seconds (default: --dead-after)."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(help="Serve Prometheus /metrics on this port (0: any free one).", min=0),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option(help="Address /metrics listens on (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Run a worker node that hosts the agents of --app until SIGINT/SIGTERM."""
    from shoal.app import load_agents
    from shoal.node import NodeConfig, run_node
    from shoal.observability.logs import configure_logging

    configure_logging(log_level, log_format)
    config = NodeConfig(
        concurrency=concurrency, name=name, grace_period=grace, weight=weight, zone=zone,
        heartbeat_interval=heartbeat_interval, dead_after=dead_after,
        max_active_agents=max_active_agents, idle_after=idle_after, lease_time=lease_time,
        metrics_port=metrics_port, metrics_host=metrics_host,
    )  # fmt: skip
    agents = load_agents(app_module)
    run_node(agents, _settings(redis, namespace, data_dir), config)


@app.command()
def gateway(
    host: Annotated[
        str, typer.Option(help="Address to bind; off loopback, API keys are required.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve.", min=0, max=65535)] = 8000,
    insecure: Annotated[
        bool, typer.Option(help="Serve a non-loopback address even without API keys.")
    ] = False,
    max_body: Annotated[int, typer.Option(help="Largest request body (bytes).", min=1)] = (
        1024 * 1024
    ),
    key_rate: Annotated[
        float, typer.Option(help="Requests/s per API key unless the key sets its own.", min=0)
    ] = 100.0,
    key_burst: Annotated[int, typer.Option(help="Burst per API key (default).", min=1)] = 200,
    max_waits: Annotated[
        int, typer.Option(help="Event streams, ?wait= polls and requests held at once.", min=1)
    ] = 500,
    max_waits_per_key: Annotated[
        int, typer.Option(help="The same, per API key (or for all callers when open).", min=1)
    ] = 50,
    no_dashboard: Annotated[bool, typer.Option(help="Do not serve the dashboard at /.")] = False,
    log_level: LogLevel = None,
    log_format: LogFormat = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Serve the HTTP API (/v1, OpenAPI at /docs), /metrics and the dashboard at /."""
    from shoal.gateway.server import run_gateway
    from shoal.gateway.state import GatewayConfig
    from shoal.observability.logs import configure_logging

    configure_logging(log_level, log_format)
    config = GatewayConfig(
        host=host, port=port, insecure=insecure, max_body=max_body,
        key_rate=key_rate or None, key_burst=key_burst, dashboard=not no_dashboard,
        max_waits=max_waits, max_waits_per_key=max_waits_per_key,
    )  # fmt: skip
    run_gateway(_settings(redis, namespace, data_dir), config)


# --- tasks -------------------------------------------------------------------------


@app.command()
def submit(
    capability: Annotated[str, typer.Argument(help="Capability to run.")],
    arguments: Annotated[
        list[str] | None, typer.Argument(help="Handler arguments as key=value (JSON values).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait and print the result.")] = False,
    wait_timeout: Annotated[
        float | None, typer.Option(help="Give up waiting after this many seconds.")
    ] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    delay: Annotated[float | None, typer.Option(help="Run after this many seconds.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Running-time limit, seconds.")] = None,
    deadline: Annotated[
        float | None, typer.Option(help="Do not start later than this many seconds from now.")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(help="Attempts before dead-letter.")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Same key, same task.")] = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Submit a task and print its id (or, with --wait, its result as JSON)."""
    kwargs = parse_assignments(arguments or [])

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            handle = await client.submit(
                capability, priority=priority, delay=delay, timeout=timeout, deadline=deadline,
                max_attempts=max_attempts, idempotency_key=idempotency_key, **kwargs,
            )  # fmt: skip
            if not wait:
                out.print(handle.id)
                if not await client.hosts(capability):
                    err.print(f"note: no live node hosts {capability!r} yet; the task waits")
                return
            result = await handle.result(timeout=wait_timeout)
            _print_line(result)

    _run(go())


@app.command()
def task(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    events: Annotated[bool, typer.Option("--events", help="Also list its events.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Stream events live.")] = False,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show error tracebacks.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the record as JSON.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show a task: status, attempts, result or error, and optionally its events."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            info = await client.status(task_id)
            result = None
            if info.status == "succeeded":
                result = await client.result(task_id)
            if as_json:
                data = msgspec.to_builtins(info)
                data["result"] = result
                out.print_json(json.dumps(data, default=repr))
            else:
                _print_task(info, result, traceback)
            if events or follow:
                await _print_events(client, task_id, follow)

    _run(go())


def _print_task(info: protocol.TaskInfo, result: Any, traceback: bool) -> None:
    table = Table(show_header=False, box=None)
    rows = [
        ("id", info.id), ("capability", info.capability), ("status", info.status),
        ("priority", info.priority), ("attempts", f"{info.attempts} of {info.max_attempts or '-'}"),
        ("node", info.node or "-"), ("created", _ts(info.created_at)),
        ("started", _ts(info.started_at)), ("finished", _ts(info.finished_at)),
    ]  # fmt: skip
    if info.scheduled_for:
        rows.append(("scheduled for", _ts(info.scheduled_for)))
    if info.parent:
        rows.append(("parent", info.parent))
    if info.duplicates:
        rows.append(("duplicates", f"{info.duplicates} late outcome(s) refused (first one kept)"))
    if info.hosted is False:
        rows.append(("note", f"no live node hosts {info.capability!r} yet; the task waits"))
    if info.cancel_requested and not info.done:
        rows.append(("note", "cancellation requested"))
    if info.status == "succeeded":
        rows.append(("result", json.dumps(result, default=repr)))
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", str(value))
    out.print(table)
    for error in info.errors or ((info.error,) if info.error else ()):
        out.print(f"[red]attempt {error.attempt}: {error.type}: {error.message}[/red]")
        if traceback and error.traceback:
            out.print(error.traceback.rstrip())


async def _print_events(client: Client, task_id: str, follow: bool) -> None:
    """The events so far; with --follow, then live until the task ends."""
    events = client.events(task_id) if follow else _aiter(await client.event_history(task_id))
    async for event in events:
        data = json.dumps(event.data, default=repr)
        out.print(f"{event.id}  {_ts(event.at)}  {event.kind}  {data}")


async def _aiter(items: list[protocol.Event]) -> AsyncIterator[protocol.Event]:
    for item in items:
        yield item


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show the cluster: nodes (state, load, agents, heartbeat age), queues, and agent
    types (partition owners, mailbox backlog, recent ownership changes)."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            state = await client.cluster()
        if as_json:
            out.print_json(msgspec.json.encode(state).decode())
            return
        _print_nodes(state)
        _print_queues(state)
        _print_agent_types(state)
        _print_key_groups(state)

    _run(go())


def _print_key_groups(state: ClusterState) -> None:
    """Where the namespace's keys live: one line for a single group, else how the
    groups spread over the Cluster's shards."""
    groups = state.key_groups
    if len(groups) <= 1:
        return
    shards: dict[str, list[int]] = {}
    for g in groups:
        shards.setdefault(g.shard or "-", []).append(g.group)
    table = Table("shard", "key groups", "slots", title=f"{len(groups)} key groups")
    for shard, members in sorted(shards.items()):
        slots = ", ".join(str(groups[m].slot) for m in members)
        table.add_row(shard, ", ".join(map(str, members)), slots)
    out.print(table)


def _print_nodes(state: ClusterState) -> None:
    if not state.nodes:
        out.print("no nodes (start one with: shoal node --app your.module)")
        return
    table = Table("node", "state", "host/pid", "zone", "in flight", "free", "cpu %", "rss MB",
                  "done", "partitions", "active agents", "heartbeat", "metrics",
                  "capabilities", title="nodes")  # fmt: skip
    colors = {"alive": "green", "suspect": "yellow", "dead": "red"}
    for n in state.nodes:
        note = f" [red]{n.stalled}[/red]" if n.stalled else ""
        table.add_row(
            n.id, f"[{colors[n.state]}]{n.state}[/]", f"{n.host}/{n.pid}", n.zone or "-",
            str(n.in_flight), str(n.free), f"{n.cpu_percent:.0f}", f"{n.rss_bytes / 2**20:.0f}",
            str(n.completed), str(n.partitions), str(n.active_agents),
            f"{n.heartbeat_age_s:.1f}s ago", f":{n.metrics_port}" if n.metrics_port else "-",
            ",".join(n.capabilities) + note,
        )  # fmt: skip
    out.print(table)


def _print_queues(state: ClusterState) -> None:
    table = Table("capability", "priority", "waiting", "running", "oldest", "consumers",
                  "dead letters", "duplicates", title="queues")  # fmt: skip
    for q in state.queues:
        oldest = f"{q.oldest_age_s:.1f}s" if q.oldest_age_s is not None else "-"
        table.add_row(q.capability, q.priority, str(q.waiting), str(q.pending), oldest,
                      str(q.consumers), str(q.dead_letters), str(q.duplicates))  # fmt: skip
    out.print(table if state.queues else "no queues yet")
    if state.delayed:
        out.print(f"{state.delayed} task(s) scheduled for later (delays, retry back-off)")


def _print_agent_types(state: ClusterState) -> None:
    """Partition owners and backlog per agent type; nothing if no node hosted any."""
    if not state.agent_types:
        return
    table = Table("agent type", "partitions", "owned by (partitions)", "unowned", "backlog",
                  title="agent types")  # fmt: skip
    for t in state.agent_types:
        owners = ", ".join(f"{node} ({count})" for node, count in t.owners.items()) or "-"
        unowned = f"[yellow]{t.unowned}[/]" if t.unowned else "0"
        table.add_row(t.name, str(t.partitions), owners, unowned, str(t.backlog))
    out.print(table)
    if state.ownership:
        out.print("recent ownership changes (newest first):")
        for c in state.ownership:
            out.print(f"  {_ts(c.at)}  {c.type} partition {c.partition}  {c.event} by {c.node} "
                      f"(token {c.token})")  # fmt: skip


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Cancel a task: at once if it has not started, else the node running it is told."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            outcome = await client.cancel(task_id)
        messages = {
            "cancelled": "cancelled",
            "cancelling": "cancelling: the node running it stops it and records 'cancelled'",
        }
        ended = outcome.removeprefix("already_")
        out.print(messages.get(outcome, f"not cancelled: the task already ended ({ended})"))

    _run(go())


# --- agents -----------------------------------------------------------------------------


@app.command()
def agents(
    agent_type: Annotated[str | None, typer.Option("--type", "-t", help="Only this type.")] = None,
    capability: Annotated[str | None, typer.Option(help="Only types with this capability.")] = None,
    active: Annotated[
        bool, typer.Option("--active", help="Only agents active on a node now.")
    ] = False,
    stored: Annotated[bool, typer.Option("--stored", help="Only agents with saved state.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entries as JSON.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List agents: those active on a node and those with saved state."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            found = await client.agents(
                agent_type, capability=capability, active=True if active else None,
                with_state=True if stored else None, limit=limit,
            )  # fmt: skip
            if as_json:
                out.print_json(msgspec.json.encode(found).decode())
                return
            if not found:
                out.print(await _no_agents(client, agent_type, capability, active, stored))
                return
        now = protocol.now_ms()
        table = Table("agent", "node", "partition", "activated", "last message", "state")
        for a in found:
            table.add_row(a.id, a.node or "-", str(a.partition), _ago(a.activated_at, now),
                          _ago(a.last_message_at, now),
                          _size(a.state_size) if a.state_size else "-")  # fmt: skip
        out.print(table)
        if len(found) == limit:
            out.print(f"(showing {limit}; there may be more: raise --limit)")

    _run(go())


async def _no_agents(
    client: Client, agent_type: str | None, capability: str | None, active: bool, stored: bool
) -> str:
    """Why the directory is empty, or an error if the filter names nothing that exists."""
    types = await client.agent_types()
    known = ", ".join(sorted(types)) or "none yet: start a node that hosts agent types"
    if agent_type is not None and agent_type not in types:
        raise UnknownAgentType(
            f"no node has hosted agent type {agent_type!r} in namespace "
            f"{client.settings.namespace!r} (known types: {known})"
        )
    if capability is not None and not any(capability in t.capabilities for t in types.values()):
        raise UnknownAgentType(f"no agent type has capability {capability!r} (types: {known})")
    if not types:
        return "no agent types yet (start a node that hosts some: shoal node --app your.module)"
    what = [
        *([f"of type {agent_type!r}"] if agent_type else []),
        *([f"with capability {capability!r}"] if capability else []),
        *(["active on a node"] if active else []),
        *(["with saved state"] if stored else []),
    ]
    if not what:
        return "no agents: none is active on a node and none has saved state"
    return " ".join(["no agents", *what])


@app.command()
def agent(
    agent_id: Annotated[str, typer.Argument(help="Agent id, type/key.")],
    state: Annotated[bool, typer.Option("--state", help="Also print its saved state.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the entry as JSON.")] = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show one agent: partition, node (if active), times, state size; --state: its state."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            info = await client.agent(agent_id)
            saved = await client.agent_state(agent_id) if state else None
        if as_json:
            data = msgspec.to_builtins(info)
            if state:
                data["state"] = saved
            out.print_json(json.dumps(data, default=repr))
            return
        _print_agent(info)
        if state:
            if saved is None:
                out.print("no saved state")
            else:
                out.print_json(json.dumps(saved, default=repr))

    _run(go())


def _print_agent(info: protocol.AgentInfo) -> None:
    now = protocol.now_ms()
    table = Table(show_header=False, box=None)
    rows = [
        ("id", info.id), ("type", info.type), ("key", info.key),
        ("partition", str(info.partition)), ("node", info.node or "- (not active)"),
        ("activated", f"{_ts(info.activated_at)}  ({_ago(info.activated_at, now)})"
         if info.activated_at else "-"),
        ("last message", f"{_ts(info.last_message_at)}  ({_ago(info.last_message_at, now)})"
         if info.last_message_at else "-"),
        ("state", _size(info.state_size) if info.state_size else "none saved"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", value)
    out.print(table)


@app.command()
def send(
    agent_id: Annotated[str, typer.Argument(help="Agent id, type/key.")],
    message: Annotated[str, typer.Argument(help="The message, as JSON.")],
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Send a message to an agent's mailbox (durable, one-way)."""
    data = parse_message(message)

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            await client.send(agent_id, data)
        out.print(f"sent to {agent_id}")

    _run(go())


@app.command()
def request(
    agent_id: Annotated[str, typer.Argument(help="Agent id, type/key.")],
    message: Annotated[str, typer.Argument(help="The message, as JSON.")],
    timeout: Annotated[float, typer.Option(help="Give up waiting after this many seconds.")] = 30.0,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Send a message to an agent and print its reply as JSON."""
    data = parse_message(message)

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            reply = await client.request(agent_id, data, timeout=timeout)
        _print_line(reply)

    _run(go())


# --- dead letters --------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    capability: Annotated[str, typer.Argument(help="Capability whose dead letters to list.")],
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List dead-lettered tasks with their last error."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            letters = await client.dead_letters(capability, limit)
        table = Table("task", "attempts", "died", "last error")
        for letter in letters:
            t = letter.task
            error = f"{t.error.type}: {t.error.message}" if t.error else "-"
            table.add_row(t.id, str(t.attempts), _ts(t.finished_at), error)
        out.print(table if letters else f"no dead letters for {capability!r}")

    _run(go())


@dlq_app.command("redrive")
def dlq_redrive(
    capability: Annotated[str, typer.Argument(help="Capability whose dead letters to re-queue.")],
    task_ids: Annotated[list[str] | None, typer.Argument(help="Task ids (default: all).")] = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Queue dead tasks again with fresh attempts."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            done = await client.redrive(capability, task_ids or None)
        out.print(f"re-queued {len(done)} task(s)")
        for task_id in done:
            out.print(task_id)

    _run(go())


# --- the embedded engine ----------------------------------------------------------------


@engine_app.command("start")
def engine_start(data_dir: DataDir = None) -> None:
    """Start the embedded engine (or report the one already running)."""
    from shoal.addresses import mask_url
    from shoal.engine import EmbeddedEngine

    engine = EmbeddedEngine(data_dir or Settings.from_env().data_dir)
    already = engine.running()
    record = already or engine.ensure()
    verb = "already running" if already else "started"
    out.print(f"engine {verb}: {mask_url(record.url)} (pid {record.pid}, data {engine.data_dir})")


@engine_app.command("stop")
def engine_stop(data_dir: DataDir = None) -> None:
    """Stop the embedded engine (its data stays in the data directory)."""
    from shoal.engine import EmbeddedEngine

    engine = EmbeddedEngine(data_dir or Settings.from_env().data_dir)
    out.print("engine stopped" if engine.stop() else "no engine was running")


@engine_app.command("status")
def engine_status(
    data_dir: DataDir = None,
    show_url: Annotated[
        bool, typer.Option("--url", help="Print the full URL (with password).")
    ] = False,
) -> None:
    """Show whether the embedded engine runs, and where."""
    from shoal.engine import EmbeddedEngine, describe

    engine = EmbeddedEngine(data_dir or Settings.from_env().data_dir)
    record = engine.running()
    if record is None:
        out.print(f"no engine running for {engine.data_dir}")
        raise typer.Exit(1)
    if show_url:
        out.print(record.url)
        return
    for key, value in describe(record.url).items():
        out.print(f"{key:10} {value}")
    out.print(f"{'data dir':10} {engine.data_dir}")


def main() -> None:
    """Entry point: run the app, turning errors into one line and an exit code.

    Usage errors are reported by typer itself (exit 2); a failed task or request
    exits 3, a wait that ran out 4, any other Shoal error 1.
    """
    debug = "--debug" in sys.argv or os.environ.get("SHOAL_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app(auto_envvar_prefix=ENV_PREFIX)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        sys.exit(_report(exc))


def _report(exc: Exception) -> int:
    if isinstance(exc, ShoalError):
        message = str(exc)
    else:
        message = f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)"
    # As is: a message quoting user input ('[/x]', ':smile:') is not rich markup.
    err.print(f"error: {message}", markup=False, emoji=False)
    if isinstance(exc, TaskFailed | RequestFailed):
        return 3
    if isinstance(exc, ResultTimeout | RequestTimeout):
        return 4
    return 1


if __name__ == "__main__":
    main()
