"""``shoal status``: the cluster at a glance — nodes, queues, agent types, where the
keys live — once, or refreshed in place with ``--watch``.

Each part is built as a rich renderable rather than printed, so the one-shot view
and the live one are the same drawing.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shoal.cli_options import (
    AsJson,
    DataDir,
    Namespace,
    Redis,
    out,
    print_json,
    print_line,
    to_data,
)
from shoal.cli_support import client, run, ts
from shoal.client import Client
from shoal.cluster import ClusterState
from shoal.protocol import now_ms

DEFAULT_WATCH_S = 2.0
Watch = Annotated[
    float | None,
    typer.Option(
        "--watch",
        metavar="[SECONDS]",
        min=0.1,
        help=f"Refresh every SECONDS (default {DEFAULT_WATCH_S:g}) until Ctrl-C; "
        "with --json, one line per refresh.",
    ),
]


def register(app: typer.Typer) -> None:
    """Add ``status`` to ``app`` (the ``shoal`` group)."""
    app.command()(status)


def status(
    watch: Watch = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Show the cluster: nodes, queues, agent types and partition ownership.

    Nodes with state, load, agents and heartbeat age; queues; agent types with their
    partition owners, mailbox backlog and recent ownership changes. --watch redraws it.
    """

    async def once() -> None:
        async with client(redis, namespace, data_dir) as c:
            state = await c.cluster()
        if as_json:
            print_json(to_data(state))
        else:
            out.print(view(state))

    async def watching(every: float) -> None:
        async with client(redis, namespace, data_dir) as c:
            await (_watch_json(c, every) if as_json else _watch_live(c, every))

    if watch is None:
        run(once())
        return
    try:
        run(watching(watch))
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: not an error


def optional_watch_value(argv: list[str]) -> list[str]:
    """``--watch`` may stand alone (the default interval): click options always take
    a value, so a bare one gets the default inserted before parsing."""
    fixed = list(argv)
    for i in range(len(fixed) - 1, -1, -1):
        bare = i + 1 == len(fixed) or fixed[i + 1].startswith("-")
        if fixed[i] == "--watch" and bare:
            fixed.insert(i + 1, f"{DEFAULT_WATCH_S:g}")
    return fixed


async def _watch_json(c: Client, every: float) -> None:
    while True:
        print_line(to_data(await c.cluster()))
        await asyncio.sleep(every)  # the refresh interval itself


async def _watch_live(c: Client, every: float) -> None:
    """Redraw in place on a terminal; elsewhere (a pipe, a file) one view after the
    other, since a live display there would show nothing until it ended."""
    if not out.is_terminal:
        while True:
            out.print(_frame(await c.cluster(), every))
            await asyncio.sleep(every)  # the refresh interval itself
    with Live(console=out, auto_refresh=False, vertical_overflow="visible") as live:
        while True:
            live.update(_frame(await c.cluster(), every), refresh=True)
            await asyncio.sleep(every)  # the refresh interval itself


def _frame(state: ClusterState, every: float) -> Group:
    header = Text(f"{ts(now_ms())}  every {every:g}s, Ctrl-C to stop", style="dim")
    return Group(header, view(state))


def view(state: ClusterState) -> Group:
    """The whole status as one renderable: nodes, queues, agent types, key groups."""
    parts: list[RenderableType] = [_nodes(state), *_queues(state), *_agent_types(state)]
    parts += _key_groups(state)
    return Group(*parts)


def _nodes(state: ClusterState) -> RenderableType:
    if not state.nodes:
        return "no nodes (start one with: shoal node --app your.module)"
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
    return table


def _queues(state: ClusterState) -> list[RenderableType]:
    table = Table("capability", "priority", "waiting", "running", "oldest", "consumers",
                  "dead letters", "duplicates", title="queues")  # fmt: skip
    for q in state.queues:
        oldest = f"{q.oldest_age_s:.1f}s" if q.oldest_age_s is not None else "-"
        table.add_row(q.capability, q.priority, str(q.waiting), str(q.pending), oldest,
                      str(q.consumers), str(q.dead_letters), str(q.duplicates))  # fmt: skip
    parts: list[RenderableType] = [table if state.queues else "no queues yet"]
    if state.delayed:
        parts.append(f"{state.delayed} task(s) scheduled for later (delays, retry back-off)")
    return parts


def _agent_types(state: ClusterState) -> list[RenderableType]:
    """Partition owners and backlog per agent type; nothing if no node hosted any."""
    if not state.agent_types:
        return []
    table = Table("agent type", "partitions", "owned by (partitions)", "unowned", "backlog",
                  title="agent types")  # fmt: skip
    for t in state.agent_types:
        owners = ", ".join(f"{node} ({count})" for node, count in t.owners.items()) or "-"
        unowned = f"[yellow]{t.unowned}[/]" if t.unowned else "0"
        table.add_row(t.name, str(t.partitions), owners, unowned, str(t.backlog))
    parts: list[RenderableType] = [table]
    if state.ownership:
        parts.append("recent ownership changes (newest first):")
        parts += [
            f"  {ts(c.at)}  {c.type} partition {c.partition}  {c.event} by {c.node} "
            f"(token {c.token})"
            for c in state.ownership
        ]
    return parts


def _key_groups(state: ClusterState) -> list[RenderableType]:
    """How the namespace's key groups spread over a Cluster's shards (nothing for one
    group)."""
    groups = state.key_groups
    if len(groups) <= 1:
        return []
    shards: dict[str, list[int]] = {}
    for g in groups:
        shards.setdefault(g.shard or "-", []).append(g.group)
    table = Table("shard", "key groups", "slots", title=f"{len(groups)} key groups")
    for shard, members in sorted(shards.items()):
        slots = ", ".join(str(groups[m].slot) for m in members)
        table.add_row(shard, ", ".join(map(str, members)), slots)
    return [table]
