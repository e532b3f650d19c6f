"""A network lab for tests: the engine and each worker host in a network namespace of
its own, joined by point-to-point links that a test can cut and restore.

Why namespaces, when other tests pause a node (SIGSTOP) or hold its packets in a
proxy: a cut link is what a network partition looks like from both ends. The node
keeps running and its connections stay open; what it sends vanishes and nothing
resets them, so it can only notice through its own timeouts (new connections time
out, or fail with "No route to host" once its ARP entry for the engine is gone, as
on a LAN whose peer vanished). The engine sees clients that went quiet. Nothing in
the node's code path is replaced.

Layout of a lab with hosts ``a`` and ``b`` (``k`` is the host's number, from 1)::

    namespace <lab>-a   eth0 10.213.1.2/24 ──veth── to-a 10.213.1.1/24 ┐  namespace <lab>-engine
    namespace <lab>-b   eth0 10.213.2.2/24 ──veth── to-b 10.213.2.1/24 ┘  valkey-server

The addresses (10.213.0.0/16, private) exist only inside the lab's namespaces, and
the engine binds only to its ends of the links, plus a unix socket (mode 700) in a
private directory: that is how the test process, in the root namespace, reaches it.
Names are unique per lab (``shoal-<pid>-<n>-<role>``), and everything a lab created
— processes and namespaces — is removed when it closes, on failure too; every step
is bounded.

Building a lab needs Linux and CAP_SYS_ADMIN (in practice root): ``unavailable()``
says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from shoal.engine import find_server_binary

SUBNET = "10.213"  # host k's link is SUBNET.k.0/24: .1 the engine's end, .2 the host's
ENGINE_PORT = 6379  # alone in its namespace: no other server can hold it
COMMAND_TIMEOUT_S = 10.0  # any one `ip` command
START_TIMEOUT_S = 15.0  # the engine answering on its socket
STOP_TIMEOUT_S = 15.0  # a process leaving after SIGTERM, before SIGKILL
POLL_S = 0.02

_labs = itertools.count(1)


class LabError(Exception):
    """The lab could not be built or torn down; the message says which step failed."""


def _ip(*args: str) -> None:
    """Run ``ip ARGS`` (bounded), raising LabError with its stderr if it fails."""
    try:
        result = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"'ip {' '.join(args)}' did not finish in {COMMAND_TIMEOUT_S}s") from None
    if result.returncode != 0:
        raise LabError(f"'ip {' '.join(args)}' failed: {result.stderr.strip()}")


def unavailable() -> str | None:
    """Why this process cannot build a lab (a skip reason), or None if it can: tries
    what the lab does first, adding (and deleting) a namespace."""
    if sys.platform != "linux":
        return f"network namespaces are Linux only (this is {sys.platform})"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"shoal-{os.getpid()}-probe-{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except LabError as exc:
        who = "root" if os.geteuid() == 0 else f"uid {os.geteuid()}, not root"
        return f"cannot create a network namespace (needs CAP_SYS_ADMIN; running as {who}): {exc}"
    _ip("netns", "delete", probe)
    return None


@dataclass(frozen=True)
class Host:
    """One worker host: its namespace, and its link to the engine."""

    name: str
    netns: str
    address: str  # its own end of the link
    engine_address: str  # the engine's end: where it reaches the engine
    link: str  # the engine end's interface, in the engine's namespace


class NetnsLab:
    """Namespaces, links and an engine, for ``with NetnsLab(workdir, ["a", "b"]) as lab``.

    ``run_in(host, args)`` starts a process inside a host's namespace; ``cut(host)``
    and ``restore(host)`` take its link down and up; ``engine_url`` is the engine
    for the test process, ``url_for(host)`` for processes on the host. The engine's
    log is ``workdir/engine.log``.
    """

    def __init__(self, workdir: Path, hosts: Sequence[str]) -> None:
        base = f"shoal-{os.getpid()}-{next(_labs)}"
        if bad := [h for h in hosts if not (h.isalnum() and len(h) <= 12)]:
            raise LabError(f"host names {bad}: use up to 12 letters or digits (interface names)")
        self.workdir = workdir
        self.engine_netns = f"{base}-engine"
        self.hosts = {
            name: Host(name, f"{base}-{name}", f"{SUBNET}.{k}.2", f"{SUBNET}.{k}.1", f"to-{name}")
            for k, name in enumerate(hosts, start=1)
        }
        self.password = secrets.token_hex(16)
        self._namespaces: list[str] = []  # created so far: deleted on close
        self._processes: list[subprocess.Popen[bytes]] = []  # started: stopped on close
        self._socket_dir: Path | None = None  # short: a unix socket path has 107 bytes at most
        self.engine: subprocess.Popen[bytes] | None = None

    # --- building and tearing down -------------------------------------------------

    def __enter__(self) -> NetnsLab:
        self._socket_dir = Path(tempfile.mkdtemp(prefix="shoal-lab-"))
        try:
            self._build()
            self._start_engine()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        """The engine's namespace, then per host its namespace and a veth pair whose
        ends are created right in their namespaces (never in the root one)."""
        self._add_namespace(self.engine_netns)
        for host in self.hosts.values():
            self._add_namespace(host.netns)
            engine_side = ["-n", self.engine_netns]
            _ip(*engine_side, "link", "add", host.link, "type", "veth",
                "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
            _ip(*engine_side, "addr", "add", f"{host.engine_address}/24", "dev", host.link)
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip(*engine_side, "link", "set", host.link, "up")
            _ip("-n", host.netns, "link", "set", "eth0", "up")

    def _start_engine(self) -> None:
        """valkey-server in the engine's namespace, configured by a file (so the
        password is not on its command line), ready once it answers on its socket."""
        config = self.workdir / "engine.conf"
        addresses = " ".join(h.engine_address for h in self.hosts.values())
        config.write_text(
            f"bind {addresses}\nport {ENGINE_PORT}\nprotected-mode yes\n"
            f"unixsocket {self.socket}\nunixsocketperm 700\n"
            f'requirepass {self.password}\nsave ""\nappendonly no\n'
            f"dir {self.workdir}\nlogfile {self.workdir / 'engine.log'}\n"
        )
        config.chmod(0o600)
        self.engine = self._run(self.engine_netns, [find_server_binary(), str(config)])
        conn = redis.Redis(unix_socket_path=str(self.socket), password=self.password)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while True:
                with contextlib.suppress(redis.ConnectionError):
                    if conn.ping():
                        return
                if self.engine.poll() is not None:
                    raise LabError(
                        f"the engine exited with {self.engine.returncode}: {self._log()}"
                    )
                if time.monotonic() > deadline:
                    raise LabError(
                        f"the engine did not answer in {START_TIMEOUT_S}s: {self._log()}"
                    )
                time.sleep(POLL_S)  # the server is starting in another process: look again
        finally:
            conn.close()

    def _log(self) -> str:
        path = self.workdir / "engine.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def close(self) -> None:
        """Bring every link up (a node cut off when a test failed can then drain
        rather than wait out its stop timeout), stop every process the lab started
        (newest first), then delete its namespaces, which removes the links. Each step
        runs even if one before it failed; the first failure is raised at the end."""
        errors: list[Exception] = []
        if self.engine_netns in self._namespaces:
            for host in self.hosts.values():
                with contextlib.suppress(LabError):  # not created yet: nothing to restore
                    self.restore(host.name)
        for proc in reversed(self._processes):
            try:
                self.stop(proc)
            except Exception as exc:  # each process gets its turn all the same
                errors.append(exc)
        for name in reversed(self._namespaces):
            try:
                _ip("netns", "delete", name)
            except LabError as exc:
                errors.append(exc)
        self._namespaces.clear()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        if errors:
            raise errors[0]

    # --- processes -------------------------------------------------------------------

    def _run(self, netns: str, args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        # `ip netns exec` enters the namespace and execs the program: the pid is the
        # program's own, so signals reach it directly.
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *args], **popen)
        self._processes.append(proc)
        return proc

    def run_in(self, host: str, args: Sequence[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start ``args`` inside ``host``'s namespace (Popen keywords as for Popen);
        stopped when the lab closes, unless stopped before."""
        return self._run(self.hosts[host].netns, args, **popen)

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it is still there after ``timeout``; its exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait(timeout=COMMAND_TIMEOUT_S)

    # --- the network ---------------------------------------------------------------

    @property
    def socket(self) -> Path:
        assert self._socket_dir is not None, "the lab is not open"
        return self._socket_dir / "engine.sock"

    @property
    def engine_url(self) -> str:
        """The engine for the test process (root namespace): its unix socket."""
        return f"unix://:{self.password}@{self.socket}?db=0"

    def url_for(self, host: str) -> str:
        """The engine as seen from ``host``: the engine's end of its link."""
        address = self.hosts[host].engine_address
        return f"redis://:{self.password}@{address}:{ENGINE_PORT}/0"

    def cut(self, host: str) -> None:
        """Take the engine's end of ``host``'s link down. Packets vanish both ways and
        nothing resets a connection; the host keeps its address and route (it sees
        its carrier drop, as when a cable or a switch port fails), so it learns of
        the cut only through its own timeouts."""
        _ip("-n", self.engine_netns, "link", "set", self.hosts[host].link, "down")

    def restore(self, host: str) -> None:
        """Bring the link up again: open connections resume (TCP retransmits what
        was lost), new ones connect."""
        _ip("-n", self.engine_netns, "link", "set", self.hosts[host].link, "up")
