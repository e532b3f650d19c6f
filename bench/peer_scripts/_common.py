"""Shared plumbing for the peer benchmark scripts (stdlib + redis-py only).

Every ``<peer>_bench.py`` runs inside that peer's own venv, which always contains
redis-py (all four peers are built on it), so this module may use nothing else.

A script plays two roles:

* the *driver* (run as ``python <peer>_bench.py --redis ... --workload ...``), which
  enqueues tasks, starts worker subprocesses and measures;
* the *task module* that the peer's worker CLI imports in those subprocesses.

Workloads: "throughput" and "latency" (see each script), and "failover": one worker
holding ``n`` (100) sleeping tasks is SIGKILLed with its whole process tree once half
of them have started, a replacement worker is started at once, and the run measures how
long until every task number has completed - with the peer's *default* reliability
settings (``run_failover``).

Both need the same configuration (Redis URL, key prefix, n ...) at import time, because
the peers build their app/broker objects at module level. ``load_config`` therefore
parses argv in the driver and hands the result to the workers through one environment
variable, ``SHOAL_PEER_BENCH``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ENV_VAR = "SHOAL_PEER_BENCH"
# Set to keep the workers' combined log file (its path is reported as "worker_log").
KEEP_LOGS_ENV = "SHOAL_PEER_KEEP_LOGS"
SCRIPTS_DIR = Path(__file__).resolve().parent
# Completion-counter poll interval of the driver while a throughput run drains. It only
# decides how soon we *notice* the end; the timing itself is stamped by the tasks.
COUNTER_POLL_S = 0.005
# Default SIGTERM -> SIGKILL grace for worker process groups.
WORKER_STOP_GRACE_S = 10.0
# Enqueue loops check the deadline this often (in tasks).
DEADLINE_CHECK_EVERY = 1000
# Per-round-trip bound in the latency loop once the worker is known to be up.
ROUND_TRIP_TIMEOUT_S = 10.0
# The first warm-up round trip also waits for the worker process to boot.
FIRST_ROUND_TRIP_TIMEOUT_S = 60.0
LOG_TAIL_CHARS = 3000

# --- failover workload
WORKLOADS = ("throughput", "latency", "failover")
FAILOVER_N = 100
# Each failover task sleeps this long (the "work") before recording its completion.
FAILOVER_TASK_MS = 200
# Kill the worker once this fraction of the n tasks has started.
FAILOVER_KILL_FRACTION = 0.5
# Bound on waiting for that (covers the first worker's boot: celery prefork forks n
# children, ~8 s here). Shrunk, down to FAILOVER_MIN_START_WAIT_S, when the run's overall
# deadline could not otherwise fit the full recovery wait.
FAILOVER_START_WAIT_S = 60.0
FAILOVER_MIN_START_WAIT_S = 20.0
# Budget kept after the recovery wait and settle: stop workers, delete keys, report.
FAILOVER_TAIL_S = 15.0
DEFAULT_RECOVERY_TIMEOUT_S = 120.0
# After recovery, keep counting this long so late duplicate executions are included.
FAILOVER_SETTLE_S = 2.0
# Workers are only stopped after the measurement, so the polite-stop grace can be short.
FAILOVER_STOP_GRACE_S = 3.0
# Recovery-wait poll; the end time itself is stamped by the task that completes it.
FAILOVER_POLL_S = 0.005
# How long SIGKILLed processes may take to disappear before the run is declared broken.
KILL_CONFIRM_S = 10.0
# Largest n for failover: every task must be in flight at once, i.e. concurrency = n
# (celery prefork forks n processes, dramatiq starts n threads).
FAILOVER_MAX_N = 200


class BenchError(RuntimeError):
    """A failure the driver reports as ``{"error": ...}`` before exiting non-zero."""


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, identical in the driver and in its workers."""

    peer: str
    redis_url: str
    workload: str
    n: int
    workers: int
    timeout: float
    warmup: int
    poll_s: float
    recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT_S
    # Unique per run; every key a run creates contains it, which is what cleanup scans.
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def prefix(self) -> str:
        """Key/queue prefix for everything the peer lets us name."""
        return f"shoal-bench:{self.peer}:{self.tag}:"

    @property
    def counter_key(self) -> str:
        return self.prefix + "done"

    @property
    def first_key(self) -> str:
        return self.prefix + "t-first"

    @property
    def last_key(self) -> str:
        return self.prefix + "t-last"

    # failover keys: executions started, set of completed task numbers, and the wall-clock
    # time at which the set first reached n (stamped atomically by the completing task).
    @property
    def started_key(self) -> str:
        return self.prefix + "started"

    @property
    def done_set_key(self) -> str:
        return self.prefix + "done-set"

    @property
    def all_done_key(self) -> str:
        return self.prefix + "t-all-done"

    @property
    def concurrency(self) -> int:
        """Tasks one failover worker must hold in flight at once: all of them."""
        return self.n


def _parse_args(peer: str, argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"{peer} benchmark against a Redis-protocol engine")
    p.add_argument("--redis", required=True, help="redis://host:port[/db]")
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("-n", type=int, default=None, help="tasks / round trips")
    p.add_argument("--workers", type=int, default=1, help="worker processes (throughput)")
    p.add_argument("--timeout", type=float, default=600.0, help="overall deadline, seconds")
    p.add_argument("--warmup", type=int, default=50, help="latency warm-up round trips")
    p.add_argument(
        "--poll-ms",
        type=float,
        default=1.0,
        help="value for every poll interval the peer exposes (worker idle poll, result wait)",
    )
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=DEFAULT_RECOVERY_TIMEOUT_S,
        help="failover: give up waiting for all tasks this many seconds after the kill",
    )
    return p.parse_args(argv)


def load_config(peer: str, argv: Sequence[str] | None = None) -> RunConfig:
    """Config from ``SHOAL_PEER_BENCH`` (worker side) or argv (driver side).

    The driver exports the config so that worker subprocesses it starts inherit it.
    """
    raw = os.environ.get(ENV_VAR)
    if raw:
        return RunConfig(**json.loads(raw))
    args = _parse_args(peer, argv)
    default_n = {"throughput": 20000, "latency": 1000, "failover": FAILOVER_N}[args.workload]
    cfg = RunConfig(
        peer=peer,
        redis_url=args.redis,
        workload=args.workload,
        n=args.n if args.n is not None else default_n,
        workers=args.workers if args.workload == "throughput" else 1,
        timeout=args.timeout,
        warmup=args.warmup,
        poll_s=args.poll_ms / 1000.0,
        recovery_timeout=args.recovery_timeout,
    )
    if cfg.n < 2 or cfg.workers < 1:
        raise SystemExit("need n >= 2 and workers >= 1")
    if cfg.workload == "failover" and cfg.n > FAILOVER_MAX_N:
        raise SystemExit(f"failover needs n <= {FAILOVER_MAX_N} (concurrency = n)")
    if cfg.recovery_timeout <= 0:
        raise SystemExit("need --recovery-timeout > 0")
    os.environ[ENV_VAR] = json.dumps(asdict(cfg))
    return cfg


# --------------------------------------------------------------------------- tasks side


def record_completion(client: redis.Redis, cfg: RunConfig) -> None:
    """Body of the throughput task: count it, and stamp the first and the last one.

    Stamping inside the task (wall clock, shared by all processes on this host) times
    the drain from first to last completion exactly, instead of to the driver's poll
    granularity. Only 2 of n tasks pay the extra SET.
    """
    done = client.incr(cfg.counter_key)
    if done == 1 or done == cfg.n:
        client.set(cfg.first_key if done == 1 else cfg.last_key, repr(time.time()))


async def record_completion_async(client: Any, cfg: RunConfig) -> None:
    """``record_completion`` for asyncio peers (``client`` is a redis.asyncio client)."""
    done = await client.incr(cfg.counter_key)
    if done == 1 or done == cfg.n:
        await client.set(cfg.first_key if done == 1 else cfg.last_key, repr(time.time()))


# Completion of failover task ARGV[1]: count it, add its number to the set, and when the
# set first holds n numbers stamp the time (ARGV[3]). One script = atomic, so a worker
# killed mid-way cannot leave a completion counted but not added, or vice versa.
_FAILOVER_DONE_LUA = """
local done = redis.call('INCR', KEYS[1])
if redis.call('SADD', KEYS[2], ARGV[1]) == 1
   and redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], ARGV[3], 'NX')
end
return done
"""


def _failover_done_args(cfg: RunConfig, i: int) -> tuple[Any, ...]:
    keys = (cfg.counter_key, cfg.done_set_key, cfg.all_done_key)
    return (_FAILOVER_DONE_LUA, 3, *keys, i, cfg.n, repr(time.time()))


def failover_task(client: redis.Redis, cfg: RunConfig, i: int) -> None:
    """Body of failover task ``i`` (sync peers): started INCR, 200 ms of work, done."""
    client.incr(cfg.started_key)
    time.sleep(FAILOVER_TASK_MS / 1000.0)
    client.eval(*_failover_done_args(cfg, i))


async def failover_task_async(client: Any, cfg: RunConfig, i: int) -> None:
    """``failover_task`` for asyncio peers (``client`` is a redis.asyncio client)."""
    import asyncio

    await client.incr(cfg.started_key)
    await asyncio.sleep(FAILOVER_TASK_MS / 1000.0)
    await client.eval(*_failover_done_args(cfg, i))


# --------------------------------------------------------------------------- driver side


class Deadline:
    """The run's overall time budget; every wait is capped by what is left of it."""

    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self._end - time.monotonic())

    def check(self) -> None:
        """Raise once the budget is spent; for loops that have no wait of their own."""
        if self.left() <= 0:
            raise BenchError("overall deadline exceeded")

    def cap(self, seconds: float) -> float:
        """``seconds`` or less, so that no single wait overruns the run."""
        left = self.left()
        if left <= 0:
            raise BenchError("overall deadline exceeded")
        return min(seconds, left)


@dataclass
class WorkerGroup:
    """Worker subprocesses, each the leader of its own process group.

    Own process groups let us signal a worker *and* whatever it forked (dramatiq and
    taskiq fork their real worker processes) without touching the driver itself.
    """

    # SIGTERM -> SIGKILL grace. Benchmarks are over by then, so this only bounds how
    # long a peer may take to shut down politely.
    stop_grace_s: float = WORKER_STOP_GRACE_S
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_path: Path = field(default_factory=lambda: _new_log_file())

    def start(self, cmds: list[list[str]], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(SCRIPTS_DIR), full_env.get("PYTHONPATH", "")) if p
        )
        with self.log_path.open("ab") as log:
            for cmd in cmds:
                proc = subprocess.Popen(
                    cmd,
                    cwd=SCRIPTS_DIR,
                    env=full_env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    process_group=0,
                )
                self.procs.append(proc)

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise BenchError(f"worker pid {proc.pid} exited early with rc={proc.returncode}")

    def stop(self) -> None:
        """SIGTERM each worker's leader, give them a grace period, then SIGKILL the groups.

        Only the leader gets SIGTERM: dramatiq's and taskiq's supervisors forward it to
        their children themselves, and a second copy makes them escalate.
        """
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + self.stop_grace_s
        for proc in self.procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, end - time.monotonic()))
        for proc in self.procs:
            # Also reaps children that outlived a leader which did exit in time.
            _signal_group(proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)


def _new_log_file() -> Path:
    """Workers log here rather than to our stdout, which carries only the result JSON."""
    fd, path = tempfile.mkstemp(prefix="shoal-peer-", suffix=".log")
    os.close(fd)
    return Path(path)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_for_drain(client: redis.Redis, cfg: RunConfig, group: WorkerGroup, dl: Deadline) -> None:
    """Poll every COUNTER_POLL_S until the first and the last completion are stamped.

    Waiting on the stamps rather than on ``counter >= n`` closes the gap between the
    last task's INCR and its SET of the end time.
    """
    while True:
        done, first, last = client.mget([cfg.counter_key, cfg.first_key, cfg.last_key])
        if first is not None and last is not None:
            return
        group.check_alive()
        if dl.left() <= 0:
            raise BenchError(f"timed out with {int(done or 0)}/{cfg.n} tasks completed")
        time.sleep(COUNTER_POLL_S)


def drain_seconds(client: redis.Redis, cfg: RunConfig) -> float:
    """Seconds from the first to the last task completion, as stamped by the tasks."""
    first, last = client.mget([cfg.first_key, cfg.last_key])
    if first is None or last is None:
        raise BenchError("completion timestamps missing")
    seconds = float(last) - float(first)
    if seconds <= 0:
        raise BenchError(f"non-positive drain time {seconds!r}")
    return seconds


def throughput_result(cfg: RunConfig, seconds: float, enqueue_s: float) -> dict[str, Any]:
    """n tasks completed over ``seconds`` means n-1 completions after the first one."""
    return {
        "peer": cfg.peer,
        "workload": cfg.workload,
        "n": cfg.n,
        "workers": cfg.workers,
        "seconds": round(seconds, 4),
        "tasks_per_s": round((cfg.n - 1) / seconds, 1),
        "enqueue_seconds": round(enqueue_s, 4),
        "enqueue_per_s": round(cfg.n / enqueue_s, 1) if enqueue_s > 0 else None,
    }


def run_throughput(
    cfg: RunConfig,
    group: WorkerGroup,
    dl: Deadline,
    enqueue: Callable[[Deadline], None],
    worker_cmds: list[list[str]],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Enqueue all n tasks first, then start the workers and time the drain.

    Enqueueing up front means the workers never wait on the producer, so what is timed
    is the peer's consume -> execute -> ack path alone.
    """
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=30)
    t0 = time.perf_counter()
    enqueue(dl)
    enqueue_s = time.perf_counter() - t0
    group.start(worker_cmds, env)
    wait_for_drain(client, cfg, group, dl)
    return throughput_result(cfg, drain_seconds(client, cfg), enqueue_s)


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of sorted samples."""
    pos = (len(sorted_ms) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def latency_result(cfg: RunConfig, samples_s: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1000.0 for s in samples_s)
    return {
        "peer": cfg.peer,
        "workload": cfg.workload,
        "n": len(ms),
        "workers": 1,
        "warmup": cfg.warmup,
        "p50_ms": round(_percentile(ms, 0.50), 3),
        "p90_ms": round(_percentile(ms, 0.90), 3),
        "p99_ms": round(_percentile(ms, 0.99), 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
        "min_ms": round(ms[0], 3),
        "max_ms": round(ms[-1], 3),
    }


def measure_round_trips(cfg: RunConfig, dl: Deadline, one: Callable[[float], None]) -> list[float]:
    """Time ``cfg.warmup + cfg.n`` sequential calls of ``one(timeout_s)``; keep the last n.

    The first call also covers worker start-up, so it gets a longer timeout.
    """
    samples: list[float] = []
    for i in range(cfg.warmup + cfg.n):
        limit = FIRST_ROUND_TRIP_TIMEOUT_S if i == 0 else ROUND_TRIP_TIMEOUT_S
        timeout = dl.cap(limit)
        t0 = time.perf_counter()
        one(timeout)
        elapsed = time.perf_counter() - t0
        if i >= cfg.warmup:
            samples.append(elapsed)
    return samples


async def measure_round_trips_async(cfg: RunConfig, dl: Deadline, one: Any) -> list[float]:
    """``measure_round_trips`` for asyncio peers (``one`` is ``async (timeout) -> None``)."""
    samples: list[float] = []
    for i in range(cfg.warmup + cfg.n):
        limit = FIRST_ROUND_TRIP_TIMEOUT_S if i == 0 else ROUND_TRIP_TIMEOUT_S
        timeout = dl.cap(limit)
        t0 = time.perf_counter()
        await one(timeout)
        elapsed = time.perf_counter() - t0
        if i >= cfg.warmup:
            samples.append(elapsed)
    return samples


# --------------------------------------------------------------------------- failover


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every live (non-zombie) process, from /proc (Linux)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # comm (field 2) may hold spaces/parens; after the last ')' come state, ppid, pgrp.
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] not in ("Z", "X"):
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def _worker_tree(leader: int, table: dict[int, tuple[int, int]]) -> set[int]:
    """The leader's process group plus all its descendants (in case one left the group)."""
    pids = {pid for pid, (_ppid, pgid) in table.items() if pgid == leader}
    pids.add(leader)
    frontier = [leader]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _pgid) in table.items():
            if ppid == parent and pid not in pids:
                pids.add(pid)
                frontier.append(pid)
    return pids


def crash_worker(proc: subprocess.Popen[bytes]) -> int:
    """Kill a worker the way a crashed machine dies: every one of its processes at once.

    SIGSTOP freezes the whole group first (no process can fork or write to Redis any
    more), then the frozen tree - group members and descendants - is collected and
    SIGKILLed; nothing gets a signal it could handle. Returns the number of processes
    killed once all of them are confirmed gone.
    """
    _signal_group(proc.pid, signal.SIGSTOP)
    victims = _worker_tree(proc.pid, _proc_table())
    _signal_group(proc.pid, signal.SIGKILL)
    for pid in victims:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=KILL_CONFIRM_S)
    end = time.monotonic() + KILL_CONFIRM_S
    while alive := victims & set(_proc_table()):
        if time.monotonic() > end:
            raise BenchError(f"worker processes {sorted(alive)} survived SIGKILL")
        time.sleep(0.001)
    return len(victims)


def _failover_counts(client: redis.Redis, cfg: RunConfig) -> tuple[int, int, int]:
    """(executions started, completions, distinct task numbers completed)."""
    pipe = client.pipeline(transaction=True)
    pipe.get(cfg.started_key).get(cfg.counter_key).scard(cfg.done_set_key)
    started, done, distinct = pipe.execute()
    return int(started or 0), int(done or 0), int(distinct)


def _wait_started(
    client: redis.Redis,
    cfg: RunConfig,
    worker: subprocess.Popen[bytes],
    dl: Deadline,
    kill_after: int,
    bound_s: float,
) -> str:
    """Poll the "started" counter until ``kill_after`` tasks have begun; say what fired."""
    end = time.monotonic() + bound_s
    while True:
        started = int(client.get(cfg.started_key) or 0)
        if started >= kill_after:
            return f"started >= {kill_after}"
        if worker.poll() is not None:
            raise BenchError(f"worker exited early with rc={worker.returncode}")
        if time.monotonic() >= end:
            if started == 0:
                raise BenchError(f"no task started within {bound_s:.0f}s")
            return f"start wait of {bound_s:.0f}s elapsed ({started} started)"
        dl.check()
        time.sleep(FAILOVER_POLL_S)


def _wait_recovered(
    client: redis.Redis,
    cfg: RunConfig,
    worker: subprocess.Popen[bytes],
    dl: Deadline,
    t_kill_mono: float,
) -> tuple[bytes | None, float]:
    """Wait for the all-done stamp, at most ``cfg.recovery_timeout`` s after the kill.

    Returns (stamp or None, seconds waited since the kill).
    """
    while True:
        stamp = client.get(cfg.all_done_key)
        waited = time.monotonic() - t_kill_mono
        if stamp is not None or waited >= cfg.recovery_timeout:
            return stamp, waited
        if worker.poll() is not None:
            raise BenchError(f"replacement worker exited with rc={worker.returncode}")
        dl.check()
        time.sleep(FAILOVER_POLL_S)


def run_failover(
    cfg: RunConfig,
    group: WorkerGroup,
    dl: Deadline,
    enqueue: Callable[[Deadline], None],
    worker_cmd: list[str],
    env: dict[str, str] | None = None,
    probe: Callable[[redis.Redis], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Crash the only worker while it holds the n tasks; time the replacement's recovery.

    1. enqueue n failover tasks, start ONE worker (``worker_cmd``);
    2. once half the tasks have started (bounded, FAILOVER_START_WAIT_S at most), crash it
       (``crash_worker``) and immediately start a replacement with the same command;
    3. wait - at most ``cfg.recovery_timeout`` s after the kill - until all n task
       numbers have completed; the completing task stamps the time itself;
    4. if recovered, keep counting FAILOVER_SETTLE_S longer for late duplicates.

    ``probe(client)`` describes where the unfinished messages sit in the peer's own
    keys at the end (e.g. celery's unacked hash); it is reported as ``broker_state``.
    """
    start_wait = min(
        FAILOVER_START_WAIT_S,
        dl.left() - cfg.recovery_timeout - FAILOVER_SETTLE_S - FAILOVER_TAIL_S,
    )
    if start_wait < FAILOVER_MIN_START_WAIT_S:
        needed = FAILOVER_MIN_START_WAIT_S + cfg.recovery_timeout + FAILOVER_SETTLE_S
        raise BenchError(f"--timeout too short: failover needs {needed + FAILOVER_TAIL_S:.0f}s")
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=30)
    kill_after = max(1, round(cfg.n * FAILOVER_KILL_FRACTION))
    enqueue(dl)
    group.start([worker_cmd], env)
    first = group.procs[-1]
    t_start = time.monotonic()
    trigger = _wait_started(client, cfg, first, dl, kill_after, start_wait)

    t_kill = time.time()
    t_kill_mono = time.monotonic()
    killed = crash_worker(first)
    kill_s = time.monotonic() - t_kill_mono
    started_at_kill, done_at_kill, distinct_at_kill = _failover_counts(client, cfg)
    group.start([worker_cmd], env)
    replacement = group.procs[-1]

    stamp, waited = _wait_recovered(client, cfg, replacement, dl, t_kill_mono)
    recovered = stamp is not None
    if recovered:
        time.sleep(dl.cap(FAILOVER_SETTLE_S))
    executions, completions, distinct = _failover_counts(client, cfg)
    result: dict[str, Any] = {
        "peer": cfg.peer,
        "workload": "failover",
        "n": cfg.n,
        "task_ms": FAILOVER_TASK_MS,
        "recovered": recovered,
        "seconds_to_recover": round(float(stamp) - t_kill, 3) if recovered else None,
        "completed_distinct": distinct,
        "duplicates": completions - distinct,
        "lost": cfg.n - distinct,
        "waited_s": round(waited, 3),
        "recovery_timeout_s": cfg.recovery_timeout,
        "executions_started": executions,
        "completions": completions,
        "settle_s_after_recovery": FAILOVER_SETTLE_S if recovered else 0.0,
        "kill": {
            "trigger": trigger,
            "seconds_after_worker_start": round(t_kill_mono - t_start, 3),
            "processes_killed": killed,
            "seconds_to_confirm_dead": round(kill_s, 4),
            "started_at_kill": started_at_kill,
            "completed_at_kill": done_at_kill,
            "distinct_at_kill": distinct_at_kill,
        },
    }
    if probe is not None:
        try:
            result["broker_state"] = probe(client)
        except Exception as exc:  # informational only: never lose the measurement to it
            result["broker_state"] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


def delete_run_keys(client: redis.Redis, cfg: RunConfig) -> int:
    """Delete every key whose name contains the run tag; the engine may be shared.

    Peers that do not let us choose a prefix (arq's ``arq:job:<id>``, taskiq's
    ``autoclaim:<group>:<stream>``) still get the tag inside the name via job ids and
    queue names, hence the ``*tag*`` match rather than ``prefix*``.
    """
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"*{cfg.tag}*", count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.delete(*batch))
            batch = []
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of the packages that matter for this peer, plus Python's."""
    out = {"python": sys.version.split()[0]}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def redis_parser() -> str:
    """Which RESP parser redis-py uses here; hiredis vs pure Python skews results."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:  # pragma: no cover - very old redis-py
        return "unknown"
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def engine_info(client: redis.Redis) -> dict[str, str]:
    info = client.info("server")
    name = "valkey" if "valkey_version" in info else "redis"
    return {"server": name, "version": str(info.get(f"{name}_version", info.get("redis_version")))}


def venv_bin(name: str) -> str:
    """A console script of the venv we run in (the peer's own worker CLI)."""
    return str(Path(sys.executable).parent / name)


def emit(payload: dict[str, Any]) -> None:
    """The script's one stdout line, read by the harness."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (the harness's timeout) into SystemExit so ``finally`` blocks run."""
    previous = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_driver(
    cfg: RunConfig,
    body: Callable[[WorkerGroup, Deadline], dict[str, Any]],
    settings: dict[str, Any],
    packages: Sequence[str],
    stop_grace_s: float = WORKER_STOP_GRACE_S,
) -> int:
    """Run ``body`` with guaranteed worker shutdown and key cleanup; print one JSON line.

    Returns the process exit code: 0 on success, 1 with an ``"error"`` field otherwise.
    """
    client = redis.Redis.from_url(cfg.redis_url, socket_timeout=30)
    group = WorkerGroup(stop_grace_s=stop_grace_s)
    dl = Deadline(cfg.timeout)
    payload: dict[str, Any] = {"peer": cfg.peer, "workload": cfg.workload, "n": cfg.n}
    rc = 1
    with terminate_on_sigterm():
        try:
            payload = body(group, dl)
            rc = 0
        except (Exception, SystemExit) as exc:  # every failure becomes JSON
            payload["error"] = f"{type(exc).__name__}: {exc}"
            payload["traceback"] = traceback.format_exc()[-LOG_TAIL_CHARS:]
            payload["worker_log_tail"] = group.log_tail()
        finally:
            t_stop = time.monotonic()
            group.stop()
            payload["worker_stop_s"] = round(time.monotonic() - t_stop, 3)
            payload["keys_deleted"] = _safe_cleanup(client, cfg)
            if os.environ.get(KEEP_LOGS_ENV):
                payload["worker_log"] = str(group.log_path)
            else:
                group.remove_log()
    payload["settings"] = {**settings, "redis_parser": redis_parser(), "key_tag": cfg.tag}
    payload["versions"] = versions(packages)
    payload["engine"] = _safe_engine_info(client)
    emit(payload)
    return rc


def _safe_cleanup(client: redis.Redis, cfg: RunConfig) -> int | str:
    try:
        return delete_run_keys(client, cfg)
    except redis.RedisError as exc:
        return f"cleanup failed: {exc}"


def _safe_engine_info(client: redis.Redis) -> dict[str, str]:
    try:
        return engine_info(client)
    except redis.RedisError as exc:
        return {"error": str(exc)}
