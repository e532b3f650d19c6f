"""``shoal sagas``: list sagas, show one with its steps and its log, cancel one,
retry the compensations of one stuck in compensation_failed.

Thin, like every command: each calls ``client.sagas`` (shoal.coordination.saga) and
prints the answer. Errors reach ``shoal.cli.main``, which prints them as one line
with an exit code (an unknown saga id exits 1).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from shoal import protocol
from shoal.cli_options import AsJson, DataDir, Namespace, Redis, out, print_json, to_data
from shoal.cli_support import ago as _ago
from shoal.cli_support import client as _client
from shoal.cli_support import run as _run
from shoal.cli_support import ts as _ts
from shoal.coordination.saga import SagaInfo

sagas_app = typer.Typer(
    help="List durable sagas, show one's steps and log, cancel one, retry a stuck one's "
    "compensations.",
    no_args_is_help=True,
)

COLOURS = {
    "pending": "cyan", "running": "cyan", "compensating": "yellow", "succeeded": "green",
    "compensated": "yellow", "cancelled": "magenta", "compensation_failed": "red",
    "failed": "red", "unknown": "yellow",
}  # fmt: skip


def _coloured(status: str) -> Text:
    return Text(status, style=COLOURS.get(status, ""))


@sagas_app.command("list")
def list_sagas(
    status: Annotated[
        str | None,
        typer.Option(
            help="Only sagas in this status: pending, running, compensating, succeeded, "
            "compensated, cancelled, compensation_failed."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many (1..1000).")] = 50,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List sagas, newest first: status, the step they are at, and why they failed."""

    async def go() -> list[SagaInfo]:
        async with _client(redis, namespace, data_dir) as client:
            return await client.sagas.list(status=status, limit=limit)

    sagas = _run(go())
    if as_json:
        print_json(to_data(sagas))
    elif not sagas:
        out.print("no sagas" + (f" in status {status}" if status else ""), markup=False)
    else:
        out.print(_list_table(sagas))


def _list_table(sagas: list[SagaInfo]) -> Table:
    now = protocol.now_ms()
    table = Table("saga", "name", "status", "step", "started", "updated", "error")
    for saga in sagas:
        at = saga.steps[saga.step].name if 0 <= saga.step < len(saga.steps) else "-"
        table.add_row(
            Text(saga.id), Text(saga.name), _coloured(saga.status),
            Text(f"{saga.step + 1}/{len(saga.steps)} {at}"), _ago(saga.created_at, now),
            _ago(saga.updated_at, now), Text(saga.error or "-"),
        )  # fmt: skip
    return table


@sagas_app.command("show")
def show(
    saga_id: Annotated[str, typer.Argument(help="Saga id (see: shoal sagas list).")],
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show a saga: its steps (task ids, results, errors, compensations) and its log."""

    async def go() -> SagaInfo:
        async with _client(redis, namespace, data_dir) as client:
            return await client.sagas.get(saga_id)

    saga = _run(go())
    if as_json:
        print_json(to_data(saga))
        return
    out.print(f"saga {saga.id} ({saga.name}): ", _coloured(saga.status), end="")
    out.print(f"  started {_ts(saga.created_at)}", markup=False)
    if saga.cancel_requested:
        out.print("cancellation requested", markup=False)
    if saga.error:
        out.print(f"error: {saga.error}", markup=False)
    out.print(f"driven by node: {saga.coordinator or '-'}", markup=False)
    out.print(_steps_table(saga))
    out.print(_log_table(saga))


def _steps_table(saga: SagaInfo) -> Table:
    table = Table("#", "step", "capability", "status", "task", "compensation", "outcome",
                  title="steps")  # fmt: skip
    for n, step in enumerate(saga.steps):
        undo = step.compensate or "-"
        if step.compensation_task:
            undo = f"{undo} ({step.compensation_task})"
        table.add_row(
            str(n + 1), Text(step.name), Text(step.capability + (f" @{step.agent}" if step.agent
                                                                 else "")),
            _coloured(step.status), Text(step.task or "-"), Text(undo), Text(_outcome(step)),
        )  # fmt: skip
    return table


def _outcome(step: Any) -> str:
    problem = step.compensation_error or step.error
    if problem:
        return f"{problem.get('type', '?')}: {problem.get('message', '')}"
    return "-" if step.result is None else repr(step.result)[:80]


def _log_table(saga: SagaInfo) -> Table:
    table = Table("at", "event", "step", "task", "node", title="log")
    for entry in saga.log:
        step = "-" if entry.step is None else saga.steps[entry.step].name
        table.add_row(
            _ts(entry.at), Text(entry.event), Text(step), Text(entry.task or "-"),
            Text(entry.node or "-"),
        )  # fmt: skip
    return table


@sagas_app.command("cancel")
def cancel(
    saga_id: Annotated[str, typer.Argument(help="Saga id (see: shoal sagas list).")],
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Cancel a saga: its running step's task is cancelled and the steps that
    completed (or may have) are compensated; it ends 'cancelled'. Prints
    'cancelling', or 'already_<status>' for a saga that had ended."""

    async def go() -> str:
        async with _client(redis, namespace, data_dir) as client:
            return await client.sagas.cancel(saga_id)

    out.print(_run(go()), markup=False)


@sagas_app.command("retry-compensation")
def retry_compensation(
    saga_id: Annotated[str, typer.Argument(help="Id of a saga in compensation_failed.")],
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Retry the compensations of a saga stuck in compensation_failed, once the
    cause is fixed: the failed one runs again, then the earlier ones (a node's
    saga runner picks it up at once). Compensations must be idempotent."""

    async def go() -> str:
        async with _client(redis, namespace, data_dir) as client:
            return await client.sagas.retry_compensation(saga_id)

    out.print(_run(go()), markup=False)
