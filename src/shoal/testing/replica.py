"""A real HTTP server that stands in for one replica of an external service.

Shoal's resilience toolkit (service registry, health probes, load balancing,
circuit breakers, retries) is only worth as much as its tests against real
sockets, real timeouts and real dead processes. This module is one replica of a
model server or a tool API, started as a child process on 127.0.0.1 and told at
runtime to fail, slow down, hang or die:

- ``GET /health`` is the probe path: it answers ``health_status`` and counts each
  probe by its ``User-Agent``, so a test can tell which prober probed it. It ignores
  ``latency``, ``hang`` and the failure rules, so that probes and traffic can
  disagree, as they do when a replica is up but its work fails.
- ``POST /_control`` changes the settings (see ``ReplicaSettings``), ``GET /_stats``
  reads the counters.
- Every other path and method echoes the request after ``latency`` (+ jitter),
  unless a failure rule applies. Whether a request fails, and its jitter, are drawn
  when it arrives, from RNGs seeded by ``--seed``: the same order of requests gives
  the same outcomes.

    with replicas(3, fail_rate=0.2) as (r1, r2, r3):
        r2.control(hang=True)
        ...
        r3.kill()

The harness owns every pid it starts and signals no other: ``stop()`` ends the
child, and a ``ReplicaProcess`` dropped without ``stop()`` still ends it when it is
collected or the interpreter exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from shoal.errors import ConfigurationError, ShoalError

__all__ = [
    # the server
    "ReplicaSettings",
    "check_settings",
    "create_app",
    "main",
    # the harness
    "ReplicaProcess",
    "replicas",
    "ReplicaError",
]

HOST = "127.0.0.1"
PROBE_PATH = "/health"
CONTROL_PATH = "/_control"
STATS_PATH = "/_stats"
START_TIMEOUT_S = 10.0  # until READY, for one replica or a whole group started together
STOP_TIMEOUT_S = 5.0  # the grace after SIGTERM before SIGKILL
CONTROL_TIMEOUT_S = 5.0  # a control or stats call (they never wait on latency or hang)
# The server's own bound on a graceful stop: hung requests are released when it
# begins, but a request sleeping a long latency is cancelled after this.
_GRACEFUL_S = 1
_BACKLOG = 128
# Starlette routes a function endpoint for GET only unless told; these are the rest.
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_STDERR_TAIL_LINES = 20
_READY = re.compile(rb"READY (\d+)\n")
_SRC = Path(__file__).resolve().parents[2]  # the directory that holds the shoal package


class ReplicaError(ShoalError):
    """A replica did not start, stop or answer its control API."""


# --- settings -------------------------------------------------------------------


@dataclass
class ReplicaSettings:
    """What a replica does with the next requests; every field is a key of
    ``POST /_control``."""

    latency: float = 0.0  # seconds before each answer
    jitter: float = 0.0  # plus uniform random seconds in [0, jitter]
    fail_next: int = 0  # the next N requests fail (counted down per request)
    fail_rate: float = 0.0  # each request fails with this probability
    fail_status: int = 500  # the status of a failure
    retry_after: float | None = None  # seconds, sent as Retry-After with each failure
    health_status: int = 200  # the status of GET /health
    hang: bool = False  # requests wait until hang is turned off (or the server stops)


_Rule = tuple[tuple[type, ...], Callable[[Any], bool], str]
_SECONDS: _Rule = ((int, float), lambda v: v >= 0, "a number of seconds >= 0")
_RULES: dict[str, _Rule] = {
    "latency": _SECONDS,
    "jitter": _SECONDS,
    "fail_next": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "fail_rate": ((int, float), lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "fail_status": ((int,), lambda v: 400 <= v <= 599, "an HTTP error status, 400 to 599"),
    "retry_after": ((int, float, type(None)), lambda v: v is None or v >= 0, "seconds or null"),
    "health_status": ((int,), lambda v: 200 <= v <= 599, "an HTTP status, 200 to 599"),
    "hang": ((bool,), lambda v: True, "true or false"),
    "reset_stats": ((bool,), lambda v: True, "true or false"),  # an action, not a setting
}


def check_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as a dict, if every key is a control key with a value it allows;
    otherwise ``ConfigurationError`` naming the key and what it takes. Both ends call
    it: the harness fails before it sends, the server answers 400 with the message."""
    for key, value in settings.items():
        if key not in _RULES:
            allowed = ", ".join(_RULES)
            raise ConfigurationError(f"unknown control key {key!r}; the keys are: {allowed}")
        types, allows, meaning = _RULES[key]
        typed = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        finite = not isinstance(value, float) or math.isfinite(value)
        if not (typed and finite and allows(value)):
            raise ConfigurationError(f"{key!r} must be {meaning}, not {value!r}")
    return dict(settings)


def _seconds_header(seconds: float) -> str:
    """Retry-After as an integer when whole (what servers send), else as given."""
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


# --- the server -----------------------------------------------------------------


@dataclass
class _Stats:
    """What GET /_stats answers. A request's ``n`` is ``requests`` once it is
    counted, so after a reset the numbering starts again at 1."""

    requests: int = 0  # requests served, not probes, control or stats
    failures: int = 0  # failures answered
    probes: int = 0
    probe_agents: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    started_at: float = field(default_factory=time.time)

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` is a state, not a counter, and stays."""
        self.requests = self.failures = self.probes = 0
        self.probe_agents = {}
        self.max_in_flight = self.in_flight


class _Replica:
    """The state of one replica, and its endpoints."""

    def __init__(self, name: str, settings: ReplicaSettings, seed: int) -> None:
        self.name = name
        self.settings = settings
        self.stats = _Stats()
        # Two streams, so that turning jitter on does not shift which requests fail.
        self._fail_rng = random.Random(f"fail-{seed}")
        self._jitter_rng = random.Random(f"jitter-{seed}")
        self._released = asyncio.Event()  # set whenever requests must not hang
        self._stopping = False
        self.configure({})

    def configure(self, changes: Mapping[str, Any]) -> None:
        for key, value in changes.items():
            setattr(self.settings, key, value)
        if self.settings.hang and not self._stopping:
            self._released.clear()
        else:
            self._released.set()

    def release(self) -> None:
        """The server stops: hung requests answer, and no new one hangs."""
        self._stopping = True
        self._released.set()

    async def probe(self, request: Request) -> Response:
        agent = request.headers.get("user-agent", "")
        self.stats.probes += 1
        self.stats.probe_agents[agent] = self.stats.probe_agents.get(agent, 0) + 1
        return JSONResponse({"replica": self.name}, status_code=self.settings.health_status)

    async def control(self, request: Request) -> Response:
        try:
            changes = check_settings(_settings_object(await request.body()))
        except ConfigurationError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if changes.pop("reset_stats", False):
            self.stats.reset()
        self.configure(changes)
        return JSONResponse(asdict(self.settings))

    async def read_stats(self, request: Request) -> Response:
        return JSONResponse(asdict(self.stats))

    async def serve(self, request: Request) -> Response:
        if request.url.path in (CONTROL_PATH, STATS_PATH):  # only the wrong method gets here
            return PlainTextResponse("Method Not Allowed", status_code=405)
        n, failure, delay = self._arrive()
        try:
            body = await _json_or_none(request)
            await self._released.wait()
            await asyncio.sleep(delay)
        finally:
            self.stats.in_flight -= 1
        if failure is not None:
            return self._failure(failure, n)
        echo = {"method": request.method, "path": request.url.path, "body": body, "n": n}
        return JSONResponse({"replica": self.name, **echo})

    def _arrive(self) -> tuple[int, int | None, float]:
        """Count a new request and draw its fate, before any await: ``n``, the
        failure status or None, and its delay."""
        stats, settings = self.stats, self.settings
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        failure = None
        if settings.fail_next > 0:
            settings.fail_next -= 1
            failure = settings.fail_status
        elif settings.fail_rate > 0 and self._fail_rng.random() < settings.fail_rate:
            failure = settings.fail_status
        jitter = self._jitter_rng.uniform(0, settings.jitter) if settings.jitter > 0 else 0.0
        return stats.requests, failure, settings.latency + jitter

    def _failure(self, status: int, n: int) -> Response:
        self.stats.failures += 1
        headers = {}
        if self.settings.retry_after is not None:
            headers["Retry-After"] = _seconds_header(self.settings.retry_after)
        content = {"replica": self.name, "error": "injected failure", "n": n}
        return JSONResponse(content, status_code=status, headers=headers)


def _settings_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise ConfigurationError('the body must be a JSON object, like {"fail_next": 2}')
    return payload


async def _json_or_none(request: Request) -> Any:
    """The JSON body, or None when the body is empty or not JSON (an echo, not a judge)."""
    body = await request.body()
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def create_app(name: str, settings: ReplicaSettings | None = None, seed: int = 0) -> Starlette:
    """The ASGI app of one replica (``main`` serves it; usable in-process too)."""
    return _app(_Replica(name, settings or ReplicaSettings(), seed))


def _app(replica: _Replica) -> Starlette:
    return Starlette(
        routes=[
            Route(PROBE_PATH, replica.probe, methods=["GET"]),
            Route(CONTROL_PATH, replica.control, methods=["POST"]),
            Route(STATS_PATH, replica.read_stats, methods=["GET"]),
            Route("/{path:path}", replica.serve, methods=_METHODS),
        ]
    )


class _Server(uvicorn.Server):
    """uvicorn's server, which says READY once it serves and releases hung requests
    when it stops (its graceful stop waits for every request to answer)."""

    def __init__(self, config: uvicorn.Config, replica: _Replica) -> None:
        super().__init__(config)
        self._replica = replica

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._replica.release()
        await super().shutdown(sockets)


def _listen(port: int) -> socket.socket:
    """A listening socket on 127.0.0.1 (port 0: a free one), bound here so that the
    port is known before serving. SO_REUSEADDR lets a replica that was killed come
    back on its port while old connections linger in TIME_WAIT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.testing.replica",
        description="One replica of a fake external service, for tests and benchmarks. "
        "Prints 'READY <port>' once it serves; stops on SIGTERM or SIGINT.",
    )
    parser.add_argument("--name", required=True, help="the replica's name, in every answer")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of failures and jitter")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_settings({"latency": args.latency})
        sock = _listen(args.port)
    except (ConfigurationError, OSError) as exc:
        parser.exit(2, f"replica {args.name}: {exc}\n")
    replica = _Replica(args.name, ReplicaSettings(latency=args.latency), args.seed)
    config = uvicorn.Config(
        _app(replica),
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_S,
    )
    try:
        _Server(config, replica).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn raises the SIGINT it handled again once stopped
        raise SystemExit(128 + signal.SIGINT) from None


# --- the harness ----------------------------------------------------------------


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the running processes together, SIGKILL whatever still runs after
    ``grace`` seconds; each is reaped. Popen signals only a child it has not reaped,
    so a recycled pid is never hit."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
        proc.send_signal(signal.SIGCONT)  # a paused replica must run to exit
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.status_code == 400:
        raise ConfigurationError(response.json()["error"])
    if response.status_code != 200:
        raise ReplicaError(f"{response.request.url} answered {response.status_code}")
    answer: dict[str, Any] = response.json()
    return answer


class ReplicaProcess:
    """One replica server as a child process of this one.

    ``start()`` waits for its READY line; after ``kill()`` or ``stop()``, ``start()``
    brings it back on the same port (a replica that restarts). The child runs this
    interpreter with this checkout's ``src`` first on PYTHONPATH, so it serves the
    same code as the test that started it.
    """

    def __init__(
        self,
        name: str,
        *,
        port: int = 0,
        latency: float = 0.0,
        seed: int = 0,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        check_settings({"latency": latency})
        self.name = name
        self.start_timeout = start_timeout
        self._port = port
        self._args = ["--name", name, "--latency", str(latency), "--seed", str(seed)]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        # Ends the child even if the owner never calls stop() (or the interpreter exits).
        self._finalizer = weakref.finalize(self, _terminate, self._procs)

    def __repr__(self) -> str:
        return f"ReplicaProcess({self.name!r}, port={self._port}, alive={self.alive})"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise ReplicaError(f"replica {self.name} was never started: it has no port yet")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def _process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ReplicaError(f"replica {self.name} was never started")
        return self._proc

    def start(self) -> Self:
        """Start the server and wait (bounded) for its READY line."""
        self._spawn()
        self._await_ready(time.monotonic() + self.start_timeout)
        return self

    def stop(self, grace: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; reaped either way."""
        _terminate(self._procs, grace)
        self._procs.clear()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def kill(self) -> None:
        """The replica dies: SIGKILL, reaped. Its port refuses connections."""
        proc = self._process
        proc.kill()
        proc.wait(STOP_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: the replica freezes whole, probes included; the kernel still
        accepts connections, so clients see timeouts, not refusals."""
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._process.send_signal(signal.SIGCONT)

    def control(self, **settings: Any) -> dict[str, Any]:
        """Change settings (see ``ReplicaSettings``; ``reset_stats=True`` zeroes the
        counters); returns all current settings."""
        check_settings(settings)
        try:
            with httpx.Client(timeout=CONTROL_TIMEOUT_S, trust_env=False) as client:
                return _answer(client.post(self.url + CONTROL_PATH, json=settings))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def stats(self) -> dict[str, Any]:
        try:
            with httpx.Client(timeout=CONTROL_TIMEOUT_S, trust_env=False) as client:
                return _answer(client.get(self.url + STATS_PATH))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def acontrol(self, **settings: Any) -> dict[str, Any]:
        check_settings(settings)
        try:
            async with httpx.AsyncClient(timeout=CONTROL_TIMEOUT_S, trust_env=False) as client:
                return _answer(await client.post(self.url + CONTROL_PATH, json=settings))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    async def astats(self) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=CONTROL_TIMEOUT_S, trust_env=False) as client:
                return _answer(await client.get(self.url + STATS_PATH))
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.HTTPError) -> ReplicaError:
        state = "running" if self.alive else "not running"
        return ReplicaError(f"replica {self.name} at {self.url} ({state}): {exc!r}")

    def _spawn(self) -> None:
        if self.alive:
            raise ReplicaError(f"replica {self.name} is running: stop or kill it first")
        if self._stderr is not None:
            self._stderr.close()
        # A file, not a pipe: nobody reads it until something fails, and a file never fills.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        pythonpath = os.pathsep.join(filter(None, [str(_SRC), os.environ.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.testing.replica", *self._args, "--port", str(self._port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )
        self._procs.append(self._proc)

    def _await_ready(self, deadline: float) -> None:
        """Read the READY line; if it does not come in time, end the child and raise
        quoting its stderr."""
        proc = self._process
        try:
            line = _read_line(proc, deadline)
        except BaseException:
            self.stop()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
        ready = _READY.fullmatch(line)
        if ready is None:
            _terminate([proc])
            tail = self._stderr_tail()
            self.stop()
            raise ReplicaError(
                f"replica {self.name} did not say READY within {self.start_timeout}s "
                f"(exit code {proc.returncode}, stdout {line!r}); its stderr ends:\n{tail}"
            )
        self._port = int(ready.group(1))

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-_STDERR_TAIL_LINES:])


def _read_line(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    """The child's first line of stdout, or what it wrote before it closed stdout or
    the deadline passed (``select``, as a pipe read has no timeout)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:  # the child closed stdout: it has exited
            break
        data += chunk
    return data


@contextmanager
def replicas(
    n: int, names: Sequence[str] | None = None, *, seed: int = 0, **settings: Any
) -> Iterator[list[ReplicaProcess]]:
    """``n`` replicas (named ``names``, else r1..rn), started together, each with
    ``settings`` applied; all stopped on exit. Replica i gets seed ``seed + i``, so
    replicas with a ``fail_rate`` do not fail the same requests in lockstep."""
    names = list(names) if names is not None else [f"r{i + 1}" for i in range(n)]
    if len(names) != n:
        raise ConfigurationError(f"replicas({n}) got {len(names)} names: {names}")
    check_settings(settings)
    group = [ReplicaProcess(name, seed=seed + i) for i, name in enumerate(names)]
    try:
        for replica in group:
            replica._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        for replica in group:
            replica._await_ready(deadline)
            if settings:
                replica.control(**settings)
        yield group
    finally:
        _terminate([proc for replica in group for proc in replica._procs])
        for replica in group:
            replica.stop()  # all ended above; this clears them


if __name__ == "__main__":
    main()
