"""Client-side balancing under a fleet that goes bad (issue 8): which strategy, and
whether breakers and retries, keep callers' latency and errors down when one
replica degrades and another dies — and what a pick costs.

    python -m bench.balancing [--duration 10] [--callers 32] [--save [NAME]]   # ~3.5 min
    python -m bench.balancing --quick                      # a smoke run, under a minute
    python -m bench.balancing --table bench/results/balancing-<date>.json   # docs' tables

**Scenario** (one per configuration, each with fresh replicas and a fresh
namespace, so no breaker state leaks from one to the next): three replica
processes (``shoal.testing.replica``) answer after 50, 100 and 200 ms (+ up to 10 %
jitter); ``--callers`` closed-loop callers share one ``ServicePool`` and call
``pool.request`` for ``--duration`` seconds. At 1/3 of the run replica ``b``
degrades (latency x10, 30 % of its answers HTTP 500); at 2/3 replica ``c`` is
killed (SIGKILL: its port refuses connections). The callers see latency including
retries; every attempt is counted per replica through httpx's event hooks.

Configurations: every strategy with breakers on (``BreakerPolicy()``) and off
(``breaker=None``), each with the default ``RetryPolicy()`` and timeout; plus
least-outstanding with neither retries nor breakers, the naive baseline.

**Pick overhead**: ``async with pool.pick(): pass`` over a warm view of three
instances (no network call inside), per strategy; its parts timed alone; and one
pick loop under pyinstrument, summarised by function.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import (
    code_version,
    emit,
    machine,
    percentile,
    private_engine,
    save,
    self_time_shares,
)
from shoal import Client, Settings
from shoal.balancing import STRATEGIES, Load, Strategy, make_strategy
from shoal.observability import metrics
from shoal.registry import ServiceView
from shoal.resilience import NO_RETRY, BreakerPolicy, Bulkhead, RetryPolicy
from shoal.services import ServicePool
from shoal.testing.replica import ReplicaProcess, replicas

SERVICE = "llm"
LATENCY_S = {"a": 0.050, "b": 0.100, "c": 0.200}  # each replica's answer time
JITTER = 0.1  # plus up to this share of the latency, at random
DEGRADED = {"slower": 10, "fail_rate": 0.3}  # what happens to b at 1/3 of the run
PHASES = ("healthy", "b degraded", "c dead")
CONVERSATIONS = 10_000  # consistent_hash: each call's key is one of these, at random
PICK_TARGET_US = 50.0
PICK_WARMUP = 1000
QUICK = {"duration": 4.0, "picks": 5000, "strategies": ["round_robin", "least_outstanding",
                                                        "power_of_two"]}  # fmt: skip


@dataclass(frozen=True)
class Config:
    """One row of the scenario table: a strategy, breakers on/off, retries on/off."""

    strategy: str
    breakers: bool
    retries: bool = True
    window: float = BreakerPolicy().window  # the breaker's (and passive health's) window

    @property
    def label(self) -> str:
        parts = [self.strategy, "breakers" if self.breakers else "no breakers"]
        if self.breakers and self.window != BreakerPolicy().window:
            parts.append(f"window {self.window:g}s")
        return ", ".join(parts if self.retries else [*parts, "no retries"])

    def pool_options(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "breaker": BreakerPolicy(window=self.window) if self.breakers else None,
            "retry": RetryPolicy() if self.retries else NO_RETRY,
        }


def configs(
    strategies: list[str], breakers: str, baseline: bool, windows: list[float] | None = None
) -> list[Config]:
    """Each strategy with breakers on (once per breaker window) and/or off, then the
    naive baseline."""
    settings = {"on": [True], "off": [False], "both": [True, False]}[breakers]
    windows = windows or [BreakerPolicy().window]
    rows = [
        Config(s, b, window=w)
        for s in strategies
        for b in settings
        for w in (windows if b else windows[:1])
    ]
    if baseline:
        rows.append(Config("least_outstanding", breakers=False, retries=False))
    return rows


# --- the scenario: recording ---------------------------------------------------------


@dataclass
class Recorder:
    """What happened, appended to plain lists (cheap next to an HTTP call): each
    call's start, latency and error, each attempt's replica, each answer's status,
    and each change of an instance's status or breaker in the pool's view."""

    started: float = field(default_factory=time.perf_counter)
    ports: dict[int, str] = field(default_factory=dict)
    calls: list[tuple[float, float, str | None]] = field(default_factory=list)
    sent: list[tuple[float, str]] = field(default_factory=list)
    answers: list[tuple[float, str, int]] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    _seen: dict[str, tuple[str, str]] = field(default_factory=dict)

    def now(self) -> float:
        return time.perf_counter() - self.started

    async def on_request(self, request: httpx.Request) -> None:
        self.sent.append((self.now(), self.ports.get(request.url.port or 0, "?")))

    async def on_response(self, response: httpx.Response) -> None:
        name = self.ports.get(response.request.url.port or 0, "?")
        self.answers.append((self.now(), name, response.status_code))

    def on_view(self, view: ServiceView) -> None:
        for state in view.instances:
            seen = (str(state.status), state.breaker)
            if self._seen.get(state.id) != seen:
                if state.id in self._seen:
                    self.transitions.append({"t_s": round(self.now(), 3), "instance": state.id,
                                             "status": seen[0], "breaker": seen[1]})  # fmt: skip
                self._seen[state.id] = seen


async def _caller(pool: ServicePool, rec: Recorder, until: float, keyed: bool, seed: int) -> None:
    """One closed-loop caller: the next call starts when the last one ended."""
    rng = random.Random(seed)
    while (start := rec.now()) < until:
        key = f"conversation-{rng.randrange(CONVERSATIONS)}" if keyed else None
        error = None
        try:
            response = await pool.request("POST", "/v1/generate", key=key, json={"n": 1})
            if response.status_code >= 400:
                error = f"HTTP {response.status_code}"
        except Exception as exc:  # every failure a caller would see is counted, by type
            error = type(exc).__name__
        rec.calls.append((start, rec.now() - start, error))


# --- the scenario: running -------------------------------------------------------------


async def close_pool(pool: ServicePool) -> None:
    await pool.close()


async def _drive(
    url: str, config: Config, group: list[ReplicaProcess], duration: float, callers: int
) -> dict[str, Any]:
    """Register the replicas, run the callers, degrade b at 1/3 and kill c at 2/3."""
    _, b, c = group
    rec = Recorder(ports={r.port: r.name for r in group})
    hooks: dict[str, list[Callable[..., Any]]] = {
        "request": [rec.on_request],
        "response": [rec.on_response],
    }
    settings = Settings(url=url, namespace=f"bench-bal-{time.monotonic_ns()}")
    async with (
        Client(settings=settings) as client,
        httpx.AsyncClient(timeout=30, trust_env=False, event_hooks=hooks) as http,
    ):
        for replica in group:
            await client.registry.register(SERVICE, replica.url, id=replica.name, ttl=None)
        pool = client.services(SERVICE, http=http, **config.pool_options())
        for _ in range(6):  # connections open, the view warm; not measured
            await pool.request("GET", "/warmup")
        for recorded in (rec.calls, rec.sent, rec.answers):
            recorded.clear()
        pool.view.on_change(rec.on_view)
        rec.on_view(pool.view)
        cpu = _cpu_snapshot()
        rec.started = time.perf_counter()
        keyed = config.strategy == "consistent_hash"
        tasks = [
            asyncio.create_task(_caller(pool, rec, duration, keyed, seed=i)) for i in range(callers)
        ]
        async with asyncio.timeout(duration + 120):  # bounded even if something hangs
            bounds = await _events(rec, b, c, duration)
            await asyncio.gather(*tasks)
        cpu_used = _cpu_used(cpu)
        final = {s.id: {"status": str(s.status), "breaker": s.breaker} for s in pool.view.instances}
        await close_pool(pool)
    return _summary(config, rec, bounds, duration, callers) | cpu_used | {"final_view": final}


async def _events(
    rec: Recorder, b: ReplicaProcess, c: ReplicaProcess, duration: float
) -> list[float]:
    """The phase changes on schedule; their actual times (phase bounds) are returned."""
    await asyncio.sleep(duration / 3)  # the healthy phase
    degraded = rec.now()
    slower = DEGRADED["slower"]
    await b.acontrol(latency=LATENCY_S["b"] * slower, jitter=LATENCY_S["b"] * JITTER * slower,
                     fail_rate=DEGRADED["fail_rate"])  # fmt: skip
    await asyncio.sleep(max(0.0, 2 * duration / 3 - rec.now()))  # b degraded
    killed = rec.now()
    await asyncio.to_thread(c.kill)
    await asyncio.sleep(max(0.0, duration - rec.now()))  # c dead
    return [0.0, degraded, killed, duration]


def _cpu_snapshot() -> tuple[float, float, Any]:
    return time.perf_counter(), time.process_time(), psutil.cpu_times()


def _cpu_used(before: tuple[float, float, Any]) -> dict[str, float]:
    """This process's CPU (the callers and the pool) and the machine's, as % of one
    core over the run: a client near 100 % measures itself, not the strategy."""
    wall = time.perf_counter() - before[0]
    after = psutil.cpu_times()
    busy = sum(after) - after.idle - (sum(before[2]) - before[2].idle)
    return {"client_cpu_pct": round((time.process_time() - before[1]) / wall * 100),
            "machine_cpu_pct": round(busy / wall * 100)}  # fmt: skip


def run_config(url: str, config: Config, duration: float, callers: int) -> dict[str, Any]:
    """One configuration against three fresh replicas."""
    with replicas(3, names=list(LATENCY_S)) as group:
        for replica in group:
            latency = LATENCY_S[replica.name]
            replica.control(latency=latency, jitter=latency * JITTER)
        return asyncio.run(_drive(url, config, group, duration, callers))


# --- the scenario: summing up -----------------------------------------------------------


def _latencies(calls: list[tuple[float, float, str | None]]) -> dict[str, Any]:
    """Calls, errors and the latency of the successful ones (ms). The mean is kept
    besides the median: once a replica answers in 1 s and takes a share of the
    calls, latency is bimodal and the median jumps between the two modes."""
    ok = sorted(latency * 1000 for _, latency, error in calls if error is None)
    errors = len(calls) - len(ok)
    return {
        "calls": len(calls),
        "errors": errors,
        "error_rate": round(errors / len(calls), 4) if calls else None,
        "p50_ms": round(percentile(ok, 0.50), 2),
        "mean_ms": round(statistics.fmean(ok), 2) if ok else None,
        "p99_ms": round(percentile(ok, 0.99), 2),
        "max_ms": round(ok[-1], 2) if ok else None,
    }


def _shares(counts: collections.Counter[str]) -> dict[str, float]:
    total = sum(counts.values())
    return {name: round(counts[name] / total, 3) if total else 0.0 for name in LATENCY_S}


def _phase(rec: Recorder, name: str, start: float, end: float) -> dict[str, Any]:
    """One phase: calls that started in it, and attempts sent in it, per replica."""
    calls = [c for c in rec.calls if start <= c[0] < end]
    sent = collections.Counter(n for t, n in rec.sent if start <= t < end)
    ok = collections.Counter(n for t, n, s in rec.answers if start <= t < end and s < 500)
    return {
        "phase": name,
        "from_s": round(start, 3),
        "to_s": round(end, 3),
        **_latencies(calls),
        "attempts_per_call": round(sum(sent.values()) / len(calls), 3) if calls else None,
        "sent": {n: sent[n] for n in LATENCY_S},
        "sent_share": _shares(sent),
        "answered_ok": {n: ok[n] for n in LATENCY_S},
    }


def _summary(
    config: Config, rec: Recorder, bounds: list[float], duration: float, callers: int
) -> dict[str, Any]:
    overall = _latencies(rec.calls)
    errors = collections.Counter(e for _, _, e in rec.calls if e is not None)
    phases = [_phase(rec, name, bounds[i], bounds[i + 1]) for i, name in enumerate(PHASES)]
    phases[-1]["to_s"] = round(duration, 3)
    return {
        "label": config.label,
        "strategy": config.strategy,
        "breakers": config.breakers,
        "retries": config.retries,
        "duration_s": duration,
        "callers": callers,
        **overall,
        "calls_per_s": round(overall["calls"] / duration, 1),
        "ok_per_s": round((overall["calls"] - overall["errors"]) / duration, 1),
        "attempts_per_call": round(len(rec.sent) / max(1, overall["calls"]), 3),
        "errors_by_type": dict(errors.most_common()),
        "phases": phases,
        "transitions": rec.transitions,
    }


# --- pick overhead -------------------------------------------------------------------------


@asynccontextmanager
async def _pick_pools(client: Client) -> AsyncIterator[Callable[..., ServicePool]]:
    """A maker of pools on the registered service; each is closed at the end."""
    made: list[ServicePool] = []

    def make(strategy: str, breakers: bool = True) -> ServicePool:
        breaker = BreakerPolicy() if breakers else None
        made.append(ServicePool(client, SERVICE, strategy=strategy, breaker=breaker))
        return made[-1]

    try:
        yield make
    finally:
        for pool in made:
            await close_pool(pool)


async def _time_picks(pool: ServicePool, n: int, keys: list[str] | None) -> dict[str, float]:
    """``n`` timed picks, each entered and left with nothing inside (no await in the
    block: the loop never yields, so no background flush lands inside a sample)."""
    await pool.start()
    for i in range(PICK_WARMUP):
        async with pool.pick(keys[i % len(keys)] if keys else None):
            pass
    samples = []
    clock = time.perf_counter_ns
    for i in range(n):
        key = keys[i % len(keys)] if keys else None
        started = clock()
        async with pool.pick(key):
            pass
        samples.append(clock() - started)
    samples.sort()
    us = [s / 1000 for s in samples]
    return {"mean_us": round(statistics.fmean(us), 2), "p50_us": round(percentile(us, 0.5), 2),
            "p99_us": round(percentile(us, 0.99), 2)}  # fmt: skip


def _mean_us(fn: Callable[[int], object], n: int) -> float:
    """The mean time of ``fn(i)`` over ``n`` calls, timed as one batch."""
    started = time.perf_counter_ns()
    for i in range(n):
        fn(i)
    return round((time.perf_counter_ns() - started) / n / 1000, 3)


def _parts(pool: ServicePool, n: int, keys: list[str]) -> dict[str, Any]:
    """What a pick is made of, each part alone (means over ``n``; batch timing)."""
    tier = pool.candidates()
    load = Load()
    per_strategy = {}
    for name in STRATEGIES:
        strategy = make_strategy(name, load)

        def pick(i: int, strategy: Strategy = strategy) -> object:
            return strategy.pick(tier, keys[i % len(keys)])

        per_strategy[name] = _mean_us(pick, n)

    def load_cycle(i: int) -> None:
        load.acquire("a")
        load.release("a")

    def observed(i: int) -> None:
        metrics.SERVICE_CALL_SECONDS.labels(SERVICE).observe(0.001)
        metrics.SERVICE_CALLS.labels(SERVICE, "a", "ok").inc()

    return {
        "strategy_pick_us": per_strategy,
        "load_acquire_release_us": _mean_us(load_cycle, n),
        "tier_us": _mean_us(lambda i: pool._tier(()), n),
        "metrics_two_series_us": _mean_us(observed, n),
    }


async def _bulkhead_us(n: int) -> float:
    bulkhead = Bulkhead(SERVICE)
    started = time.perf_counter_ns()
    for _ in range(n):
        async with bulkhead.slot():
            pass
    return round((time.perf_counter_ns() - started) / n / 1000, 3)


async def _profile(pool: ServicePool, n: int, out: Path | None) -> dict[str, Any]:
    """One pick loop under pyinstrument: shares of self time by function."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    for _ in range(n):
        async with pool.pick():
            pass
    session = profiler.stop()
    if out is not None:
        await asyncio.to_thread(out.write_text, profiler.output_text(unicode=True))
    top = self_time_shares(session)
    return {"picks": n, "strategy": pool.strategy_name, "self_time_share_by_function": top,
            "file": str(out) if out else None}  # fmt: skip


async def pick_overhead(url: str, n: int, profile_out: Path | None) -> dict[str, Any]:
    """Pick cost per strategy (breakers on, and the default strategy with them off)
    over three registered instances that are never called."""
    settings = Settings(url=url, namespace=f"bench-pick-{time.monotonic_ns()}")
    keys = [f"conversation-{i}" for i in range(CONVERSATIONS)]
    rows: list[dict[str, Any]] = []
    async with Client(settings=settings) as client:
        for name in LATENCY_S:
            await client.registry.register(SERVICE, f"http://127.0.0.1:9/{name}", id=name, ttl=None)
        async with _pick_pools(client) as make:
            for strategy, breakers in [*((s, True) for s in STRATEGIES),
                                       ("least_outstanding", False)]:  # fmt: skip
                pool = make(strategy, breakers)
                timed = await _time_picks(pool, n, keys if strategy == "consistent_hash" else None)
                rows.append({"strategy": strategy, "breakers": breakers, **timed})
            default = make("least_outstanding")
            await default.start()
            parts = _parts(default, n, keys)
            parts["bulkhead_slot_us"] = await _bulkhead_us(n)
            profile = await _profile(default, n, profile_out)
    worst = max(float(r["p99_us"]) for r in rows)
    return {"picks": n, "target_us": PICK_TARGET_US, "worst_p99_us": worst,
            "meets_target": worst <= PICK_TARGET_US, "pool_pick": rows, "parts": parts,
            "profile": profile}  # fmt: skip


# --- output ----------------------------------------------------------------------------------


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"  # runs saved before mean_ms have none


def _head(run: dict[str, Any]) -> str:
    breakers = "on" if run["breakers"] else "off"
    retries = "" if run["retries"] else ", no retries"
    return f"| {run['strategy']} | {breakers}{retries} "


def scenario_tables(runs: list[dict[str, Any]]) -> str:
    """Overall figures; per phase p50/p99/errors; per phase where attempts went."""
    overall = [
        "| strategy | breakers | calls/s | p50 ms | p99 ms | max ms | errors | attempts/call "
        "| client CPU % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    phases = [
        "| strategy | breakers | "
        + " | ".join(f"{p}: p50 / mean / p99 ms, errors" for p in PHASES)
        + " |",
        "|---|---|---|---|---|",
    ]
    shares = [
        "| strategy | breakers | " + " | ".join(f"{p}: a / b / c" for p in PHASES) + " |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        head = _head(run)
        overall.append(
            head + f"| {run['calls_per_s']:,.0f} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} "
            f"| {run['max_ms']:.0f} | {_pct(run['error_rate'])} | {run['attempts_per_call']:.2f} "
            f"| {run['client_cpu_pct']} |"
        )
        phases.append(head + "| " + " | ".join(
            f"{p['p50_ms']:.0f} / {_ms(p.get('mean_ms'))} / {p['p99_ms']:.0f}, "
            f"{_pct(p['error_rate'])}" for p in run["phases"]) + " |")  # fmt: skip
        shares.append(head + "| " + " | ".join(
            " / ".join(f"{p['sent_share'][n]:.0%}" for n in LATENCY_S)
            for p in run["phases"]) + " |")  # fmt: skip
    return "\n\n".join("\n".join(t) for t in (overall, phases, shares))


def pick_table(picks: dict[str, Any]) -> str:
    alone = picks["parts"]["strategy_pick_us"]
    rows = [
        "| strategy | breakers | pick mean µs | p50 µs | p99 µs | strategy alone µs |",
        "|---|---|---|---|---|---|",
    ]
    for r in picks["pool_pick"]:
        rows.append(
            f"| {r['strategy']} | {'on' if r['breakers'] else 'off'} | {r['mean_us']:.1f} "
            f"| {r['p50_us']:.1f} | {r['p99_us']:.1f} | {alone[r['strategy']]:.2f} |"
        )
    parts = picks["parts"]
    rows += [
        "",
        "| part of a pick (alone, mean) | µs |",
        "|---|---|",
        f"| candidate tier (`_tier`) | {parts['tier_us']:.2f} |",
        f"| `Load.acquire` + `release` | {parts['load_acquire_release_us']:.2f} |",
        f"| bulkhead slot enter + exit | {parts['bulkhead_slot_us']:.2f} |",
        f"| two metric series (histogram + counter, `labels()` each) "
        f"| {parts['metrics_two_series_us']:.2f} |",
    ]
    return "\n".join(rows)


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md (``--table FILE``; also on stderr after a run)."""
    text = scenario_tables(result["runs"]) + "\n\n" + pick_table(result["pick_overhead"])
    profile = result["pick_overhead"]["profile"]["self_time_share_by_function"]
    text += "\n\n| pick loop, self time by function (pyinstrument) | share |\n|---|---|\n"
    text += "\n".join(
        f"| `{name.split('  ')[0]}` | {share:.0%} |" for name, share in profile.items()
    )
    return text + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, help="seconds per configuration (default 10)")
    parser.add_argument("--callers", type=int, default=32, help="closed-loop callers")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 4 s per configuration, three strategies, "
                        "5000 picks")  # fmt: skip
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), metavar="NAME",
                        help="the strategies to run (default: all)")  # fmt: skip
    parser.add_argument("--breakers", choices=("on", "off", "both"), default="both")
    parser.add_argument(
        "--windows",
        nargs="+",
        type=float,
        metavar="S",
        help="breaker windows to compare (default: BreakerPolicy's)",
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="leave out the naive row (no retries, no breakers)")  # fmt: skip
    parser.add_argument("--picks", type=int, help="timed picks per strategy (default 20000)")
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="also write the pick loop's pyinstrument profile to FILE")  # fmt: skip
    parser.add_argument("--save", nargs="?", const=f"balancing-{time.strftime('%Y-%m-%d')}",
                        metavar="NAME", help="also write bench/results/NAME.json "
                        "(default NAME: balancing-<date>)")  # fmt: skip
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="print the Markdown tables of a saved run and exit")  # fmt: skip
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    args.duration = args.duration or quick.get("duration", 10.0)
    args.picks = args.picks or quick.get("picks", 20_000)
    args.strategies = args.strategies or quick.get("strategies", list(STRATEGIES))
    if args.duration < 0.5 or args.callers < 1 or args.picks < 100:
        parser.error("--duration must be >= 0.5, --callers >= 1, --picks >= 100")
    return args


def _setup(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "duration_s": args.duration,
        "callers": args.callers,
        "replicas": {
            n: {"latency_ms": s * 1000, "jitter_ms": s * JITTER * 1000}
            for n, s in LATENCY_S.items()
        },
        "events": {
            "b degraded at": "1/3",
            "b latency x": DEGRADED["slower"],
            "b fail_rate": DEGRADED["fail_rate"],
            "c killed at": "2/3",
        },
        "breaker_policy": asdict(BreakerPolicy()),
        "retry_policy": {k: v for k, v in asdict(RetryPolicy()).items() if k != "retry_on"},
        "consistent_hash_keys": CONVERSATIONS,
    }


def main() -> None:
    args = parse_args()
    if args.table:
        sys.stdout.write(markdown(json.loads(args.table.read_text())))
        return
    rows = configs(args.strategies, args.breakers, args.baseline, args.windows)
    runs = []
    load_avg = os.getloadavg()[0]  # anything else on the machine shows here
    with private_engine() as url:
        print(f"pick overhead: {args.picks} picks per strategy", file=sys.stderr, flush=True)
        picks = asyncio.run(pick_overhead(url, args.picks, args.profile_out))
        for i, config in enumerate(rows, 1):
            print(f"[{i}/{len(rows)}] {config.label}", file=sys.stderr, flush=True)
            runs.append(run_config(url, config, args.duration, args.callers))
    result: dict[str, Any] = {
        "benchmark": "balancing",
        "machine": machine(),
        "code": code_version(),
        "load_avg_1m_before": load_avg,
        "setup": _setup(args),
        "runs": runs,
        "pick_overhead": picks,
    }
    sys.stderr.write("\n" + markdown(result))
    if args.save:
        save(args.save, result)
    emit(result)


if __name__ == "__main__":
    main()
