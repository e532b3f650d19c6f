"""``shoal bench``: the quick benchmark (shoal.benchmark) from an installed package,
printed as a table or as JSON.

Thin: the measuring is shoal.benchmark's; this picks the engine, shows progress on
a terminal and prints the figures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from shoal.benchmark import QuickProfile, private_engine, run_quick
from shoal.cli_options import AsJson, DataDir, Namespace, Redis, err, out, print_json
from shoal.cli_progress import bar

DEFAULTS = QuickProfile()


def register(app: typer.Typer) -> None:
    """Add ``bench`` to ``app`` (the ``shoal`` group)."""
    app.command()(bench)


def bench(
    tasks: Annotated[
        int, typer.Option(help="No-op tasks per throughput run.", min=1)
    ] = DEFAULTS.tasks,
    nodes: Annotated[
        int, typer.Option(help="Throughput with 1, 2, .. this many node processes.", min=1)
    ] = DEFAULTS.nodes,
    round_trips: Annotated[
        int, typer.Option(help="Sequential task round trips (one node).", min=1)
    ] = DEFAULTS.round_trips,
    requests: Annotated[
        int, typer.Option(help="Sequential agent requests (one node); 0 skips them.", min=0)
    ] = DEFAULTS.requests,
    concurrency: Annotated[
        int, typer.Option(help="Tasks each node runs at once.", min=1)
    ] = DEFAULTS.concurrency,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Measure Shoal on this machine: throughput and round trips (quick profile).

    No-op task throughput with 1..N node processes, task round trips (p50/p99) and
    agent request round trips; about 10-30 s with the defaults.

    Runs on a private temporary engine unless --redis (or SHOAL_REDIS_URL) or
    --data-dir names one; each node count gets a fresh namespace (--namespace: their
    prefix). Peers (Celery, Dramatiq, arq, taskiq), Cluster and Sentinel engines and
    failover are in the repository's bench/ suite and the `bench` extra, not here.
    """
    profile = QuickProfile(tasks, nodes, round_trips, requests, concurrency)
    with _engine(redis, data_dir) as url, _steps(profile) as step:
        result = run_quick(profile, url, namespace, step)
    if as_json:
        print_json(result)
    else:
        out.print(table(result))


@contextlib.contextmanager
def _engine(redis: str | None, data_dir: Path | None) -> Iterator[str]:
    """The engine to measure: the URL given, the embedded engine of --data-dir, or a
    private one (nothing else running on it, removed at the end)."""
    if redis:
        yield redis
    elif data_dir is not None:
        from shoal.engine import EmbeddedEngine

        yield EmbeddedEngine(data_dir).ensure().url
    else:
        with private_engine() as url:
            yield url


@contextlib.contextmanager
def _steps(profile: QuickProfile) -> Iterator[Callable[[str], None]]:
    """A bar over the run's steps on a terminal (stderr); elsewhere nothing."""
    if not err.is_terminal:
        yield lambda name: None
        return
    names = profile.steps()
    with bar() as progress:
        row = progress.add_task("starting node processes", total=len(names))

        def step(name: str) -> None:
            done = names.index(name) if name in names else 0
            progress.update(row, completed=done, description=name)

        yield step


def table(result: dict[str, Any]) -> Table:
    """The figures: one row per measurement."""
    figures = Table("measurement", "n", "result", title="shoal bench (quick profile)")
    for run in result["throughput"]:
        figures.add_row(
            f"throughput, {run['nodes']} node(s)", str(run["tasks"]),
            f"{run['tasks_per_s']:,} tasks/s",
        )  # fmt: skip
    for key, name in (("task_round_trip", "task round trip"), ("agent_request", "agent request")):
        rtt = result.get(key)
        if rtt:
            figures.add_row(
                name, str(rtt["n"]),
                f"p50 {rtt['p50_ms']:.2f} ms, p99 {rtt['p99_ms']:.2f} ms",
            )  # fmt: skip
    figures.caption = f"engine {result['engine']}; {result['machine']['cpus']} CPUs"
    return figures
