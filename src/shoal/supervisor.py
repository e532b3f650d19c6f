"""``shoal up``: an engine, a gateway and N nodes on this machine, kept running.

The supervisor owns every process it starts: each child is a ``shoal node`` or
``shoal gateway`` process writing its log to a file; a child that dies unasked is
started again after a back-off that doubles while it keeps failing (reset once it
has run for ``STABLE_AFTER_S``), and each restart is logged. Stopping sends SIGTERM
(children drain), waits their grace, then SIGKILLs what is left, and stops the
embedded engine if this supervisor started it. On Linux each child also gets
SIGTERM from the kernel if the supervisor itself dies (``PR_SET_PDEATHSIG``), so
even a SIGKILLed supervisor leaves no orphans behind.

Why not supervisord, honcho or circus: they would be one more daemon with its own
config and process model to install and learn, for the ~200 lines below; and the
supervisor must know Shoal's readiness (nodes registered, gateway ready) and drain
grace, which they cannot.

The state of a running cluster is ``<data dir>/up/state.json`` (pids, URLs, log
files), read by ``shoal down``, ``shoal logs`` and ``shoal up --detach``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from shoal.addresses import mask_url
from shoal.app import load_agents
from shoal.client import Client
from shoal.engine import EmbeddedEngine
from shoal.errors import ConfigurationError, ShoalError
from shoal.settings import Settings, validate_namespace

log = logging.getLogger("shoal.up")

STATE_DIR = "up"
STATE_FILE = "state.json"
LOG_DIR = "logs"
SUPERVISOR_LOG = "supervisor.log"
GATEWAY = "gateway"
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0  # a child up this long has its back-off reset
STOP_MARGIN_S = 10.0  # beyond the nodes' grace, before SIGKILL
READY_TIMEOUT_S = 60.0
POLL_S = 0.2  # how often children are checked (and log files read)
_PR_SET_PDEATHSIG = 1


class ClusterFailed(ShoalError):
    """A child could not be started (its log says why)."""


@dataclass(frozen=True)
class ClusterSpec:
    """What ``shoal up`` runs; every field is a flag of it (and a shoal.toml key)."""

    app: str = "shoal.examples"
    nodes: int = 2
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port
    gateway: bool = True
    insecure: bool = False
    grace: float = 30.0
    redis: str | None = None
    namespace: str = "default"
    data_dir: Path = Path(".shoal")
    log_level: str | None = None
    node_args: tuple[str, ...] = ()  # extra `shoal node` flags (the demo's)
    restart: bool = True
    run_name: str = STATE_DIR  # the state directory under data_dir: "up", or "demo"

    def __post_init__(self) -> None:
        if self.nodes < 0:
            raise ConfigurationError(f"nodes must be >= 0, got {self.nodes}")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port must be within 0..65535, got {self.port}")
        if self.grace < 0:
            raise ConfigurationError(f"grace must be >= 0 seconds, got {self.grace}")
        validate_namespace(self.namespace)

    @property
    def state_dir(self) -> Path:
        return self.data_dir / self.run_name


@dataclass
class ChildState:
    """A child as the state file records it."""

    name: str
    pid: int
    log: str
    restarts: int = 0


@dataclass
class ClusterState:
    """``state.json``: enough for ``shoal down``/``logs`` in another process."""

    pid: int
    namespace: str
    engine: str  # masked URL
    embedded: bool
    gateway_url: str | None
    app: str
    started_at: float
    grace: float = 30.0
    ready: bool = False
    children: list[ChildState] = field(default_factory=list)

    @classmethod
    def read(cls, state_dir: Path) -> ClusterState | None:
        """The recorded cluster if its supervisor still runs (a stale file is ignored)."""
        try:
            data = json.loads((state_dir / STATE_FILE).read_text())
            state = cls(**{**data, "children": [ChildState(**c) for c in data["children"]]})
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return state if pid_alive(state.pid) else None

    def write(self, state_dir: Path) -> None:
        tmp = state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / STATE_FILE)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Child:
    """One supervised process: how to start it, and its restart bookkeeping."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name, self.argv, self.log_path, self.env = name, argv, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.failures = 0  # consecutive short lives: the back-off grows with them
        self.started_at = 0.0
        self.restart_at: float | None = None
        self.ready = False
        self.keep_down = False  # stopped or killed on purpose: not restarted

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def exited(self) -> int | None:
        """Its exit code if it has ended (reaped), else None."""
        return self.proc.poll() if self.proc is not None else None

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def backoff(self) -> float:
        """Seconds to wait before the next start: 0.5, 1, 2 … 30 while it keeps dying."""
        lived = time.monotonic() - self.started_at
        self.failures = 1 if lived >= STABLE_AFTER_S else self.failures + 1
        return float(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self.failures - 1)))

    def tail(self, lines: int = 15) -> str:
        return "\n".join(read_tail(self.log_path, lines))


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the supervisor dies.

    Linux sends it when the *thread* that started the child ends, so children are
    started from the main thread (``shoal up`` and ``shoal demo`` do); and this runs
    between fork and exec, so it only calls prctl (no locks, no allocation to speak of).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def read_tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a log file (reads only its end)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines else []


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_port_free(host: str, port: int) -> None:
    """Fail at once, clearly, rather than with a gateway that crash-loops."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the gateway on {host}:{port}: {exc.strerror or exc}; "
                "pick another with --port (0: any free port)"
            ) from None


class Supervisor:
    """Starts the cluster of a ``ClusterSpec``, keeps it running, stops it.

    ``say`` receives one line per event worth telling the user (started, restarted,
    stopping); the same lines go to the ``shoal.up`` log.
    """

    def __init__(self, spec: ClusterSpec, say: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        self._say = say or (lambda line: None)
        self.children: dict[str, Child] = {}
        self.engine_url = ""
        self.gateway_url: str | None = None
        self._own_engine: EmbeddedEngine | None = None
        self.state: ClusterState | None = None
        self._agent_types: set[str] = set()  # the app's, whose partitions must spread

    def log_files(self) -> dict[str, Path]:
        """Each child's log file, known before the children start."""
        names = ([GATEWAY] if self.spec.gateway else []) + [
            f"node-{i}" for i in range(1, self.spec.nodes + 1)
        ]
        return {name: self.spec.state_dir / LOG_DIR / f"{name}.log" for name in names}

    def tell(self, line: str) -> None:
        log.info("%s", line)
        self._say(line)

    @property
    def settings(self) -> Settings:
        return Settings(url=self.engine_url, namespace=self.spec.namespace)

    # --- start ------------------------------------------------------------------------

    def start(self) -> ClusterState:
        """Engine, children, and a wait until every node is registered and the gateway
        ready. A child that dies before it is ready stops everything with its log."""
        spec = self.spec
        spec.state_dir.mkdir(parents=True, exist_ok=True)
        (spec.state_dir / LOG_DIR).mkdir(exist_ok=True)
        running = ClusterState.read(spec.state_dir)
        if running is not None and running.pid != os.getpid():
            stop = "shoal down" if spec.run_name == STATE_DIR else f"kill {running.pid}"
            raise ConfigurationError(
                f"a cluster is already running from {spec.state_dir} (supervisor pid "
                f"{running.pid}, namespace {running.namespace!r}); stop it with: {stop}"
            )
        self._agent_types = {a.agent_type for a in load_agents(spec.app) if a.is_addressable()}
        port = self._gateway_port()
        self._start_engine()
        try:
            self._spawn_children(port)
            self.state = self._record()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.state.ready = True
        self._write_state()
        return self.state

    def _gateway_port(self) -> int:
        if not self.spec.gateway:
            return 0
        if self.spec.port == 0:
            return free_port(self.spec.host)
        check_port_free(self.spec.host, self.spec.port)
        return self.spec.port

    def _start_engine(self) -> None:
        if self.spec.redis:
            self.engine_url = self.spec.redis
            return
        engine = EmbeddedEngine(self.spec.data_dir)
        already = engine.running()
        self.engine_url = (already or engine.ensure()).url
        if already is None:
            self._own_engine = engine
            self.tell(f"started the embedded engine ({mask_url(self.engine_url)})")

    def _spawn_children(self, port: int) -> None:
        spec, env = self.spec, self._child_env()
        for path in self.log_files().values():  # bounded: this run's, and the last one's
            if path.exists():
                path.replace(path.with_name(path.name + ".1"))
        shoal = [sys.executable, "-m", "shoal.cli"]
        for name, log_path in self.log_files().items():
            if name == GATEWAY:
                argv = [*shoal, "gateway", "--host", spec.host, "--port", str(port)]
                argv += ["--insecure"] if spec.insecure else []
                self.gateway_url = f"http://{_url_host(spec.host)}:{port}"
            else:
                argv = [*shoal, "node", "--app", spec.app, "--name", name]
                argv += ["--grace", str(spec.grace), "--metrics-port", "0", *spec.node_args]
            self.children[name] = Child(name, argv, log_path, env)
        for child in self.children.values():
            child.start()

    def _child_env(self) -> dict[str, str]:
        """Children find the engine by URL (not each by the data dir), and log as
        text unless the user asked for JSON."""
        env = {**os.environ, "SHOAL_REDIS_URL": self.engine_url}
        env["SHOAL_NAMESPACE"] = self.spec.namespace
        env.setdefault("SHOAL_LOG_FORMAT", "text")
        if self.spec.log_level:
            env["SHOAL_LOG_LEVEL"] = self.spec.log_level
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the file as they are written
        return env

    def _record(self) -> ClusterState:
        state = ClusterState(
            pid=os.getpid(), namespace=self.spec.namespace, engine=mask_url(self.engine_url),
            embedded=not self.spec.redis, gateway_url=self.gateway_url, app=self.spec.app,
            started_at=time.time(), grace=self.spec.grace,
        )  # fmt: skip
        self.state = state
        self._write_state()
        return state

    def _write_state(self) -> None:
        if self.state is None:
            return
        self.state.children = [
            ChildState(c.name, c.pid, str(c.log_path), c.restarts) for c in self.children.values()
        ]
        self.state.write(self.spec.state_dir)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not asyncio.run(self._all_ready()):
            for child in self.children.values():
                code = child.exited()
                if code is not None:
                    raise ClusterFailed(
                        f"{child.name} exited with code {code} while starting; "
                        f"the end of {child.log_path}:\n{child.tail()}"
                    )
            if time.monotonic() > deadline:
                late = ", ".join(c.name for c in self.children.values() if not c.ready)
                raise ClusterFailed(f"not ready within {READY_TIMEOUT_S:.0f}s: {late}")
            time.sleep(POLL_S)  # children start in their own time; look again

    async def _all_ready(self) -> bool:
        names = [n for n in self.children if n != GATEWAY]
        async with Client(settings=self.settings) as client:
            state = await client.cluster()
        alive = {n.id for n in state.nodes if n.state == "alive"}
        # Agent partitions spread: a node that joins a moment after another takes over
        # its share a lease round later; ready means work would spread over all. (Only
        # the app's types: the namespace may remember others, hosted by no one now.)
        settled = all(
            t.unowned == 0 and set(names) <= {n for n, count in t.owners.items() if count}
            for t in state.agent_types
            if t.name in self._agent_types
        )
        for name in names:
            self.children[name].ready = name in alive and settled
        if GATEWAY in self.children:
            self.children[GATEWAY].ready = await _http_ok(f"{self.gateway_url}/readyz")
        return all(c.ready for c in self.children.values())

    # --- keep running ---------------------------------------------------------------

    def poll(self) -> None:
        """Restart what died unasked, once its back-off has passed. Call often."""
        changed = False
        now = time.monotonic()
        for child in self.children.values():
            if child.keep_down:
                continue
            code = child.exited()
            if code is not None and child.restart_at is None:
                if not self.spec.restart:
                    child.keep_down = True
                    self.tell(f"{child.name} (pid {child.pid}) exited with code {code}")
                    continue
                delay = child.backoff()
                child.restart_at = now + delay
                self.tell(
                    f"{child.name} (pid {child.pid}) exited with code {code}; "
                    f"restarting in {delay:.1f}s"
                )
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                child.start()
                changed = True
                self.tell(f"{child.name} restarted (pid {child.pid}, restart {child.restarts})")
        if changed:
            self._write_state()

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Signal one child on purpose (it is not restarted); its pid."""
        child = self.children[name]
        child.keep_down = True
        pid = child.pid
        child.signal(sig)
        return pid

    # --- stop -------------------------------------------------------------------------

    def stop(self, force: bool = False) -> None:
        """SIGTERM every child (nodes drain), SIGKILL what outlives the grace, stop the
        engine if we started it, remove the state file. ``force``: SIGKILL at once."""
        children = list(self.children.values())
        for child in children:
            child.keep_down = True
            child.signal(signal.SIGKILL if force else signal.SIGTERM)
        deadline = time.monotonic() + self.spec.grace + STOP_MARGIN_S
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.tell(f"{child.name} did not stop within its grace: killing it")
                child.proc.kill()
                child.proc.wait()
        if self._own_engine is not None:
            self._own_engine.stop()
            self.tell("stopped the embedded engine")
            self._own_engine = None
        with contextlib.suppress(OSError):
            if self.state is not None:
                (self.spec.state_dir / STATE_FILE).unlink()


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


async def _http_ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2) as http:
            return (await http.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


def describe(state: ClusterState, data_dir: Path) -> dict[str, Any]:
    """What ``shoal up`` prints once it is up (and ``shoal up --detach`` too)."""
    return {
        "dashboard": f"{state.gateway_url}/" if state.gateway_url else None,
        "api": f"{state.gateway_url}/docs" if state.gateway_url else None,
        "engine": state.engine + (f" (embedded, data in {data_dir})" if state.embedded else ""),
        "namespace": state.namespace,
        "nodes": [c.name for c in state.children if c.name != GATEWAY],
        "logs": str(data_dir / STATE_DIR / LOG_DIR),
    }
