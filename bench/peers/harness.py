"""Run the peer task queues (Celery, Dramatiq, arq, taskiq) against one Redis-protocol engine.

Each peer lives in its own virtualenv because their redis-py pins conflict (arq wants
``redis<6`` while taskiq-redis wants ``redis>=6``), so the benchmark for a peer is a
standalone script under ``bench/peer_scripts`` executed with that venv's interpreter.
The script prints exactly one JSON object on its last stdout line; this module creates
the venvs, runs the scripts with a hard deadline and hands back that object.

CLI::

    python -m bench.peers.harness --peer celery --redis redis://127.0.0.1:6399 \\
        --workload throughput -n 20000 --workers 1
    python -m bench.peers.harness --peer dramatiq --redis redis://127.0.0.1:6399 \\
        --workload failover [--recovery-timeout 120]

"failover" (n defaults to 100) crashes the one worker of a peer while it holds n 200 ms
tasks and reports how long a replacement worker takes to complete all of them, with
the peer's default reliability settings; see ``bench/peer_scripts/_common.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

PEERS = ("celery", "dramatiq", "arq", "taskiq")
WORKLOADS = ("throughput", "latency", "failover")
DEFAULT_N = {"throughput": 20000, "latency": 1000, "failover": 100}
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_RECOVERY_TIMEOUT_S = 120.0
# A failover run is worker boot + up to 60 s waiting for tasks to start + the recovery
# bound + settle/stop/cleanup; the harness deadline must leave room for all of it. With
# the minimum margin the script still gets >= 20 s for boot + start (celery: ~8 s).
FAILOVER_TIMEOUT_MARGIN_S = 180.0
FAILOVER_MIN_MARGIN_S = 60.0

# Exact pins, including redis-py and hiredis: the client library and its parser dominate
# a no-op task's cost, so they must not drift between runs. hiredis is installed for
# every peer (and Shoal's own venv has it) so that all sides parse RESP the same way.
PINS: dict[str, tuple[str, ...]] = {
    "celery": ("celery[redis]==5.7.0", "kombu==5.7.0", "redis==8.1.0", "hiredis==3.5.0"),
    "dramatiq": ("dramatiq[redis]==2.2.1", "redis==8.1.0", "hiredis==3.5.0"),
    "arq": ("arq==0.28.0", "redis==5.3.1", "hiredis==3.5.0"),
    "taskiq": ("taskiq==0.13.0", "taskiq-redis==1.2.4", "redis==8.1.0", "hiredis==3.5.0"),
}

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "peer_scripts"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "shoal-bench" / "venvs"
MARKER_NAME = "shoal-bench-pins.json"
# How long a peer script gets to clean up (stop its workers, delete its keys) after
# SIGTERM before everything in its session is SIGKILLed.
TERM_GRACE_S = 15.0
DEFAULT_POLL_MS = 1.0


class PeerRunError(RuntimeError):
    """A peer benchmark failed; ``result`` holds whatever JSON the script printed."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}


def _log(msg: str) -> None:
    """Progress goes to stderr so stdout stays pure JSON for the CLI."""
    print(f"[peer-harness] {msg}", file=sys.stderr, flush=True)


def _check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def _wanted_marker(peer: str) -> dict[str, Any]:
    """What the marker must say for a venv to be reusable: pins plus base interpreter."""
    return {
        "peer": peer,
        "pins": list(PINS[peer]),
        "python": sys.version.split()[0],
        "base_prefix": sys.base_prefix,
    }


def _read_marker(venv_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((venv_dir / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _create_venv(venv_dir: Path) -> None:
    """(Re)create the venv from scratch so packages from older pins cannot linger."""
    if venv_dir.exists():
        if not (venv_dir / "pyvenv.cfg").exists():
            raise RuntimeError(f"{venv_dir} exists but is not a venv; refusing to clear it")
        shutil.rmtree(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    _log(f"creating venv {venv_dir}")
    subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)


def _pip_install(python: Path, pins: tuple[str, ...]) -> None:
    _log(f"pip install {' '.join(pins)}")
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    # pip's own progress is useful but must not pollute our stdout (the CLI's JSON).
    subprocess.run([*cmd, *pins], check=True, stdout=sys.stderr)


def ensure_peer_env(peer: str, cache_dir: Path | None = None) -> Path:
    """Return the python of ``peer``'s venv, creating / reinstalling it if needed.

    The venv is ``<cache_dir>/<peer>`` (``cache_dir`` defaults to
    ``~/.cache/shoal-bench/venvs``). A marker file records the pin list; when the pins
    (or the base interpreter) change the venv is rebuilt from scratch.
    """
    _check_peer(peer)
    root = cache_dir or DEFAULT_CACHE_DIR
    venv_dir = root / peer
    python = _venv_python(venv_dir)
    wanted = _wanted_marker(peer)
    if python.exists() and _read_marker(venv_dir) == wanted:
        return python
    root.mkdir(parents=True, exist_ok=True)
    # Two harnesses building the same venv at once would trample each other's pip.
    with (root / f".{peer}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and _read_marker(venv_dir) == wanted:
            return python  # built by whoever held the lock before us
        _create_venv(venv_dir)
        _pip_install(python, PINS[peer])
        # Written last: an interrupted install leaves no marker and is redone next time.
        (venv_dir / MARKER_NAME).write_text(json.dumps(wanted, indent=2) + "\n")
    _log(f"{peer} venv ready")
    return python


def _session_pids(sid: int) -> list[int]:
    """Pids of live processes whose session id is ``sid``: the script and its workers.

    The peer script runs as a session leader and puts each worker in its own process
    group inside that session, so the session is the one handle that covers everything
    the run spawned, however deep. (The peer scripts themselves read /proc by hand:
    they run in the peers' venvs, which do not have psutil.)
    """
    pids: list[int] = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.status() != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
    return pids


def _kill_session(sid: int) -> None:
    for pid in _session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop_script(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the script (it then stops its workers and cleans keys), then SIGKILL all."""
    try:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate(timeout=TERM_GRACE_S)
    return out, err


def _parse_result(stdout: str) -> dict[str, Any] | None:
    """The script's result is the last non-empty stdout line."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None
    return None


def _script_cmd(python: Path, peer: str, redis_url: str, workload: str, n: int,
                workers: int, timeout: float, poll_ms: float,
                recovery_timeout: float) -> list[str]:  # fmt: skip
    script = SCRIPTS_DIR / f"{peer}_bench.py"
    # The script's own deadline is a bit shorter so it can report and clean up in time.
    inner_timeout = max(timeout - TERM_GRACE_S, timeout * 0.8)
    return [
        str(python), str(script),
        "--redis", redis_url, "--workload", workload, "-n", str(n),
        "--workers", str(workers), "--timeout", f"{inner_timeout:.1f}",
        "--poll-ms", str(poll_ms), "--recovery-timeout", str(recovery_timeout),
    ]  # fmt: skip


def _resolve_timeout(workload: str, timeout: float | None, recovery_timeout: float) -> float:
    """The harness deadline; for failover it must clearly exceed the recovery bound."""
    if workload != "failover":
        return DEFAULT_TIMEOUT_S if timeout is None else timeout
    if recovery_timeout <= 0:
        raise ValueError("recovery_timeout must be > 0")
    if timeout is None:
        return recovery_timeout + FAILOVER_TIMEOUT_MARGIN_S
    if timeout < recovery_timeout + FAILOVER_MIN_MARGIN_S:
        raise ValueError(
            f"timeout {timeout:.0f}s too short for failover: need at least recovery_timeout"
            f" + {FAILOVER_MIN_MARGIN_S:.0f}s = {recovery_timeout + FAILOVER_MIN_MARGIN_S:.0f}s"
        )
    return timeout


def run_peer(
    peer: str,
    redis_url: str,
    workload: str,
    n: int,
    workers: int = 1,
    timeout: float | None = None,
    cache_dir: Path | None = None,
    poll_ms: float = DEFAULT_POLL_MS,
    recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT_S,
) -> dict[str, Any]:
    """Run one peer benchmark and return the JSON dict its script printed.

    ``poll_ms`` is applied to every poll interval the peer exposes (arq's worker and
    result ``poll_delay``, taskiq's ``check_interval``, dramatiq's idle back-off cap,
    celery's ``get(interval=)``); the defaults (0.2-1 s) would measure sleeps. In
    "failover" it only reaches arq's ``poll_delay``: dramatiq's back-off cap also paces
    its dead-worker maintenance, so that workload leaves it at its default.

    ``timeout`` (the harness's hard deadline) defaults to 600 s, and for "failover" to
    ``recovery_timeout`` + 180 s; an explicit failover timeout below ``recovery_timeout``
    + 60 s is rejected. ``n`` is 100 in the standard failover run (at most 200, since
    the one worker runs with concurrency n); ``workers`` is ignored there (always one).

    Raises ``PeerRunError`` (with the script's error JSON in ``.result`` when there was
    one) on a non-zero exit, a timeout or unparsable output. Whatever happens, every
    process the run started is gone when this returns.
    """
    _check_peer(peer)
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {WORKLOADS}")
    timeout = _resolve_timeout(workload, timeout, recovery_timeout)
    python = ensure_peer_env(peer, cache_dir)
    cmd = _script_cmd(
        python, peer, redis_url, workload, n, workers, timeout, poll_ms, recovery_timeout
    )
    _log(f"running {peer} {workload} n={n} workers={workers}")
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        out, err = _stop_script(proc)
        timed_out = True
    except BaseException:
        _stop_script(proc)  # e.g. Ctrl-C: still let the script stop workers and clean keys
        raise
    finally:
        _kill_session(proc.pid)  # belt and braces: nothing of this run may outlive it
    if err.strip():
        sys.stderr.write(err if err.endswith("\n") else err + "\n")
    result = _parse_result(out)
    if timed_out:
        raise PeerRunError(f"{peer} {workload} timed out after {timeout:.0f}s", result)
    if proc.returncode != 0 or result is None or "error" in result:
        detail = (result or {}).get("error") or out.strip()[-2000:] or err.strip()[-2000:]
        raise PeerRunError(f"{peer} {workload} failed (rc={proc.returncode}): {detail}", result)
    result.setdefault("harness", {})["wall_seconds"] = round(time.monotonic() - started, 3)
    result["harness"]["pins"] = list(PINS[peer])
    return result


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--peer", choices=PEERS, required=True)
    p.add_argument("--redis", help="redis://host:port[/db] of the engine")
    p.add_argument("--workload", choices=WORKLOADS)
    p.add_argument("-n", type=int, default=None, help="tasks (default 20000 / 1000 / 100)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="hard deadline, s (default 600; failover: recovery timeout + 180)",
    )
    p.add_argument(
        "--recovery-timeout",
        type=float,
        default=DEFAULT_RECOVERY_TIMEOUT_S,
        help="failover: stop waiting this long after the kill",
    )
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--poll-ms", type=float, default=DEFAULT_POLL_MS, help="peer poll intervals")
    p.add_argument("--setup-only", action="store_true", help="only create the venv")
    args = p.parse_args(argv)
    if not args.setup_only and (args.redis is None or args.workload is None):
        p.error("--redis and --workload are required unless --setup-only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.setup_only:
        print(json.dumps({"peer": args.peer, "python": str(ensure_peer_env(args.peer))}))
        return 0
    n = args.n if args.n is not None else DEFAULT_N[args.workload]
    try:
        result = run_peer(
            args.peer, args.redis, args.workload, n, args.workers, args.timeout,
            cache_dir=args.cache_dir, poll_ms=args.poll_ms,
            recovery_timeout=args.recovery_timeout,
        )  # fmt: skip
    except PeerRunError as exc:
        print(json.dumps({**exc.result, "error": str(exc)}))
        return 1
    except ValueError as exc:  # bad arguments, e.g. a failover timeout below the bound
        print(json.dumps({"peer": args.peer, "workload": args.workload, "error": str(exc)}))
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
