"""Test fixtures: one real embedded engine per session, one namespace per test.

Tests that kill or restart the engine start their own (see ``private_engine``).
Nodes run either in-process (``running_node``: a real Node on the test's event
loop, talking to the real engine) or as separate processes (``node_process``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shoal import Agent, Client, Settings, TaskHandle
from shoal.engine import EmbeddedEngine
from shoal.node import Node, NodeConfig
from shoal.testing.llm_server import LLMServer
from shoal.testing.topologies import LocalCluster, LocalSentinelGroup

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine")


ENGINES = ("standalone", "cluster", "sentinel")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine",
        choices=("all", *ENGINES),
        default="all",
        help="the engine topologies to run on: tests marked 'topology' run on each of "
        "standalone, a local 3-shard Cluster and a Sentinel group (1 primary, 2 replicas, "
        "3 Sentinels); every other test on standalone. Default: all",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked 'topology' that use the engine run once per topology."""
    if "engine_kind" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker("topology") is not None
        kinds = list(ENGINES) if marked else ["standalone"]
        metafunc.parametrize("engine_kind", kinds, scope="session")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--engine=cluster`` (say) keeps only the tests that run on a Cluster."""
    wanted = config.getoption("engine")
    if wanted == "all":
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        kind = params.params.get("engine_kind", "standalone") if params else "standalone"
        (keep if kind == wanted else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def engine_kind() -> str:
    return "standalone"  # replaced by the parametrization above where it applies


@pytest.fixture(scope="session")
def engine_url(
    engine_kind: str, engine_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session's engine of that topology, started from the bundled server binary."""
    if engine_kind == "standalone":
        engine = EmbeddedEngine(engine_dir)
        record = engine.ensure()
        yield record.url
        engine.stop()
        return
    base = tmp_path_factory.mktemp(engine_kind)
    password = uuid.uuid4().hex
    topology: LocalCluster | LocalSentinelGroup = (
        LocalCluster(n_primaries=3, password=password, base_dir=base)
        if engine_kind == "cluster"
        else LocalSentinelGroup(replicas=2, sentinels=3, password=password, base_dir=base)
    )
    with topology:
        yield topology.url


@pytest.fixture
def own_engine(tmp_path: Path) -> Iterator[EmbeddedEngine]:
    """A private engine for a test that stops, restarts or breaks it."""
    engine = EmbeddedEngine(tmp_path / "engine")
    engine.ensure()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def llm_server() -> Iterator[LLMServer]:
    """A test model server shared by a module's tests (shoal.testing.llm_server)."""
    with LLMServer() as running:
        yield running


@pytest.fixture
def model_server(llm_server: LLMServer) -> LLMServer:
    """The module's model server with every knob back at its default."""
    return llm_server.reset()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def settings(engine_url: str, namespace: str) -> Settings:
    return Settings(url=engine_url, namespace=namespace)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with Client(settings=settings) as c:
        yield c


@contextlib.asynccontextmanager
async def running_node(
    agents: list[type[Agent]], settings: Settings, **config: Any
) -> AsyncIterator[Node]:
    """A real node on this event loop; stopped (drained) on exit."""
    node = Node(agents, settings, NodeConfig(**config))
    task = asyncio.create_task(node.run())
    async with Client(settings=settings) as probe:
        for name in node.capabilities[:1]:
            await probe.wait_for_hosts(name, timeout=10)
        wanted = {a.agent_type for a in agents if a.is_addressable()}
        async with asyncio.timeout(10):  # a node registers its agent types at start
            while not wanted <= (await probe.agent_types()).keys():  # noqa: ASYNC110
                await asyncio.sleep(0.005)
    try:
        yield node
    finally:
        node.stop()
        await asyncio.wait_for(task, 30)


async def wait_for_status(handle: TaskHandle, status: str, timeout: float = 10.0) -> None:
    """Wait until a task reaches ``status`` (a node in this or another process moves it
    there; nothing announces it, so this looks at the record every few ms)."""
    async with asyncio.timeout(timeout):
        while (await handle.status()).status != status:  # noqa: ASYNC110 - another actor moves it
            await asyncio.sleep(0.005)


def node_env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, "SHOAL_NAMESPACE": settings.namespace}
    assert settings.url
    env["SHOAL_REDIS_URL"] = settings.url
    return env


@contextlib.contextmanager
def node_process(
    settings: Settings,
    app: str = "tests.agents",
    *args: str,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal node`` as a separate process; SIGTERM (drain) on exit. ``env`` adds to
    its environment; ``stderr=subprocess.PIPE`` captures its log."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli", "node", "--app", app, "--log-level", "warning", *args],
        cwd=REPO,
        env={**node_env(settings), **(env or {})},
        stderr=stderr,
    )
    try:
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def helper_process(
    settings: Settings, module: str, *args: str, stdin: bool = True
) -> Iterator[subprocess.Popen[str]]:
    """``python -m <module> args`` in the test's namespace, talking lines over its
    stdin/stdout (tests/*_procs.py); killed and reaped on exit (resumed first: a
    paused process is not reaped by SIGKILL)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=node_env(settings),
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def read_line(proc: subprocess.Popen[str], timeout: float = 10) -> str:
    """A helper process's next line (it prints one per step); fails if it takes
    too long or the process ended."""
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)
    assert line, f"the process exited (code {proc.poll()}) before saying anything more"
    return line.strip()


def stop_process(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM (a node drains, a gateway finishes its requests), SIGKILL after
    ``grace`` seconds; reaped either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str = "the condition",
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Poll ``probe`` until it returns something truthy (node processes change the
    engine; nothing announces it); fail saying ``what`` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last seen: {value!r})")
        await asyncio.sleep(interval)  # another process moves it: look again
