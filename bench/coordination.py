"""The coordination toolkit's costs (issue 9): what a lock, a rate-limit decision and
the two-level cache cost a caller, on a private standalone engine.

    python -m bench.coordination [--n 5000] [--save [NAME]]     # ~1 min
    python -m bench.coordination --quick                       # a smoke run, seconds
    python -m bench.coordination --table bench/results/coordination-<date>.json

**Lock** (``client.lock``): one caller acquiring and releasing an uncontended lock
``--n`` times — the round trip a critical section adds (two scripts: acquire,
release). Then contention: ``--contenders`` tasks on two clients take the same lock
in turn for ``--duration`` seconds: acquisitions per second, and each waiter's wait.

**Rate limiter** (``client.rate_limiter``): decisions per second of ``take`` for the
token bucket and the sliding window, with 1 and ``--concurrency`` concurrent
callers on one client, under a limit high enough never to refuse (every decision
writes) and, for the bucket, one that refuses nearly all (refusals write nothing).

**Cache** (``client.cache``): a local hit (in-process LRU), a remote hit (the local
level empty: one engine read), and invalidation-to-visible: a writer process sets a
key another process holds locally; the time until the reader's local level answers
the new value. Targets: ≤ 5 µs, ≤ 0.5 ms, ≤ 50 ms, each held to at p99 here.
Invalidation is timed from before the writer's ``set`` is sent (the write's own
round trip included) to the reader's local level no longer answering the old
value; the reader then reads the new value from the engine (and checks it).

Each loop is also run once under pyinstrument and summarised by function, so the
report says where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

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


def _settings(url: str, label: str) -> Settings:
    return Settings(url=url, namespace=f"bench-{label}-{time.monotonic_ns()}")


def _latency(samples_ns: list[int]) -> dict[str, float]:
    """p50/p99/mean/max of ``samples_ns`` in microseconds."""
    us = sorted(s / 1000 for s in samples_ns)
    return {
        "n": len(us),
        "mean_us": round(sum(us) / len(us), 2),
        "p50_us": round(percentile(us, 0.50), 2),
        "p99_us": round(percentile(us, 0.99), 2),
        "max_us": round(us[-1], 2),
    }


async def _profiled(step: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    """``n`` runs of ``step`` under pyinstrument: self time by function."""
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0001, async_mode="disabled")
    profiler.start()
    for _ in range(n):
        await step()
    return self_time_shares(profiler.stop(), top=10, floor=0.02)


# --- lock ---------------------------------------------------------------------------


async def lock_round_trip(url: str, n: int) -> dict[str, Any]:
    async with Client(settings=_settings(url, "lock")) as client:

        async def cycle() -> None:
            lock = client.lock("bench", ttl=10)
            await lock.acquire()
            await lock.release()

        for _ in range(min(200, n)):  # warm: connections, scripts loaded
            await cycle()
        samples = []
        for _ in range(n):
            started = time.perf_counter_ns()
            await cycle()
            samples.append(time.perf_counter_ns() - started)
        profile = await _profiled(cycle, min(n, 2000))
    return {"acquire_release": _latency(samples), "profile": profile}


async def lock_contention(url: str, contenders: int, duration: float) -> dict[str, Any]:
    """``contenders`` tasks over two clients take one lock in turn; empty sections."""
    settings = _settings(url, "lock-contended")
    waits: list[int] = []
    acquired = 0
    async with Client(settings=settings) as first, Client(settings=settings) as second:
        end = time.monotonic() + duration

        async def contend(client: Client) -> None:
            nonlocal acquired
            while time.monotonic() < end:
                started = time.perf_counter_ns()
                async with client.lock("contended", ttl=10, wait=30):
                    waits.append(time.perf_counter_ns() - started)
                    acquired += 1

        started = time.monotonic()
        await asyncio.gather(*(contend((first, second)[i % 2]) for i in range(contenders)))
        elapsed = time.monotonic() - started
    return {
        "contenders": contenders,
        "clients": 2,
        "acquisitions_per_s": round(acquired / elapsed, 1),
        "wait": _latency(waits),
    }


# --- rate limiter -------------------------------------------------------------------

LIMITERS: dict[str, dict[str, Any]] = {
    "token_bucket, allows": {"rate": 1_000_000, "burst": 1_000_000},
    "token_bucket, refuses": {"rate": 0.001, "burst": 1},
    "sliding_window, allows": {"limit": 100_000, "window": 0.001},
}


async def limiter_decisions(url: str, n: int, concurrency: int) -> list[dict[str, Any]]:
    rows = []
    async with Client(settings=_settings(url, "limiter")) as client:
        for label, limits in LIMITERS.items():
            name = label.replace(", ", "-")  # one bucket per row: none shares a key
            limiter = client.rate_limiter(name, **limits)
            await limiter.take()  # the refusing bucket is empty from here on
            for callers in (1, concurrency):
                per_caller = max(1, n // callers)
                allowed = 0

                async def decide(count: int = per_caller, limiter: Any = limiter) -> None:
                    nonlocal allowed
                    for _ in range(count):
                        decision = await limiter.take()  # not `allowed += await ...`:
                        allowed += decision.allowed  # that reads `allowed` before awaiting

                started = time.perf_counter()
                await asyncio.gather(*(decide() for _ in range(callers)))
                elapsed = time.perf_counter() - started
                rows.append({
                    "limiter": label,
                    "callers": callers,
                    "decisions": per_caller * callers,
                    "decisions_per_s": round(per_caller * callers / elapsed),
                    "allowed_share": round(allowed / (per_caller * callers), 3),
                })  # fmt: skip
        bucket = client.rate_limiter("profiled", rate=1_000_000, burst=1_000_000)
        profile = await _profiled(bucket.take, min(n, 2000))
    return [*rows, {"limiter": "token_bucket, allows", "profile": profile}]


# --- cache --------------------------------------------------------------------------

CACHE_VALUE = {"user": 42, "name": "Ada Lovelace", "roles": ["admin", "author"], "score": 0.97}


async def cache_hits(url: str, n: int) -> dict[str, Any]:
    """Local hits (the LRU) and remote hits (a cache without a local level: each get
    one engine read) of one small value."""
    async with Client(settings=_settings(url, "cache")) as client:
        local = client.cache("local", ttl=600)
        remote = client.cache("remote", ttl=600, max_local_bytes=0)
        for cache in (local, remote):
            await cache.set("k", CACHE_VALUE)
        rows = {}
        for label, cache in (("local", local), ("remote", remote)):
            for _ in range(min(n, 500)):
                await cache.get("k")
            samples = []
            for _ in range(n):
                started = time.perf_counter_ns()
                await cache.get("k")
                samples.append(time.perf_counter_ns() - started)
            assert await cache.get("k") == CACHE_VALUE
            rows[label] = {**_latency(samples), "profile": await _profiled(
                lambda c=cache: c.get("k"), min(n, 2000))}  # fmt: skip
        rows["local"]["stats"] = {
            "local_hits": local.stats.local_hits, "local_misses": local.stats.local_misses
        }  # the local loop really hit locally  # fmt: skip
    return rows


async def invalidation(url: str, namespace: str, n: int) -> dict[str, Any]:
    """A writer (here) sets a key that a reader process holds locally; the reader
    reports when its local copy stopped serving the old value (CLOCK_MONOTONIC is
    one clock for every process of the machine). One write at a time."""
    samples = []
    async with Client(settings=Settings(url=url, namespace=namespace)) as client:
        cache = client.cache("inval", ttl=600)
        await cache.set("k", 0)  # before the reader starts: it begins by holding 0
        reader = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.coordination", "--reader", url, namespace, str(n),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert reader.stdout is not None
        for i in range(1, n + 1):
            line = await asyncio.wait_for(reader.stdout.readline(), 30)  # holds i - 1
            if not line.startswith(b"ready"):
                raise RuntimeError(f"invalidation reader: {line!r}")
            started = time.monotonic_ns()
            await cache.set("k", i)
            seen = await asyncio.wait_for(reader.stdout.readline(), 30)
            samples.append(int(seen.split()[1]) - started)
        await reader.wait()
    return _latency(samples)


async def invalidation_reader(url: str, namespace: str, n: int) -> None:
    """The reader process: hold the value locally, say so, spin on the local level
    until the copy is dropped, say when; read the new value; again."""
    async with Client(settings=Settings(url=url, namespace=namespace)) as client:
        cache = client.cache("inval", ttl=600)
        for i in range(n):
            # the write of i was in the engine before its invalidation was sent
            value = await cache.get("k")
            if value != i or cache.peek("k") != i:
                raise RuntimeError(f"reader: expected {i} held locally, read {value!r}")
            print("ready", flush=True)
            # A spin, not an Event: the cache has no hook for its listener, and a
            # sleep(0) loop lets the listener run with no timer in the measurement.
            while cache.peek("k") == i:  # noqa: ASYNC110
                await asyncio.sleep(0)
            print("seen", time.monotonic_ns(), flush=True)


CACHE_TARGETS_US = {"local": 5, "remote": 500, "invalidation": 50_000}


def cache_rows(cache: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for what, label in (("local", "local hit (LRU)"), ("remote", "remote hit (engine)"),
                        ("invalidation", "invalidation visible in another process")):  # fmt: skip
        figures = cache[what]
        target = CACHE_TARGETS_US[what]
        measured = figures["p99_us"]  # the stricter reading of the targets
        rows.append({
            "what": label, **{k: figures[k] for k in ("mean_us", "p50_us", "p99_us")},
            "target": f"p99 ≤ {target:,} µs",
            "met": measured <= target,
        })  # fmt: skip
    return rows


# --- report -------------------------------------------------------------------------


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md's "Coordination" section."""
    lock = result["lock"]
    rt = lock["acquire_release"]
    lines = [
        "| lock | mean | p50 | p99 |",
        "|---|---|---|---|",
        f"| acquire + release, uncontended | {rt['mean_us']} µs | {rt['p50_us']} µs "
        f"| {rt['p99_us']} µs |",
    ]
    cont = lock["contended"]
    lines.append(
        f"| {cont['contenders']} contenders on 2 clients: {cont['acquisitions_per_s']} "
        f"acquisitions/s, wait | {cont['wait']['mean_us']} µs | {cont['wait']['p50_us']} µs "
        f"| {cont['wait']['p99_us']} µs |"
    )
    lines += ["", "| rate limiter | callers | decisions/s | allowed |", "|---|---|---|---|"]
    for row in result["limiter"]:
        if "decisions_per_s" in row:
            lines.append(
                f"| {row['limiter']} | {row['callers']} | {row['decisions_per_s']:,} "
                f"| {row['allowed_share']:.0%} |"
            )
    if "cache" in result:
        lines += ["", "| cache | mean | p50 | p99 | target |", "|---|---|---|---|---|"]
        for row in result["cache"]["rows"]:
            met = "met" if row["met"] else "**missed**"
            lines.append(
                f"| {row['what']} | {row['mean_us']} µs | {row['p50_us']} µs "
                f"| {row['p99_us']} µs | {row['target']}: {met} |"
            )
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="timed operations per loop")
    parser.add_argument("--contenders", type=int, default=8, help="tasks contending a lock")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of contention")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent limiter callers")
    parser.add_argument("--quick", action="store_true", help="a smoke run: few operations")
    parser.add_argument(
        "--only", nargs="+", choices=("lock", "limiter", "cache"), default=None,
        help="run only these parts",
    )  # fmt: skip
    parser.add_argument(
        "--save", nargs="?", const=f"coordination-{time.strftime('%Y-%m-%d')}",
        help="also save the JSON under bench/results/",
    )  # fmt: skip
    parser.add_argument("--table", metavar="JSON", help="print the docs' tables of a saved run")
    parser.add_argument("--reader", nargs=3, help=argparse.SUPPRESS)  # url namespace n
    args = parser.parse_args()
    if args.quick:
        args.n, args.duration, args.contenders, args.concurrency = 200, 0.5, 4, 4
    if args.n < 1 or args.contenders < 1 or args.concurrency < 1 or args.duration <= 0:
        parser.error("--n, --contenders and --concurrency must be >= 1, --duration > 0")
    return args


def main() -> None:
    args = parse_args()
    if args.reader:
        url, namespace, n = args.reader
        asyncio.run(invalidation_reader(url, namespace, int(n)))
        return
    if args.table:
        with open(args.table) as saved:
            sys.stdout.write(markdown(json.load(saved)))
        return
    parts = set(args.only or ("lock", "limiter", "cache"))
    load_avg = os.getloadavg()[0]
    result: dict[str, Any] = {
        "benchmark": "coordination",
        "machine": machine(),
        "code": code_version(),
        "load_avg_1m_before": load_avg,
        "setup": {"n": args.n, "contenders": args.contenders, "duration_s": args.duration,
                  "concurrency": args.concurrency, "engine": "standalone (embedded)"},
    }  # fmt: skip
    with private_engine() as url:
        if "lock" in parts:
            print("lock: round trip, then contention", file=sys.stderr, flush=True)
            result["lock"] = asyncio.run(lock_round_trip(url, args.n))
            result["lock"]["contended"] = asyncio.run(
                lock_contention(url, args.contenders, args.duration)
            )
        if "limiter" in parts:
            print("rate limiter: decisions per second", file=sys.stderr, flush=True)
            result["limiter"] = asyncio.run(limiter_decisions(url, args.n, args.concurrency))
        if "cache" in parts:
            print("cache: local hit, remote hit, invalidation", file=sys.stderr, flush=True)
            cache = asyncio.run(cache_hits(url, args.n))
            writes = max(50, args.n // 10)
            namespace = _settings(url, "inval").namespace
            cache["invalidation"] = asyncio.run(invalidation(url, namespace, writes))
            cache["rows"] = cache_rows(cache)
            result["cache"] = cache
    if {"lock", "limiter"} <= parts:
        sys.stderr.write("\n" + markdown(result))
    if args.save:
        save(args.save, result)
    emit(result)


if __name__ == "__main__":
    main()
