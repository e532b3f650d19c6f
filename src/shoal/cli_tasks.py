"""``shoal submit``, ``call``, ``task`` and ``tasks``: queue tasks, wait for them,
look at one, list many.

Thin, like every command: each calls shoal.Client and prints the answer. Errors
reach ``shoal.cli.main``, which prints them as one line with an exit code (3: the
task failed, 4: the wait ran out).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from shoal import protocol
from shoal.cli_options import (
    AgentId,
    Arguments,
    AsJson,
    DataDir,
    Deadline,
    Delay,
    IdempotencyKey,
    Limit,
    MaxAttempts,
    Namespace,
    Priority,
    Redis,
    Timeout,
    WaitTimeout,
    err,
    out,
    print_json,
    print_line,
    to_data,
)
from shoal.cli_progress import spinner, wait_for_result
from shoal.cli_support import ago, client, parse_assignments, run, ts
from shoal.client import Client, TaskHandle
from shoal.errors import ConfigurationError
from shoal.options import TaskOptions
from shoal.tasklist import TaskPage, validate_query

Capability = Annotated[str, typer.Argument(help="Capability to run.")]
STATUS_COLORS = {
    "succeeded": "green", "failed": "red", "dead": "red", "expired": "yellow",
    "cancelled": "yellow", "running": "cyan",
}  # fmt: skip


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app`` (the ``shoal`` group)."""
    app.command()(submit)
    app.command()(call)
    app.command()(task)
    app.command()(tasks)


# --- submit and call ---------------------------------------------------------------


def submit(
    capability: Capability,
    arguments: Arguments = None,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Wait and print the result.")] = False,
    wait_timeout: WaitTimeout = None,
    priority: Priority = "normal",
    delay: Delay = None,
    timeout: Timeout = None,
    deadline: Deadline = None,
    max_attempts: MaxAttempts = None,
    idempotency_key: IdempotencyKey = None,
    agent: AgentId = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Submit a task and print its id (or, with --wait, its result as JSON)."""
    kwargs = parse_assignments(arguments or [])
    options = TaskOptions.build(
        priority=priority, delay=delay, timeout=timeout, deadline=deadline,
        max_attempts=max_attempts, idempotency_key=idempotency_key,
    )  # fmt: skip

    async def go() -> None:
        async with client(redis, namespace, data_dir) as c:
            handle = await _submit(c, capability, kwargs, options, agent)
            if wait:
                await _wait_and_print(c, handle, wait_timeout, as_json)
            elif as_json:
                print_line({"id": handle.id, "new": handle.is_new})
            else:
                out.print(handle.id)

    run(go())


def call(
    capability: Capability,
    arguments: Arguments = None,
    wait_timeout: WaitTimeout = None,
    priority: Priority = "normal",
    delay: Delay = None,
    timeout: Timeout = None,
    deadline: Deadline = None,
    max_attempts: MaxAttempts = None,
    idempotency_key: IdempotencyKey = None,
    agent: AgentId = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Run a task and print its result as JSON: submit, then wait.

    On a terminal, a progress bar on stderr follows the task's progress events. Exit
    code 3 if the task fails, 4 if --wait-timeout runs out (the task goes on).
    """
    submit(
        capability, arguments, True, wait_timeout, priority, delay, timeout, deadline,
        max_attempts, idempotency_key, agent, as_json, redis, namespace, data_dir,
    )  # fmt: skip


async def _submit(
    c: Client, capability: str, kwargs: dict[str, Any], options: TaskOptions, agent: str | None
) -> TaskHandle:
    """Queue the task (arguments as data: a handler argument named like an option,
    say ``priority=``, stays the handler's); note on stderr if nobody can run it yet."""
    handle = await c.submit_arguments(capability, kwargs, options, agent=agent)
    if not await c.hosts(capability):
        err.print(f"note: no live node hosts {capability!r} yet; the task waits", markup=False)
    return handle


async def _wait_and_print(
    c: Client, handle: TaskHandle, timeout: float | None, as_json: bool
) -> None:
    result = await wait_for_result(c, handle, timeout)
    print_line({"id": handle.id, "result": result} if as_json else result)


# --- one task --------------------------------------------------------------------------


def task(
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    events: Annotated[bool, typer.Option("--events", help="Also list its events.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream its events until it ends.")
    ] = False,
    traceback: Annotated[bool, typer.Option("--traceback", help="Show error tracebacks.")] = False,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show a task: status, attempts, result or errors, and optionally its events.

    --events lists the events so far; --follow streams them until the task ends, then
    prints how it ended.
    """
    protocol.validate_task_id(task_id)

    async def go() -> None:
        async with client(redis, namespace, data_dir) as c:
            if as_json:
                await _task_json(c, task_id, events, follow)
                return
            info, result = await _snapshot(c, task_id)
            _print_task(info, result, traceback)
            if follow:
                await _print_events(c.events(task_id))
                info, result = await _snapshot(c, task_id)
                out.print(_outcome(info, result), markup=False)
            elif events:
                await _print_events(_aiter(await c.event_history(task_id)))

    run(go())


async def _snapshot(c: Client, task_id: str) -> tuple[protocol.TaskInfo, Any]:
    """The task's record and, if it succeeded, its result."""
    info = await c.status(task_id)
    return info, await c.result(task_id) if info.status == "succeeded" else None


def _task_data(info: protocol.TaskInfo, result: Any) -> dict[str, Any]:
    data: dict[str, Any] = to_data(info)
    data["result"] = result
    return data


async def _task_json(c: Client, task_id: str, events: bool, follow: bool) -> None:
    """One JSON document (the record, plus ``events`` with --events); with --follow,
    JSON lines instead: each event as it comes, then the final record."""
    if follow:
        async for event in c.events(task_id):
            print_line(to_data(event))
        print_line(_task_data(*await _snapshot(c, task_id)))
        return
    data = _task_data(*await _snapshot(c, task_id))
    if events:
        data["events"] = to_data(await c.event_history(task_id))
    print_json(data)


def _print_task(info: protocol.TaskInfo, result: Any, traceback: bool) -> None:
    table = Table(show_header=False, box=None)
    rows = [
        ("id", info.id), ("capability", info.capability), ("status", info.status),
        ("priority", info.priority), ("attempts", f"{info.attempts} of {info.max_attempts or '-'}"),
        ("node", info.node or "-"), ("created", ts(info.created_at)),
        ("started", ts(info.started_at)), ("finished", ts(info.finished_at)),
    ]  # fmt: skip
    if info.scheduled_for:
        rows.append(("scheduled for", ts(info.scheduled_for)))
    if info.parent:
        rows.append(("parent", info.parent))
    if info.submitted_by:
        rows.append(("submitted by", f"API key {info.submitted_by}"))
    if info.usage:
        rows.append(("usage", ", ".join(f"{k}={v}" for k, v in info.usage.items())))
    if info.duplicates:
        rows.append(("duplicates", f"{info.duplicates} late outcome(s) refused (first one kept)"))
    if info.hosted is False:
        rows.append(("note", f"no live node hosts {info.capability!r} yet; the task waits"))
    if info.cancel_requested and not info.done:
        rows.append(("note", "cancellation requested"))
    if info.status == "succeeded":
        rows.append(("result", json.dumps(result, default=repr)))
    for name, value in rows:
        table.add_row(f"[bold]{name}[/bold]", _plain(str(value)))
    out.print(table)
    for error in info.errors or ((info.error,) if info.error else ()):
        line = f"attempt {error.attempt}: {error.type}: {error.message}"
        out.print(line, style="red", markup=False)
        if traceback and error.traceback:
            out.print(error.traceback.rstrip(), markup=False)


def _plain(text: str) -> Text:
    """A cell shown as it is: a result such as ``"[bold]"`` is not rich markup."""
    return Text(text)


async def _print_events(events: AsyncIterator[protocol.Event]) -> None:
    """One line per event: id, time, kind and data as JSON."""
    async for event in events:
        data = json.dumps(event.data, default=repr)
        out.print(f"{event.id}  {ts(event.at)}  {event.kind}  {data}", markup=False)


def _outcome(info: protocol.TaskInfo, result: Any) -> str:
    """How the task ended, in one line: the result, or the last error."""
    if info.status == "succeeded":
        return f"task {info.id} succeeded: {json.dumps(result, default=repr)}"
    if info.error is not None:
        return f"task {info.id} {info.status}: {info.error.type}: {info.error.message}"
    return f"task {info.id} {info.status}"


async def _aiter(items: list[protocol.Event]) -> AsyncIterator[protocol.Event]:
    for item in items:
        yield item


# --- many tasks ------------------------------------------------------------------------


def tasks(
    capability: Annotated[
        str | None, typer.Option("--capability", help="Only tasks of this capability.")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", help=f"Only tasks in this status: {', '.join(protocol.STATUSES)}."
        ),
    ] = None,
    limit: Limit = 50,
    cursor: Annotated[
        str | None, typer.Option(help="Start after this task id (the 'next' of a page).")
    ] = None,
    all_pages: Annotated[
        bool,
        typer.Option(
            "--all",
            envvar="SHOAL_TASKS_ALL",
            help="Every page, not only the first (--limit: page size).",
        ),
    ] = False,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List tasks, newest first, filtered by capability and status.

    Tasks created within the retention period; one page at a time (--cursor), or --all.
    """
    validate_query(capability, status, limit, cursor)

    async def go() -> TaskPage:
        async with client(redis, namespace, data_dir) as c:
            with spinner("listing tasks"):
                page = await _pages(c, capability, status, limit, cursor, all_pages)
            if not page.tasks and not as_json:
                await check_capability(c, capability)
        return page

    page = run(go())
    if as_json:
        print_json({"tasks": to_data(page.tasks), "next": page.next})
        return
    _print_tasks(page, capability, status)


async def _pages(
    c: Client,
    capability: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
    every: bool,
) -> TaskPage:
    """One page from ``cursor``, or with ``every`` all pages from there, joined."""
    page = await c.list_tasks(capability=capability, status=status, limit=limit, cursor=cursor)
    found = list(page.tasks)
    while every and page.next is not None:
        page = await c.list_tasks(
            capability=capability, status=status, limit=limit, cursor=page.next
        )
        found += page.tasks
    return TaskPage(tuple(found), page.next)


async def check_capability(c: Client, capability: str | None) -> None:
    """An empty listing for a capability no node ever hosted and no task ever named
    is most likely a typo: say so, with the ones that exist."""
    if capability is None:
        return
    known = sorted({q.capability for q in (await c.cluster()).queues})
    if capability not in known:
        raise ConfigurationError(
            f"no capability {capability!r} in namespace {c.settings.namespace!r} "
            f"(known: {', '.join(known) or 'none yet'})"
        )


def _print_tasks(page: TaskPage, capability: str | None, status: str | None) -> None:
    if not page.tasks:
        what = [
            *([f"of capability {capability!r}"] if capability else []),
            *([f"in status {status!r}"] if status else []),
        ]
        out.print(" ".join(["no tasks", *what]), markup=False)
    else:
        now = protocol.now_ms()
        table = Table("task", "capability", "status", "attempts", "node", "created", "finished")
        for t in page.tasks:
            color = STATUS_COLORS.get(t.status, "default")
            table.add_row(
                t.id, t.capability, f"[{color}]{t.status}[/]", str(t.attempts), t.node or "-",
                ago(t.created_at, now), ago(t.finished_at, now),
            )  # fmt: skip
        out.print(table)
    if page.next is not None:
        out.print(f"(more: shoal tasks --cursor {page.next}, or --all)", markup=False)
