"""Local Valkey topologies, a Cluster or a Sentinel group, for tests and benchmarks.

Every server is a child ``valkey-server`` process of the harness (never daemonized),
so the harness owns every pid: ``stop()`` ends exactly the processes it started, a
start that fails half way stops what it had started before raising, and a harness
dropped without ``stop()`` still ends its servers when it is collected or the
interpreter exits. Each server runs in its own directory under ``base_dir`` and
logs to ``valkey.log`` there; errors quote the tail of the logs.

The cluster is formed with plain commands (CLUSTER MEET, ADDSLOTSRANGE, REPLICATE)
rather than ``valkey-cli``, so the server binary is all that is needed. Readiness
is polled: a cluster or a Sentinel group converges by gossip between servers, and
nothing announces that it has.

    with LocalCluster(n_primaries=3, base_dir=tmp_path) as cluster:
        settings = Settings(url=cluster.url)
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shoal.engine import find_server_binary
from shoal.errors import ConfigurationError, EngineUnavailable

__all__ = ["LocalCluster", "LocalSentinelGroup", "Server", "TopologyError", "ServerExited"]

HOST = "127.0.0.1"
SLOTS = 16384
START_TIMEOUT_S = 20.0  # servers started and converged, for a whole topology
STOP_TIMEOUT_S = 5.0  # the grace after SIGTERM before SIGKILL
FAILOVER_TIMEOUT_S = 30.0
NODE_TIMEOUT_MS = 2000  # cluster: a node silent this long is suspected failed
# Sentinel: a primary silent this long is subjectively down. Not 1000, Sentinel's
# own ping period: then a Sentinel that has just switched to a new primary now and
# then marks it down a second later and fails over again (2 of 11 failovers in our
# runs, 0 of 8 with 2000), which costs ~10 s and breaks writes meanwhile.
DOWN_AFTER_MS = 2000
LOG_FILE = "valkey.log"
_POLL_S = 0.05
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 8
_SERVICE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_EXITING_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})

SlotMap = tuple[tuple[int, int, str, tuple[str, ...]], ...]  # (first, last, primary, replicas)


class TopologyError(EngineUnavailable):
    """A local topology did not start, converge or stop within its bound."""


class ServerExited(TopologyError):
    """A server exited while the harness waited for it to come up (the message
    quotes the end of its log)."""


class _PortTaken(Exception):
    """The server lost the race for its free port (another process bound it first)."""


@dataclass(eq=False)
class Server:
    """One ``valkey-server`` child process, and how to start it again.

    ``args`` are kept so that a restart brings back the same server: same port,
    same directory and, in a cluster, the same nodes.conf, hence the same node id.
    """

    port: int
    directory: Path
    args: list[str]
    bus_port: int = 0  # cluster nodes only
    node_id: str = ""  # cluster nodes only
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_offset: int = field(default=0, repr=False)  # where the latest start's log begins

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise TopologyError(f"the server on port {self.port} was never started")
        return self.proc

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> Path:
        return self.directory / LOG_FILE


# --- processes, ports, admin commands -------------------------------------------


def _free_port(claimed: set[int]) -> int:
    """A port nothing listens on right now and not yet in ``claimed`` (to which it is
    added). Another process may still bind it before our server does: callers then
    start the server again on another port."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in claimed:
            claimed.add(port)
            return port


def _terminate(procs: list[subprocess.Popen[bytes]], grace: float = STOP_TIMEOUT_S) -> None:
    """End the processes: SIGTERM (plus SIGCONT, in case one was paused with SIGSTOP),
    then SIGKILL whatever still runs after ``grace`` seconds. Each is waited for, so
    none is left behind as an orphan or a zombie."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.terminate()
        proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def _client(port: int, password: str | None) -> redis.Redis:
    """A short-lived admin connection. No retries and short timeouts: polling a
    server that is dead or not up yet must fail at once, not back off for seconds."""
    return redis.Redis(
        host=HOST,
        port=port,
        password=password,
        decode_responses=True,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),
    )


def _command(port: int, password: str | None, *args: str | int) -> Any:
    with _client(port, password) as client:
        return client.execute_command(*args)


def _wait_for(problem: Callable[[], str | None], deadline: float, what: str) -> None:
    """Poll until ``problem()`` finds nothing wrong (returns None); past the deadline,
    raise saying the last thing that was wrong. Engine errors count as problems: a
    server that is restarting or not up yet refuses connections for a while."""
    while True:
        try:
            found = problem()
        except redis.RedisError as exc:
            found = f"{type(exc).__name__}: {exc}"
        if found is None:
            return
        if time.monotonic() > deadline:
            raise TopologyError(f"timed out waiting for {what}; last problem: {found}")
        time.sleep(_POLL_S)


def _ping_problem(server: Server, password: str | None) -> str | None:
    code = server.process.poll()
    if code is not None:
        if "Address already in use" in _log_tail(server, lines=None):
            raise _PortTaken
        raise ServerExited(
            f"valkey-server on port {server.port} exited (code {code}); "
            f"{server.log} ends:\n{_log_tail(server, lines=3 * _LOG_TAIL_LINES)}"
        )
    try:
        with _client(server.port, password) as client:
            client.ping()
    except redis.AuthenticationError as exc:
        raise TopologyError(f"valkey-server on port {server.port}: {exc}") from None
    return None


def _log_tail(server: Server, lines: int | None = _LOG_TAIL_LINES) -> str:
    """What the server logged since its latest start (the last ``lines`` lines)."""
    try:
        with server.log.open("rb") as log:
            log.seek(server.log_offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:] if lines else text.splitlines())


def _log_tails(servers: list[Server]) -> str:
    return "\n".join(f"--- {server.log}:\n{_log_tail(server)}" for server in servers)


def _pairs(reply: Any) -> dict[str, Any]:
    """A Sentinel reply as a dict: RESP3 sends a map, RESP2 a flat key/value list."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _config_quote(value: str) -> str:
    """``value`` as one argument of a Valkey config file line."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- what both topologies share -------------------------------------------------


class _Topology:
    """Child processes, their clean-up, and starting a server on a free port."""

    def __init__(self, base_dir: Path, password: str | None) -> None:
        self.base_dir = Path(base_dir)
        self.password = password
        self._binary = find_server_binary()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._claimed: set[int] = set()  # ports handed to our servers (no two get one)
        self._spawned: list[Server] = []  # every server started, for the logs of a failure
        # Ends the servers even if the owner never calls stop() (or the interpreter exits).
        self._finalizer = weakref.finalize(self, _terminate, self._procs)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Start every server and wait (bounded) until the topology has converged.
        On any failure, stop whatever was started, then raise."""
        if self._procs:
            raise TopologyError("this topology is already started")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(time.monotonic() + START_TIMEOUT_S)
        except ServerExited:
            self.stop()
            raise
        except TopologyError as exc:
            tails = _log_tails(self._spawned)  # before stop() logs the shutdown
            self.stop()
            raise TopologyError(f"{exc}\n{tails}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """End every server this harness started (SIGTERM, then SIGKILL after a grace)."""
        _terminate(self._procs)
        self._procs.clear()

    def kill(self, port: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send ``sig`` to the server on ``port``. For a signal that ends it, wait
        (bounded) until it has exited, so that its port is free for a restart."""
        proc = self._server(port).process
        proc.send_signal(sig)
        if sig in _EXITING_SIGNALS:
            proc.wait(STOP_TIMEOUT_S)

    def node_url(self, port: int) -> str:
        """A plain URL of one data server (not through the cluster or the sentinels)."""
        return f"redis://{self._auth()}{HOST}:{port}/0"

    def _auth(self) -> str:
        return f":{quote(self.password, safe='')}@" if self.password else ""

    def _start(self, deadline: float) -> None:
        raise NotImplementedError

    def _servers(self) -> list[Server]:
        raise NotImplementedError

    def _server(self, port: int) -> Server:
        for server in self._servers():
            if server.port == port:
                return server
        raise TopologyError(f"no server of this topology listens on port {port}")

    def _data_args(self, port: int, directory: Path) -> list[str]:
        """Arguments every data server takes: no persistence, and replication tuned
        for a quick start. Without a diskless-sync delay a replica's first sync does
        not wait 5 s; with a primary pinging its replicas every second, not every 10,
        an idle replica's offset leaves 0 at once (a cluster lists a replica in
        CLUSTER SLOTS / SHARDS only once its offset is above 0)."""
        args = ["--port", str(port), "--bind", HOST, "--daemonize", "no"]
        args += ["--dir", str(directory), "--appendonly", "no", "--save", ""]
        args += ["--repl-diskless-sync-delay", "0", "--repl-ping-replica-period", "1"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        return args

    def _launch(
        self, plans: list[Callable[[int], Server]], deadline: float, password: str | None
    ) -> list[Server]:
        """Start new servers on free ports: all at once, then wait for each (a server
        takes ~0.1 s to come up, and a cluster's primaries wait 2 s from their start
        before saying ok, so starting them together saves both)."""
        servers = [self._spawn(plan(_free_port(self._claimed))) for plan in plans]
        return [
            self._await_moving(server, plan, deadline, password)
            for server, plan in zip(servers, plans, strict=True)
        ]

    def _await_moving(
        self,
        server: Server,
        plan: Callable[[int], Server],
        deadline: float,
        password: str | None,
    ) -> Server:
        """Wait for a new server; if another process took its port between our probe
        and its bind, start it again on another port."""
        for attempt in range(_PORT_ATTEMPTS):
            if attempt:
                server = self._spawn(plan(_free_port(self._claimed)))
            try:
                self._await(server, deadline, password)
            except _PortTaken:
                continue
            return server
        raise TopologyError(f"no free port for a valkey-server after {_PORT_ATTEMPTS} tries")

    def _relaunch(self, server: Server, deadline: float, password: str | None) -> None:
        """Start a stopped server again, on its own port."""
        if server.alive:
            raise TopologyError(f"the server on port {server.port} is running: kill it first")
        try:
            self._await(self._spawn(server), deadline, password)
        except _PortTaken:
            raise TopologyError(
                f"port {server.port} was taken by another process while its server was down"
            ) from None

    def _spawn(self, server: Server) -> Server:
        server.directory.mkdir(parents=True, exist_ok=True)
        server.log_offset = server.log.stat().st_size if server.log.exists() else 0
        with server.log.open("ab") as log:
            server.proc = subprocess.Popen(
                [self._binary, *server.args],
                cwd=server.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._procs.append(server.proc)
        if server not in self._spawned:
            self._spawned.append(server)
        return server

    def _await(self, server: Server, deadline: float, password: str | None) -> None:
        """Wait until the server answers; if it does not, end it and raise."""
        try:
            what = f"valkey-server on port {server.port} to answer PING"
            _wait_for(partial(_ping_problem, server, password), deadline, what)
        except BaseException:
            _terminate([server.process])
            raise


# --- Cluster ----------------------------------------------------------------------


class LocalCluster(_Topology):
    """A Valkey Cluster on 127.0.0.1: ``n_primaries`` primaries with
    ``replicas_per_primary`` replicas each, the 16384 slots split evenly.

    ``primaries`` and ``replicas`` are the roles as of the last convergence
    (``start``, ``restart`` or ``wait_ok``): after a failover, call ``wait_ok``.
    """

    def __init__(
        self,
        n_primaries: int = 3,
        replicas_per_primary: int = 0,
        password: str | None = None,
        *,
        base_dir: Path,
    ) -> None:
        if n_primaries < 1 or replicas_per_primary < 0:
            raise ConfigurationError(
                f"a cluster needs n_primaries >= 1 and replicas_per_primary >= 0, "
                f"not {n_primaries} and {replicas_per_primary}"
            )
        super().__init__(base_dir, password)
        self.n_primaries = n_primaries
        self.replicas_per_primary = replicas_per_primary
        self._nodes: list[Server] = []
        self._primary_ids: set[str] = set()

    @property
    def nodes(self) -> list[Server]:
        return list(self._nodes)

    @property
    def primaries(self) -> list[Server]:
        return [node for node in self._nodes if node.node_id in self._primary_ids]

    @property
    def replicas(self) -> list[Server]:
        return [node for node in self._nodes if node.node_id not in self._primary_ids]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with the primaries as seed nodes."""
        seeds = ",".join(f"{HOST}:{node.port}" for node in self.primaries)
        return f"redis+cluster://{self._auth()}{seeds}"

    def wait_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until every running node says cluster_state:ok, knows every node, and
        sees the same slot map, which covers all slots and lists every running node;
        and every running replica's link to its primary is up."""
        self._wait_ok(time.monotonic() + timeout)

    def restart(self, port: int, timeout: float = START_TIMEOUT_S) -> Server:
        """Start a killed node again on its port with its nodes.conf. It comes back
        with its node id: a primary with its slots, unless a replica took them over
        meanwhile (then it becomes that replica's replica). Waits until the cluster
        is ok again."""
        node = self._server(port)
        deadline = time.monotonic() + timeout
        try:
            self._relaunch(node, deadline, self.password)
            self._wait_ok(deadline)
        except ServerExited:
            raise
        except TopologyError as exc:
            raise TopologyError(f"{exc}\n{_log_tails([node])}") from None
        return node

    def _servers(self) -> list[Server]:
        return self._nodes

    def _start(self, deadline: float) -> None:
        total = self.n_primaries * (1 + self.replicas_per_primary)
        self._nodes = self._launch([self._plan] * total, deadline, self.password)
        self._form(deadline)
        self._wait_ok(deadline)

    def _plan(self, port: int) -> Server:
        directory = self.base_dir / f"node-{port}"
        bus_port = _free_port(self._claimed)  # not port + 10000: that may pass 65535
        args = self._data_args(port, directory)
        args += ["--cluster-enabled", "yes", "--cluster-port", str(bus_port)]
        args += ["--cluster-config-file", str(directory / f"nodes-{port}.conf")]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        return Server(port=port, directory=directory, args=args, bus_port=bus_port)

    def _form(self, deadline: float) -> None:
        """Slots first (a local change on each primary), then MEET (gossip spreads
        it), then REPLICATE, which each replica accepts once gossip has told it of
        its primary."""
        for node in self._nodes:
            node.node_id = self._call(node, "CLUSTER", "MYID")
        primaries = self._nodes[: self.n_primaries]
        self._primary_ids = {node.node_id for node in primaries}
        for index, node in enumerate(primaries):
            first, last = _slot_range(index, self.n_primaries)
            self._call(node, "CLUSTER", "ADDSLOTSRANGE", first, last)
        seed = self._nodes[0]
        for node in self._nodes[1:]:
            self._call(node, "CLUSTER", "MEET", HOST, seed.port, seed.bus_port)
        for index, node in enumerate(self._nodes[self.n_primaries :]):
            primary = primaries[index % self.n_primaries]
            what = f"node {node.port} to accept CLUSTER REPLICATE {primary.port}"
            _wait_for(partial(self._replicate, node, primary), deadline, what)

    def _replicate(self, replica: Server, primary: Server) -> None:
        # Raises "Unknown node" until gossip has reached the replica; _wait_for retries.
        self._call(replica, "CLUSTER", "REPLICATE", primary.node_id)

    def _call(self, node: Server, *args: str | int) -> Any:
        return _command(node.port, self.password, *args)

    def _wait_ok(self, deadline: float) -> None:
        _wait_for(self._convergence_problem, deadline, "the cluster to converge")
        live = [node for node in self._nodes if node.alive]
        slot_map = _slot_map(self._call(live[0], "CLUSTER", "SLOTS"))
        self._primary_ids = {primary for _, _, primary, _ in slot_map}

    def _convergence_problem(self) -> str | None:
        live = [node for node in self._nodes if node.alive]
        if not live:
            return "no node is running"
        maps: dict[int, SlotMap] = {}
        for node in live:
            problem = self._node_problem(node)
            if problem:
                return f"node {node.port}: {problem}"
            maps[node.port] = _slot_map(self._call(node, "CLUSTER", "SLOTS"))
        return _agreement_problem(maps, {node.node_id for node in live})

    def _node_problem(self, node: Server) -> str | None:
        info = _fields(self._call(node, "CLUSTER", "INFO"))
        if info.get("cluster_state") != "ok":
            return f"cluster_state:{info.get('cluster_state')}"
        known = int(info.get("cluster_known_nodes", 0))
        if known != len(self._nodes):
            return f"knows {known} nodes, not {len(self._nodes)}"
        replication = self._call(node, "INFO", "replication")
        if replication.get("role") == "slave" and replication["master_link_status"] != "up":
            return f"its link to its primary is {replication['master_link_status']}"
        return None


def _fields(text: str) -> dict[str, str]:
    """``key:value`` lines (CLUSTER INFO) as a dict."""
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def _slot_range(index: int, count: int) -> tuple[int, int]:
    return index * SLOTS // count, (index + 1) * SLOTS // count - 1


def _slot_map(reply: list[Any]) -> SlotMap:
    """CLUSTER SLOTS as comparable data: (first, last, primary id, replica ids).
    Valkey lists a replica only once it has synced and is not marked failed."""
    return tuple(
        sorted(
            (int(entry[0]), int(entry[1]), str(entry[2][2]), tuple(sorted(r[2] for r in entry[3:])))
            for entry in reply
        )
    )


def _agreement_problem(maps: dict[int, SlotMap], live_ids: set[str]) -> str | None:
    """Whether the nodes' slot maps agree, cover every slot and list the live nodes."""
    (first_port, slot_map), *others = maps.items()
    differ = [port for port, other in others if other != slot_map]
    if differ:
        return f"nodes {differ} see another slot map than node {first_port}"
    covered = sum(last - first + 1 for first, last, _, _ in slot_map)
    if covered != SLOTS:
        return f"{covered} of {SLOTS} slots are served"
    listed = {primary for _, _, primary, _ in slot_map}
    listed.update(replica for *_, replicas in slot_map for replica in replicas)
    if listed != live_ids:
        return f"the slot map lists nodes {sorted(listed)}, the running ones are {sorted(live_ids)}"
    return None


# --- Sentinel ---------------------------------------------------------------------


class LocalSentinelGroup(_Topology):
    """One primary, ``replicas`` replicas and ``sentinels`` Sentinels watching them
    as ``service``, on 127.0.0.1. The quorum is a majority of the Sentinels.

    The password (if any) is the data servers'; the Sentinels take none, as the
    ``redis+sentinel://`` URL form expects. A primary is failed over about
    ``down_after_ms`` + 1 s after it stops answering.
    """

    def __init__(
        self,
        replicas: int = 2,
        sentinels: int = 3,
        service: str = "shoal",
        password: str | None = None,
        *,
        base_dir: Path,
        down_after_ms: int = DOWN_AFTER_MS,
    ) -> None:
        if replicas < 0 or sentinels < 1 or not _SERVICE_NAME.fullmatch(service):
            raise ConfigurationError(
                f"a Sentinel group needs replicas >= 0, sentinels >= 1 and a service name of "
                f"letters, digits, '_', '-' or '.', not {replicas}, {sentinels} and {service!r}"
            )
        super().__init__(base_dir, password)
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.service = service
        self.quorum = sentinels // 2 + 1
        self.down_after_ms = down_after_ms
        self._data: list[Server] = []
        self._sentinels: list[Server] = []

    @property
    def data_nodes(self) -> list[Server]:
        """The primary and replica servers (the first one started as the primary)."""
        return list(self._data)

    @property
    def sentinels(self) -> list[Server]:
        return list(self._sentinels)

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self._sentinels)
        return f"redis+sentinel://{self._auth()}{hosts}/{self.service}"

    def primary_port(self) -> int:
        """The primary's port, as the first Sentinel that answers names it."""
        for sentinel in self._sentinels:
            if sentinel.alive:
                try:
                    return self._named_primary(sentinel)
                except redis.RedisError:
                    continue
        raise TopologyError(f"no Sentinel answered for service {self.service!r}")

    def kill_primary(self) -> int:
        """SIGKILL the current primary; return its port."""
        port = self.primary_port()
        self.kill(port)
        return port

    def wait_failover(self, old_port: int, timeout: float = FAILOVER_TIMEOUT_S) -> int:
        """Wait until every running Sentinel names the same primary, other than
        ``old_port``, and that server's ROLE is master; return its port."""
        what = f"the Sentinels to replace primary {old_port}"
        _wait_for(partial(self._failover_problem, old_port), time.monotonic() + timeout, what)
        return self.primary_port()

    def wait_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until the Sentinels agree on the primary, every running replica is in
        sync with it, and every Sentinel sees the replicas and the other Sentinels."""
        _wait_for(self._group_problem, time.monotonic() + timeout, "the Sentinel group")

    def restart(self, port: int, timeout: float = START_TIMEOUT_S) -> Server:
        """Start a killed server again on its port: a data server as a replica of the
        current primary, a Sentinel with its (rewritten) config. Waits until the group
        is whole again."""
        server = self._server(port)
        deadline = time.monotonic() + timeout
        try:
            if server in self._sentinels:
                self._relaunch(server, deadline, None)
            else:
                self._relaunch_replica(server, deadline)
            _wait_for(self._group_problem, deadline, "the Sentinel group")
        except ServerExited:
            raise
        except TopologyError as exc:
            raise TopologyError(f"{exc}\n{_log_tails([server])}") from None
        return server

    def _relaunch_replica(self, server: Server, deadline: float) -> None:
        primary_port = self.primary_port()
        if primary_port == server.port:
            raise TopologyError(
                f"the Sentinels still name {server.port} the primary: wait_failover() first"
            )
        server.args = self._data_plan(server.port, replica_of=primary_port).args
        self._relaunch(server, deadline, self.password)

    def _servers(self) -> list[Server]:
        return self._data + self._sentinels

    def _start(self, deadline: float) -> None:
        (primary,) = self._launch([self._data_plan], deadline, self.password)
        as_replica = partial(self._data_plan, replica_of=primary.port)
        replicas = self._launch([as_replica] * self.replica_count, deadline, self.password)
        self._data = [primary, *replicas]
        # Sentinels learn of replicas from the primary's INFO, which they ask for at
        # once, then only every 10 s: start them once the replicas are attached.
        what = "the replicas to sync with the primary"
        _wait_for(partial(self._replication_problem, primary.port), deadline, what)
        watching = partial(self._sentinel_plan, primary_port=primary.port)
        self._sentinels = self._launch([watching] * self.sentinel_count, deadline, None)
        _wait_for(self._group_problem, deadline, "the Sentinel group")

    def _data_plan(self, port: int, replica_of: int | None = None) -> Server:
        directory = self.base_dir / f"data-{port}"
        args = self._data_args(port, directory)
        if replica_of is not None:
            args += ["--replicaof", HOST, str(replica_of)]
        return Server(port=port, directory=directory, args=args)

    def _sentinel_plan(self, port: int, primary_port: int) -> Server:
        directory = self.base_dir / f"sentinel-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # Sentinel rewrites it with what it learns
        config.write_text(self._sentinel_config(port, primary_port, directory))
        return Server(port=port, directory=directory, args=[str(config), "--sentinel"])

    def _sentinel_config(self, port: int, primary_port: int, directory: Path) -> str:
        name = self.service
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {_config_quote(str(directory))}",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {name} {HOST} {primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} 5000",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {name} {_config_quote(self.password)}")
        return "\n".join(lines) + "\n"

    def _named_primary(self, sentinel: Server) -> int:
        reply = _command(sentinel.port, None, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        if not reply:
            raise TopologyError(f"Sentinel {sentinel.port} does not know {self.service!r}")
        return int(reply[1])

    def _named_primaries(self) -> dict[int, int]:
        """Sentinel port -> the primary port it names, for every running Sentinel."""
        return {s.port: self._named_primary(s) for s in self._sentinels if s.alive}

    def _failover_problem(self, old_port: int) -> str | None:
        named = self._named_primaries()
        if old_port in named.values() or len(set(named.values())) != 1:
            return f"Sentinels name these primaries: {named}"
        new_port = next(iter(named.values()))
        role = _command(new_port, self.password, "ROLE")[0]
        return None if role == "master" else f"{new_port} is still a {role}"

    def _group_problem(self) -> str | None:
        named = self._named_primaries()
        if len(set(named.values())) != 1:
            return f"Sentinels name these primaries: {named}"
        primary_port = next(iter(named.values()))
        problem = self._replication_problem(primary_port)
        for sentinel in self._sentinels:
            if problem is None and sentinel.alive:
                problem = self._sentinel_problem(sentinel, primary_port, len(named))
        return problem

    def _replication_problem(self, primary_port: int) -> str | None:
        role = _command(primary_port, self.password, "ROLE")[0]
        if role != "master":
            return f"{primary_port} is a {role}, not the primary"
        for node in self._data:
            if node.port == primary_port or not node.alive:
                continue
            info = _command(node.port, self.password, "INFO", "replication")
            seen = (info.get("master_port"), info.get("master_link_status"))
            if seen != (primary_port, "up") or info.get("master_sync_in_progress"):
                return f"replica {node.port}: (master_port, master_link_status) is {seen}"
        return None

    def _sentinel_problem(self, sentinel: Server, primary_port: int, running: int) -> str | None:
        where = f"Sentinel {sentinel.port}"
        primary = _pairs(_command(sentinel.port, None, "SENTINEL", "MASTER", self.service))
        if primary["flags"] != "master":
            return f"{where} flags the primary {primary['flags']}"
        if int(primary["num-other-sentinels"]) < running - 1:
            return f"{where} knows {primary['num-other-sentinels']} other Sentinels"
        replies = _command(sentinel.port, None, "SENTINEL", "REPLICAS", self.service)
        healthy = {int(r["port"]) for r in map(_pairs, replies) if r["flags"] == "slave"}
        wanted = {n.port for n in self._data if n.alive and n.port != primary_port}
        if not wanted <= healthy:
            return f"{where} does not see replicas {sorted(wanted - healthy)} as healthy"
        return None
