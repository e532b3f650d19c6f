"""Turn the JSON of bench.throughput and bench.latency into the Markdown tables of
docs/benchmarks.md:

    python -m bench.throughput > tp.json && python -m bench.latency > lat.json
    python -m bench.report tp.json lat.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _name(run: dict[str, Any]) -> str:
    if run.get("system") == "shoal":
        return "**Shoal**"
    versions = run.get("versions", {})
    version = versions.get(run["peer"]) or next(iter(versions.values()), "")
    return f"{run['peer']} {version}".strip()


def throughput_table(data: dict[str, Any]) -> str:
    rows = [
        "| system | worker processes | tasks | tasks/s | vs. fastest peer |",
        "|---|---|---|---|---|",
    ]
    for workers in sorted({r.get("nodes") or r.get("workers") for r in data["runs"]}):
        runs = [r for r in data["runs"] if (r.get("nodes") or r.get("workers")) == workers]
        peers = [r["tasks_per_s"] for r in runs if r.get("peer") and "tasks_per_s" in r]
        best = max(peers) if peers else None
        for run in runs:
            rate = run.get("tasks_per_s")
            ratio = f"{rate / best:.1f}x" if rate and best else "-"
            shown = f"{rate:,.0f}" if rate else f"error: {run.get('error', '?')[:60]}"
            rows.append(f"| {_name(run)} | {workers} | {run.get('n', '-'):,} | {shown} | {ratio} |")
    return "\n".join(rows)


def latency_table(data: dict[str, Any]) -> str:
    rows = ["| system | p50 ms | p90 ms | p99 ms | mean ms |", "|---|---|---|---|---|"]
    for run in data["runs"]:
        if "p50_ms" not in run:
            rows.append(f"| {_name(run)} | error: {run.get('error', '?')[:60]} | | | |")
            continue
        cells = " | ".join(f"{run[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms"))
        rows.append(f"| {_name(run)} | {cells} |")
    return "\n".join(rows)


def failover_table(data: dict[str, Any]) -> str:
    rows = [
        "| system | scenario | recovered | seconds from kill to last task | lost | duplicates |",
        "|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        if "error" in run:
            rows.append(f"| {_name(run)} | | error: {run['error'][:60]} | | | |")
            continue
        seconds = run.get("seconds_to_recover")
        shown = f"{seconds:.2f}" if seconds is not None else f"not within {run.get('waited_s')} s"
        rows.append(
            f"| {_name(run)} | {run.get('scenario', 'replacement worker')} | "
            f"{'yes' if run.get('recovered') else 'no'} | {shown} | {run.get('lost', '-')} | "
            f"{run.get('duplicates', '-')} |"
        )
    return "\n".join(rows)


TABLES = {"throughput": throughput_table, "latency": latency_table, "failover": failover_table}


def main() -> None:
    for path in sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        table = TABLES[data["benchmark"]](data)
        print(f"### {data['benchmark']} ({data['machine']['when']})\n\n{table}\n")


if __name__ == "__main__":
    main()
