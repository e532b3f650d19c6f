"""What ``shoal demo`` shows: a live progress bar, the kill, and the tables after.

Kept apart from shoal.demo so that the measuring can be read (and tested) without
the presentation, and the presentation changed without touching the checks.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shoal.demo import DemoConfig, DemoReport, Outcome, Takeover
from shoal.demo_llm import LLMReport


class LiveView:
    """The progress bar while the workload runs; its description counts per node."""

    def __init__(self, console: Console, config: DemoConfig) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]tasks[/bold]"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.description}"), TimeElapsedColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._task = self.progress.add_task("", total=config.total)
        self._by_node: Counter[str] = Counter()
        self._problems = 0

    def __enter__(self) -> LiveView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def outcome(self, outcome: Outcome) -> None:
        if outcome.node:
            self._by_node[outcome.node] += 1
        if outcome.status != "succeeded" or outcome.wrong:
            self._problems += 1
        spread = "  ".join(f"{n} {c}" for n, c in sorted(self._by_node.items()))
        problems = f"  [red]{self._problems} not right[/red]" if self._problems else ""
        self.progress.update(self._task, advance=1, description=spread + problems)

    def killed(self, takeover: Takeover) -> None:
        parts = sum(takeover.partitions.values())
        self.progress.console.print(
            f"[bold red]SIGKILL[/bold red] {takeover.victim} (pid {takeover.pid}) while it ran "
            f"{len(takeover.running_tasks)} task(s) and held {len(takeover.active_agents)} "
            f"active agent(s) in {parts} partition(s)"
        )


def print_report(console: Console, report: DemoReport, dashboard: str | None, keep: bool) -> None:
    _print_spread(console, report)
    if report.takeover is not None:
        _print_takeover(console, report.takeover)
    _print_summary(console, report, dashboard, keep)
    for outcome in [o for o in report.outcomes if o.status != "succeeded" or o.wrong][:10]:
        console.print(
            f"[red]{outcome.kind} task {outcome.task_id}: {outcome.status}"
            f"{': ' + outcome.wrong if outcome.wrong else ''}[/red]",
            markup=True, highlight=False,
        )  # fmt: skip


def _print_spread(console: Console, report: DemoReport) -> None:
    table = Table("node", "documents", "chat turns", "agent partitions", "active agents",
                  title="How the work spread (tasks by the node that answered)",
                  title_justify="left")  # fmt: skip
    victim = report.takeover.victim if report.takeover else None
    for node in sorted(set(report.by_node) | set(report.agents_by_node)):
        counts = report.by_node.get(node, Counter())
        name = f"{node} [red](killed)[/red]" if node == victim else node
        partitions, active = report.agents_by_node.get(node, (0, 0))
        if node == victim:
            partitions, active = 0, 0  # its last heartbeat's figures are history
        table.add_row(name, str(counts["document"]), str(counts["chat"]), str(partitions),
                      str(active))  # fmt: skip
    console.print(table)


def _print_takeover(console: Console, takeover: Takeover) -> None:
    table = Table(show_header=False, title=f"Takeover of {takeover.victim}", title_justify="left")
    table.add_row("declared dead after", _secs(takeover.declared_dead_s))
    moved = ", ".join(f"{n} {c}" for n, c in sorted(takeover.partitions_to.items())) or "-"
    partitions = sum(takeover.partitions.values())
    table.add_row(
        f"its {partitions} agent partition(s) re-owned after",
        f"{_secs(takeover.partitions_moved_s)}  (now: {moved})",
    )
    homes = [f"{a} → {n}" for a, n in sorted(takeover.agents_to.items())]
    table.add_row(f"its {len(takeover.active_agents)} active agent(s)",
                  _sample(homes or takeover.active_agents, 3))  # fmt: skip
    where = Counter(n for n in takeover.moved_to.values() if n != takeover.victim)
    finished = ", ".join(f"{n} {c}" for n, c in sorted(where.items())) or "-"
    before = takeover.finished_before_kill
    note = f"; {before} more ended in the instant before the kill" if before else ""
    table.add_row(
        f"its {sum(where.values())} running task(s) finished elsewhere after",
        f"{_secs(takeover.tasks_done_s) if where else '-'}  (on: {finished}{note})",
    )
    examples = [f"{takeover.running_tasks[i]} {i} → {n}"
                for i, n in takeover.moved_to.items() if n != takeover.victim]  # fmt: skip
    if examples:
        table.add_row("e.g.", _sample(examples, 3))
    console.print(table)


def _print_summary(console: Console, report: DemoReport, dashboard: str | None, keep: bool) -> None:
    lost, failed, wrong = report.count("lost"), report.count("failed"), len(report.wrong)
    takeover = report.takeover.seconds if report.takeover else None
    table = Table(show_header=False, title="Summary", title_justify="left")
    rows = [
        ("tasks submitted", str(len(report.outcomes))),
        ("succeeded", str(report.count("succeeded"))),
        ("lost", _flag(lost)),
        ("failed", _flag(failed)),
        ("wrong answers", _flag(wrong)),
        ("re-run after the kill", str(report.retried)),
        ("duplicate outcomes refused", str(report.duplicates)),
        ("latency p50 / p99", f"{report.latency(0.5) * 1000:.0f} ms / "
                              f"{report.latency(0.99) * 1000:.0f} ms"),
        ("takeover", _secs(takeover)),
        ("workload time", f"{report.seconds:.1f}s"),
    ]  # fmt: skip
    if dashboard:
        rows.append(("dashboard", dashboard + ("" if keep else "  (stopping: --keep keeps it)")))
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    verdict = (
        "[bold green]nothing lost[/bold green]"
        if report.passed
        else ("[bold red]FAILED: not every task succeeded with the right answer[/bold red]")
    )
    console.print(verdict)


def report_data(report: DemoReport, dashboard: str | None) -> dict[str, Any]:
    """The report for scripts and CI: ``shoal demo --json``."""
    takeover: dict[str, Any] | None = None
    if report.takeover is not None:
        t = report.takeover
        takeover = {
            "victim": t.victim, "seconds": t.seconds, "declared_dead_s": t.declared_dead_s,
            "partitions_moved_s": t.partitions_moved_s, "tasks_done_s": t.tasks_done_s,
            "running_tasks": len(t.running_tasks), "active_agents": len(t.active_agents),
            "agents_to": t.agents_to,
            "partitions": sum(t.partitions.values()),
            "moved_to": dict(Counter(n for n in t.moved_to.values() if n != t.victim)),
            "finished_before_kill": t.finished_before_kill,
        }  # fmt: skip
    return {
        "passed": report.passed, "submitted": len(report.outcomes),
        "succeeded": report.count("succeeded"), "lost": report.count("lost"),
        "failed": report.count("failed"), "wrong": len(report.wrong),
        "retried": report.retried, "duplicates": report.duplicates,
        "latency_p50_ms": round(report.latency(0.5) * 1000, 2),
        "latency_p99_ms": round(report.latency(0.99) * 1000, 2),
        "takeover": takeover, "by_node": {n: dict(c) for n, c in report.by_node.items()},
        "seconds": round(report.seconds, 2), "dashboard": dashboard,
    }  # fmt: skip


def _flag(count: int) -> str:
    return f"[bold red]{count}[/bold red]" if count else "[green]0[/green]"


def _secs(value: float | None) -> str:
    return f"{value:.1f}s" if value is not None else "[red]not seen in time[/red]"


def _sample(items: list[str], shown: int = 4) -> str:
    if not items:
        return "none"
    more = f"\n… and {len(items) - shown} more" if len(items) > shown else ""
    return "\n".join(items[:shown]) + more


def print_llm_start(console: Console) -> None:
    """Before the streamed answer of the LLM part."""
    from shoal.demo_llm import QUESTION

    console.print(f"[bold]LLM research assistant[/bold]: asking the planner: {QUESTION}")


def print_llm(console: Console, llm: LLMReport) -> None:
    """The LLM part's outcome, after the streamed answer (or why there is none)."""
    if not llm.configured:
        return
    console.print()
    if not llm.ok:
        console.print(f"[bold red]LLM part failed[/bold red]: {llm.error}", highlight=False)
        console.print("(the non-LLM verdict above stands)")
        return
    ttft = f"{llm.first_token_s:.2f}s" if llm.first_token_s is not None else "-"
    tools = ", ".join(llm.tool_calls) or "none"
    console.print(
        f"[bold green]LLM answer arrived[/bold green]: {len(llm.answer)} characters in "
        f"{llm.token_events} token events, first after {ttft}, {llm.completion_tokens} "
        f"completion tokens in all, {llm.seconds:.1f}s; the planner's tool calls: {tools}",
        highlight=False,
    )
