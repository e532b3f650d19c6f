"""Turn the JSON of bench.throughput and bench.latency into the Markdown tables of
docs/benchmarks.md:

    python -m bench.throughput > tp.json && python -m bench.latency > lat.json
    python -m bench.report tp.json lat.json
    python -m bench.report --scale-out bench/results/scale-out-*.json   # one table each
"""

from __future__ import annotations

import json
import statistics
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


DASH = "\u2013"  # an en dash, for ranges and empty cells


def _setting(data: dict[str, Any]) -> str:
    engine = data["engine"]
    if engine["kind"] == "standalone":
        return "standalone, AOF off" if engine.get("appendonly") == "no" else "standalone (AOF)"
    if engine["kind"] == "sentinel":
        return f"Sentinel, {engine['replicas']} replicas"
    shown = f"Cluster, {engine['primaries']} primaries"
    if replicas := engine.get("replicas_per_primary"):
        shown += f" + {engine['primaries'] * replicas} replicas"
    return shown


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def _tasks_per_shard(runs: list[dict[str, Any]]) -> str:
    if len(runs[0]["engine"]["shards"]) == 1:
        return "all"
    shares = [[s["tasks"] / r["n"] for s in r["engine"]["shards"]] for r in runs]
    mean = [statistics.fmean(col) for col in zip(*shares, strict=True)]
    return " / ".join(f"{share:.0%}" for share in mean)


def scale_out_throughput_rows(data: dict[str, Any]) -> list[str]:
    rows = []
    shoal = [r for r in data["runs"] if r.get("system") == "shoal"]
    has_replicas = data["engine"]["kind"] == "sentinel" or data["engine"].get(
        "replicas_per_primary"
    )
    for nodes, ack in sorted({(r["nodes"], r["ack_replicas"]) for r in shoal}):
        runs = [r for r in shoal if (r["nodes"], r["ack_replicas"]) == (nodes, ack)]
        rates = [r["tasks_per_s"] for r in runs]
        spread = f" ({min(rates):,}{DASH}{max(rates):,})" if len(rates) > 1 else ""
        replicas = _median(runs, "engine", "replicas_cpu_us_per_task")
        cells = [
            _setting(data), str(ack), str(nodes),
            f"{statistics.median(rates):,.0f}{spread}",
            f"{_median(runs, 'engine', 'commands_per_task'):.1f}",
            f"{_median(runs, 'engine', 'engine_cpu_us_per_task'):.0f}",
            f"{replicas:.0f}" if has_replicas else DASH,
            f"{_median(runs, 'nodes_cpu_us_per_task'):.0f}",
            f"{_median(runs, 'client_cpu_us_per_task'):.0f}",
            _tasks_per_shard(runs),
        ]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def scale_out_latency_rows(data: dict[str, Any]) -> list[str]:
    shoal = [r for r in data["runs"] if r.get("system") == "shoal"]
    rows = []
    for ack in sorted({r["ack_replicas"] for r in shoal}):
        runs = [r for r in shoal if r["ack_replicas"] == ack]
        cells = [_setting(data), str(ack)]
        cells += [f"{_median(runs, k):.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms")]
        cells.append(f"{_median(runs, 'engine', 'commands_per_task'):.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def scale_out_tables(paths: list[str]) -> str:
    """One throughput and one latency table over several runs of --engine/--ack-replicas:
    medians over the --repeat runs (the range of tasks/s in brackets); CPU in µs per
    task; each primary's share of the tasks (mean over the runs)."""
    throughput = [
        "| engine | ack_replicas | node processes | tasks/s | engine commands/task | "
        "engine CPU µs/task (primaries) | replicas' CPU µs/task | node CPU µs/task | "
        "client CPU µs/task | tasks per primary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    latency = [
        "| engine | ack_replicas | p50 ms | p90 ms | p99 ms | mean ms | engine commands per call |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        data = json.loads(Path(path).read_text())
        if data["benchmark"] == "throughput":
            throughput += scale_out_throughput_rows(data)
        elif data["benchmark"] == "latency":
            latency += scale_out_latency_rows(data)
    return "\n".join(throughput) + "\n\n" + "\n".join(latency)


def main() -> None:
    if sys.argv[1:2] == ["--scale-out"]:
        print(scale_out_tables(sys.argv[2:]))
        return
    for path in sys.argv[1:]:
        data = json.loads(Path(path).read_text())
        table = TABLES[data["benchmark"]](data)
        print(f"### {data['benchmark']} ({data['machine']['when']})\n\n{table}\n")


if __name__ == "__main__":
    main()
