"""The ``shoal`` command. Thin: every command calls the library and prints the answer.

Errors are one readable line on stderr and a non-zero exit; ``--debug`` (or
SHOAL_DEBUG=1) shows the traceback too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from shoal import protocol
from shoal.client import Client
from shoal.cluster import ClusterState
from shoal.errors import ConfigurationError, ResultTimeout, ShoalError, TaskFailed
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

# Piped output is not wrapped at 80 columns, so ids and errors stay on one line.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Redis = Annotated[
    str | None,
    typer.Option("--redis", envvar="SHOAL_REDIS_URL", help="Engine URL (default: embedded)."),
]
Namespace = Annotated[
    str | None, typer.Option("--namespace", "-n", envvar="SHOAL_NAMESPACE", help="Key namespace.")
]
DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", envvar="SHOAL_DATA_DIR", help="Embedded engine's directory."),
]


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
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Run a worker node that hosts the agents of --app until SIGINT/SIGTERM."""
    from shoal.app import load_agents
    from shoal.node import NodeConfig, run_node

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    agents = load_agents(app_module)
    config = NodeConfig(
        concurrency=concurrency, name=name, grace_period=grace, weight=weight, zone=zone,
        heartbeat_interval=heartbeat_interval, dead_after=dead_after,
    )  # fmt: skip
    run_node(agents, _settings(redis, namespace, data_dir), config)


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
            out.print(json.dumps(result, default=repr))

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
    """Show the cluster: nodes (state, load, capabilities, heartbeat age) and queues."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            state = await client.cluster()
        if as_json:
            out.print_json(msgspec.json.encode(state).decode())
            return
        _print_nodes(state)
        _print_queues(state)

    _run(go())


def _print_nodes(state: ClusterState) -> None:
    if not state.nodes:
        out.print("no nodes (start one with: shoal node --app your.module)")
        return
    table = Table("node", "state", "host/pid", "zone", "in flight", "free", "cpu %", "rss MB",
                  "done", "heartbeat", "capabilities", title="nodes")  # fmt: skip
    colors = {"alive": "green", "suspect": "yellow", "dead": "red"}
    for n in state.nodes:
        note = f" [red]{n.stalled}[/red]" if n.stalled else ""
        table.add_row(
            n.id, f"[{colors[n.state]}]{n.state}[/]", f"{n.host}/{n.pid}", n.zone or "-",
            str(n.in_flight), str(n.free), f"{n.cpu_percent:.0f}", f"{n.rss_bytes / 2**20:.0f}",
            str(n.completed), f"{n.heartbeat_age_s:.1f}s ago", ",".join(n.capabilities) + note,
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
    from shoal.engine import EmbeddedEngine, mask_url

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

    Usage errors are reported by typer itself (exit 2); a failed task exits 3, a
    wait that ran out 4, any other Shoal error 1.
    """
    debug = "--debug" in sys.argv or os.environ.get("SHOAL_DEBUG") == "1"
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        sys.exit(_report(exc))


def _report(exc: Exception) -> int:
    if isinstance(exc, TaskFailed):
        err.print(f"error: {exc}")
        return 3
    if isinstance(exc, ResultTimeout):
        err.print(f"error: {exc}")
        return 4
    if isinstance(exc, ShoalError):
        err.print(f"error: {exc}")
        return 1
    err.print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for details)")
    return 1


if __name__ == "__main__":
    main()
