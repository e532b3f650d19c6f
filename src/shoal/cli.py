"""The ``shoal`` command. Thin: every command calls the library and prints the answer.

Errors are one readable line on stderr and a non-zero exit; ``--debug`` (or
SHOAL_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from shoal import cli_bench, cli_status, cli_tasks, protocol
from shoal.cli_chat import register as register_chat_command
from shoal.cli_cluster import register as register_cluster_commands
from shoal.cli_config import config_app
from shoal.cli_keys import keys_app
from shoal.cli_options import (
    AsJson,
    DataDir,
    Limit,
    LogFormat,
    LogLevel,
    Namespace,
    Redis,
    err,
    out,
    print_json,
    print_line,
    to_data,
)
from shoal.cli_progress import spinner
from shoal.cli_sagas import sagas_app
from shoal.cli_services import services_app
from shoal.cli_support import ago as _ago
from shoal.cli_support import client as _client
from shoal.cli_support import parse_assignments, parse_message
from shoal.cli_support import run as _run
from shoal.cli_support import settings as _settings
from shoal.cli_support import size as _size
from shoal.cli_support import ts as _ts
from shoal.client import Client, DeadLetter
from shoal.config_file import CONFIG_ENV, ENV_PREFIX, config_path, default_map, read_config
from shoal.errors import (
    RequestFailed,
    RequestTimeout,
    ResultTimeout,
    ShoalError,
    TaskFailed,
    UnknownAgentType,
)
from shoal.keys import validate_capability
from shoal.settings import Settings

__all__ = ["app", "main", "parse_assignments", "parse_message"]

app = typer.Typer(
    help="Shoal: a distributed runtime for AI agents.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
dlq_app = typer.Typer(help="Inspect and re-drive dead-lettered tasks.", no_args_is_help=True)
engine_app = typer.Typer(help="The embedded engine on its own.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(engine_app, name="engine")
app.add_typer(keys_app, name="keys")
app.add_typer(services_app, name="services")
app.add_typer(config_app, name="config")
app.add_typer(sagas_app, name="sagas")
register_cluster_commands(app)
register_chat_command(app)


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


# --- node ------------------------------------------------------------------------


@app.command()
def node(
    app_module: Annotated[
        str,
        typer.Option(
            "--app",
            "-a",
            envvar="SHOAL_NODE_APP",
            help="Module with the Agent classes (pkg.module).",
        ),
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


cli_tasks.register(app)  # submit, call, task, tasks
cli_status.register(app)  # status


@app.command()
def cancel(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Cancel a task: at once if it has not started, else the node running it is told."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            outcome = await client.cancel(task_id)
        if as_json:
            print_line({"id": task_id, "outcome": outcome})
            return
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
    agent_type: Annotated[
        str | None, typer.Option("--type", "-t", envvar="SHOAL_AGENTS_TYPE", help="Only this type.")
    ] = None,
    capability: Annotated[str | None, typer.Option(help="Only types with this capability.")] = None,
    active: Annotated[
        bool, typer.Option("--active", help="Only agents active on a node now.")
    ] = False,
    stored: Annotated[bool, typer.Option("--stored", help="Only agents with saved state.")] = False,
    limit: Limit = 100,
    as_json: AsJson = False,
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
                print_json(to_data(found))
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
    as_json: AsJson = False,
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
            data = to_data(info)
            if state:
                data["state"] = saved
            print_json(data)
            return
        _print_agent(info)
        if state:
            if saved is None:
                out.print("no saved state")
            else:
                print_json(saved)

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
            with spinner(f"waiting for {agent_id} to reply"):
                reply = await client.request(agent_id, data, timeout=timeout)
        print_line(reply)

    _run(go())


# --- dead letters --------------------------------------------------------------------


@dlq_app.command("list")
def dlq_list(
    capability: Annotated[
        str | None, typer.Argument(help="Capability (default: every one with dead letters).")
    ] = None,
    limit: Limit = 100,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List dead-lettered tasks, oldest first, with their last error."""
    if capability is not None:
        validate_capability(capability)

    async def go() -> list[DeadLetter]:
        async with _client(redis, namespace, data_dir) as client:
            if capability is not None:
                letters = await client.dead_letters(capability, limit)
                if not letters:
                    await cli_tasks.check_capability(client, capability)
                return letters
            return await _all_dead_letters(client, limit)

    letters = _run(go())
    if as_json:
        print_json(to_data(letters))
    elif not letters:
        out.print(f"no dead letters for {capability!r}" if capability else "no dead letters")
    else:
        _print_dead_letters(letters, with_capability=capability is None)


async def _all_dead_letters(client: Client, limit: int) -> list[DeadLetter]:
    """The dead letters of every capability that has some, by capability, up to ``limit``."""
    state = await client.cluster()
    capabilities = sorted({q.capability for q in state.queues if q.dead_letters})
    letters: list[DeadLetter] = []
    for capability in capabilities:
        letters += await client.dead_letters(capability, limit - len(letters))
        if len(letters) >= limit:
            break
    return letters


def _print_dead_letters(letters: list[DeadLetter], with_capability: bool) -> None:
    columns = ["task", "attempts", "died", "last error"]
    table = Table(*(["capability", *columns] if with_capability else columns))
    for letter in letters:
        t = letter.task
        error = f"{t.error.type}: {t.error.message}" if t.error else "-"
        row = [t.id, str(t.attempts), _ts(t.finished_at), error]
        table.add_row(*([t.capability, *row] if with_capability else row))
    out.print(table)


@dlq_app.command("redrive")
def dlq_redrive(
    capability: Annotated[str, typer.Argument(help="Capability whose dead letters to re-queue.")],
    task_ids: Annotated[list[str] | None, typer.Argument(help="Task ids (default: all).")] = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Queue dead tasks again with fresh attempts."""

    async def go() -> list[str]:
        async with _client(redis, namespace, data_dir) as client:
            with spinner(f"re-queueing dead letters of {capability}"):
                return await client.redrive(capability, task_ids or None)

    done = _run(go())
    if as_json:
        print_line(done)
        return
    out.print(f"re-queued {len(done)} task(s)")
    for task_id in done:
        out.print(task_id)


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
        bool,
        typer.Option(
            "--url", envvar="SHOAL_ENGINE_STATUS_URL", help="Print the full URL (with password)."
        ),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Show whether the embedded engine runs, and where (exit code 1 if it does not)."""
    from shoal.engine import EmbeddedEngine, describe

    engine = EmbeddedEngine(data_dir or Settings.from_env().data_dir)
    record = engine.running()
    if as_json:
        facts = describe(record.url) if record else {}
        print_line({"running": record is not None, **facts, "data_dir": str(engine.data_dir)})
    elif record is None:
        out.print(f"no engine running for {engine.data_dir}")
    if record is None:
        raise typer.Exit(1)
    if as_json:
        return
    if show_url:
        out.print(record.url)
        return
    for key, value in describe(record.url).items():
        out.print(f"{key:10} {value}")
    out.print(f"{'data dir':10} {engine.data_dir}")


cli_bench.register(app)  # bench


def main() -> None:
    """Entry point: run the app, turning errors into one line and an exit code.

    Usage errors are reported by typer itself (exit 2); a failed task (``submit
    --wait``, ``call``) or request exits 3, a wait that ran out 4, any other Shoal
    error 1. ``--watch [SECONDS]`` may stand alone: its default is filled in first.
    """
    debug = "--debug" in sys.argv or os.environ.get("SHOAL_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    sys.argv[1:] = cli_status.optional_watch_value(sys.argv[1:])
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
