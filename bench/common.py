"""Shared pieces of the benchmarks: a private engine (a standalone server, a local
Cluster or a local Sentinel group), node processes, the engine's own statistics,
JSON output."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import redis
from redis.crc import key_slot

# Shared with `shoal bench` (shoal.benchmark), re-exported for the benchmarks here.
from shoal.benchmark import machine as machine
from shoal.benchmark import node_processes as node_processes
from shoal.benchmark import percentile as percentile
from shoal.benchmark import private_engine as private_engine
from shoal.testing.topologies import LocalCluster, LocalSentinelGroup

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
ENGINES = ("standalone", "cluster", "sentinel")
CLUSTER_PRIMARIES = 3
SENTINEL_REPLICAS = 2
SENTINELS = 3
PEERS_STANDALONE_ONLY = (
    "peers run on the standalone engine only: the peer scripts take one redis:// URL and "
    "use each peer's plain Redis broker (Celery/kombu, Dramatiq and arq have no Redis "
    "Cluster support; kombu, arq and taskiq-redis have Sentinel support, and taskiq-redis "
    "Cluster brokers, which the harness does not use)"
)


@dataclass(frozen=True)
class Engine:
    """A private engine of one kind: the URL Shoal is given, and plain URLs of its
    data servers (read directly for INFO: the primaries do the work, the replicas
    follow them)."""

    kind: str
    url: str
    primaries: tuple[str, ...]
    replicas: tuple[str, ...] = ()
    topology: dict[str, Any] = field(default_factory=dict)

    @property
    def primary_addresses(self) -> list[str]:
        """host:port of each primary (as INFO and CLUSTER SLOTS name them)."""
        return [f"{u.hostname}:{u.port}" for u in map(urlsplit, self.primaries)]


@contextlib.contextmanager
def private_topology(
    kind: str = "standalone", cluster_replicas: int = 0, aof: bool = True
) -> Iterator[Engine]:
    """A fresh engine of ``kind`` under a temporary directory, stopped at the end:

    * standalone: the embedded engine (what ``shoal node`` starts by itself: AOF on);
    * cluster: a LocalCluster of 3 primaries (``cluster_replicas`` replicas each);
    * sentinel: a LocalSentinelGroup of 1 primary, 2 replicas and 3 Sentinels.

    The Cluster and Sentinel servers keep no AOF (see shoal.testing.topologies);
    ``aof=False`` turns the standalone engine's off too. All are password-protected."""
    if kind == "standalone":
        with private_engine() as url:
            if not aof:
                with redis.Redis.from_url(url) as conn:
                    conn.config_set("appendonly", "no")
            appendonly = "yes" if aof else "no"
            yield Engine(kind, url, (url,), topology={"servers": 1, "appendonly": appendonly})
        return
    password = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix=f"shoal-bench-{kind}-") as tmp:
        if kind == "cluster":
            with LocalCluster(
                CLUSTER_PRIMARIES, cluster_replicas, password, base_dir=Path(tmp)
            ) as cluster:
                yield Engine(
                    kind, cluster.url,
                    tuple(cluster.node_url(n.port) for n in cluster.primaries),
                    tuple(cluster.node_url(n.port) for n in cluster.replicas),
                    {"primaries": CLUSTER_PRIMARIES, "replicas_per_primary": cluster_replicas,
                     "appendonly": "no"},
                )  # fmt: skip
        elif kind == "sentinel":
            with LocalSentinelGroup(
                SENTINEL_REPLICAS, SENTINELS, password=password, base_dir=Path(tmp)
            ) as group:
                primary = group.primary_port()
                data = [n.port for n in group.data_nodes]
                yield Engine(
                    kind, group.url, (group.node_url(primary),),
                    tuple(group.node_url(port) for port in data if port != primary),
                    {"primaries": 1, "replicas": SENTINEL_REPLICAS, "sentinels": SENTINELS,
                     "appendonly": "no"},
                )  # fmt: skip
        else:
            raise ValueError(f"engine {kind!r}: use one of {', '.join(ENGINES)}")


def add_engine_arguments(parser: argparse.ArgumentParser, several: bool = True) -> None:
    """--engine, --ack-replicas, --cluster-replicas, --no-aof, --repeat and --save, for
    every benchmark that can run on all three topologies. With ``several``, runs are
    repeated and may compare several --ack-replicas values (interleaved, one engine)."""
    parser.add_argument("--engine", choices=ENGINES, default="standalone")
    parser.add_argument(
        "--ack-replicas",
        type=int,
        nargs="+" if several else None,
        default=[0] if several else 0,
        metavar="N",
        help="WAIT for N replicas after submits and results (SHOAL_ACK_REPLICAS)"
        + ("; several values are run in turn" if several else ""),
    )
    parser.add_argument(
        "--cluster-replicas", type=int, default=0, metavar="N", help="replicas per Cluster primary"
    )
    parser.add_argument(
        "--no-aof",
        dest="aof",
        action="store_false",
        help="standalone: AOF off, as on the local Cluster and Sentinel servers",
    )
    if several:
        parser.add_argument(
            "--repeat", type=int, default=1, metavar="K", help="Shoal runs per setting (one engine)"
        )
    parser.add_argument("--save", metavar="NAME", help="also write bench/results/NAME.json")


def check_engine_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse an --ack-replicas the topology cannot satisfy (every WAIT would time out)."""
    if args.cluster_replicas and args.engine != "cluster":
        parser.error("--cluster-replicas goes with --engine cluster")
    available = {"standalone": 0, "cluster": args.cluster_replicas, "sentinel": SENTINEL_REPLICAS}
    acks = args.ack_replicas if isinstance(args.ack_replicas, list) else [args.ack_replicas]
    for ack in acks:
        if not 0 <= ack <= available[args.engine]:
            parser.error(
                f"--ack-replicas {ack}: the {args.engine} engine has "
                f"{available[args.engine]} replica(s) per primary (see --cluster-replicas)"
            )


def shoal_env(ack_replicas: int = 0) -> dict[str, str]:
    """Extra environment of node processes: the run's settings, not the shell's."""
    return {"SHOAL_ACK_REPLICAS": str(ack_replicas)}


def process_cpu(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """CPU seconds (user + system) the processes used so far, summed."""
    total = 0.0
    for proc in procs:
        times = psutil.Process(proc.pid).cpu_times()
        total += times.user + times.system
    return total


# --- the engine's own statistics ---------------------------------------------------


@dataclass(frozen=True)
class ServerStats:
    """One data server's CPU seconds and per-command counters (INFO cpu, commandstats).
    Commands that scripts run count too, next to the EVALSHA that ran them."""

    address: str
    cpu_s: float
    calls: dict[str, int]
    usec: dict[str, int]


def server_stats(url: str) -> ServerStats:
    with redis.Redis.from_url(url) as conn:
        cpu = conn.info("cpu")
        commands = conn.info("commandstats")
        host = conn.connection_pool.connection_kwargs
    names = {name.removeprefix("cmdstat_"): v for name, v in commands.items()}
    return ServerStats(
        address=f"{host['host']}:{host['port']}",
        cpu_s=float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        calls={name: int(v["calls"]) for name, v in names.items()},
        usec={name: int(v["usec"]) for name, v in names.items()},
    )


def engine_snapshot(engine: Engine) -> dict[str, list[ServerStats]]:
    return {
        "primaries": [server_stats(url) for url in engine.primaries],
        "replicas": [server_stats(url) for url in engine.replicas],
    }


def _delta(before: ServerStats, after: ServerStats) -> ServerStats:
    calls = {k: v - before.calls.get(k, 0) for k, v in after.calls.items()}
    usec = {k: v - before.usec.get(k, 0) for k, v in after.usec.items()}
    return ServerStats(
        after.address,
        after.cpu_s - before.cpu_s,
        {k: v for k, v in calls.items() if v},
        {k: usec[k] for k, v in calls.items() if v},
    )


def slot_owners(engine: Engine) -> list[tuple[int, int, str]]:
    """(first slot, last slot, primary host:port) of a Cluster; [] otherwise."""
    if engine.kind != "cluster":
        return []
    with redis.Redis.from_url(engine.primaries[0], decode_responses=True) as conn:
        reply = conn.execute_command("CLUSTER", "SLOTS")
    return [(int(e[0]), int(e[1]), f"{e[2][0]}:{e[2][1]}") for e in reply]


def shard_of(key: str, owners: list[tuple[int, int, str]]) -> str:
    slot = key_slot(key.encode())
    return next(addr for first, last, addr in owners if first <= slot <= last)


def engine_report(
    before: dict[str, list[ServerStats]],
    after: dict[str, list[ServerStats]],
    n: int,
    tasks_per_shard: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Per task: commands and CPU µs summed over the primaries (and the replicas'
    CPU apart); per primary: its share of the commands, CPU and tasks; every command
    run, the most engine time first."""
    primaries = [_delta(b, a) for b, a in zip(before["primaries"], after["primaries"], strict=True)]
    replicas = [_delta(b, a) for b, a in zip(before["replicas"], after["replicas"], strict=True)]
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for stats in primaries:
        for name, count in stats.calls.items():
            calls[name] = calls.get(name, 0) + count
            usec[name] = usec.get(name, 0) + stats.usec[name]
    cpu = sum(s.cpu_s for s in primaries)
    shards = [
        {
            "primary": s.address,
            **({} if tasks_per_shard is None else {"tasks": tasks_per_shard.get(s.address, 0)}),
            "commands": sum(s.calls.values()),
            "evalsha": s.calls.get("evalsha", 0),
            "cpu_s": round(s.cpu_s, 3),
            "cpu_us_per_task": round(s.cpu_s / n * 1e6, 1),
        }
        for s in primaries
    ]
    ranked = sorted(calls, key=lambda name: -usec[name])
    return {
        "commands_per_task": round(sum(calls.values()) / n, 2),
        "evalsha_per_task": round(calls.get("evalsha", 0) / n, 3),
        "wait_per_task": round(calls.get("wait", 0) / n, 4),
        "engine_cpu_us_per_task": round(cpu / n * 1e6, 1),
        "replicas_cpu_us_per_task": round(sum(s.cpu_s for s in replicas) / n * 1e6, 1),
        "shards": shards,
        "commands": {
            name: {
                "calls_per_task": round(calls[name] / n, 3),
                "usec_per_call": round(usec[name] / calls[name], 2),
            }
            for name in ranked
        },
    }


# --- output ---------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "src_modified": bool(git("status", "--porcelain", "--", "src"))}  # fmt: skip


def save(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` to bench/results/<name>.json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def report(benchmark: str, engine: Engine, args: Any, runs: list[Any], peers: list[str]) -> None:
    """Print (and with ``--save``, keep) a benchmark's JSON: the machine, the code,
    the engine's topology and every run; says why peers were skipped off standalone."""
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "machine": machine(),
        "code": code_version(),
        "engine": {"kind": engine.kind, **engine.topology},
        "ack_replicas": args.ack_replicas,
        "runs": runs,
    }
    if args.peers and not peers:
        result["peers_skipped"] = {"peers": args.peers, "why": PEERS_STANDALONE_ONLY}
    if args.save:
        save(args.save, result)
    emit(result)


def self_time_shares(session: Any, top: int = 15, floor: float = 0.01) -> dict[str, float]:
    """A pyinstrument session summarised: the share of self time of the ``top``
    functions (at least ``floor`` each) — where a loop's time goes, in JSON."""
    own: dict[str, float] = collections.defaultdict(float)
    root = session.root_frame()
    stack = [root] if root is not None else []
    while stack:
        frame = stack.pop()
        stack += frame.children
        if not frame.is_synthetic:
            name = f"{frame.class_name}.{frame.function}" if frame.class_name else frame.function
            own[f"{name}  {frame.file_path_short}:{frame.line_no}"] += frame.total_self_time
    total = sum(own.values()) or 1.0
    ranked = sorted(own.items(), key=lambda item: -item[1])[:top]
    return {name: round(t / total, 3) for name, t in ranked if t / total >= floor}
