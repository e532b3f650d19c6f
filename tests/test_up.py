"""`shoal up` / `down` / `logs`: a supervised cluster of real processes, started as a
user starts it (a subprocess), checked from the outside: it serves, survives a
SIGKILLed child, and stops leaving no process behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from shoal import Client, Settings
from shoal.engine import EmbeddedEngine
from shoal.supervisor import ClusterState
from tests.conftest import REPO, eventually, node_env
from tests.test_cli import shoal

UP = ["up", "--app", "tests.agents", "--port", "0", "--grace", "5"]


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """The data dir of a test's cluster: whatever the test leaves up is killed after."""
    yield tmp_path
    state = ClusterState.read(tmp_path / "up")
    if state is not None:
        for pid in alive(cluster_pids(state)):
            os.kill(pid, signal.SIGKILL)
    engine = EmbeddedEngine(tmp_path)
    if engine.running():
        engine.stop()


def cluster_pids(state: ClusterState) -> list[int]:
    return [state.pid, *(c.pid for c in state.children)]


def alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie has ended: only its parent has not looked)."""
    found = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


async def wait_gone(pids: list[int], what: str) -> None:
    async def gone() -> bool:
        return not alive(pids)

    await eventually(gone, what, timeout=20)


async def read_state(data_dir: Path) -> ClusterState:
    async def ready() -> ClusterState | None:
        state = ClusterState.read(data_dir / "up")
        return state if state is not None and state.ready else None

    return await eventually(ready, "the cluster is up", timeout=60)


async def test_up_detached_serves_survives_a_killed_node_and_down_leaves_nothing(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    code, out, err = await shoal(settings, *UP, "--detach", "--json", "--data-dir", str(tmp_path))
    assert code == 0, err
    info = json.loads(out)
    state = await read_state(tmp_path)
    assert info["nodes"] == ["node-1", "node-2"] and info["namespace"] == settings.namespace
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(info["dashboard"])
        assert page.status_code == 200 and "<html" in page.text.lower()
        answer = await http.post(
            f"{state.gateway_url}/v1/tasks?wait=10",
            json={"capability": "add", "args": {"a": 2, "b": 3}},
        )
    assert answer.status_code == 201 and answer.json()["outcome"]["result"]["sum"] == 5

    victim = next(c for c in state.children if c.name == "node-1")
    os.kill(victim.pid, signal.SIGKILL)

    async def restarted() -> ClusterState | None:
        now = ClusterState.read(tmp_path / "up")
        child = next(c for c in now.children if c.name == "node-1") if now else None
        return now if child and child.restarts == 1 and child.pid != victim.pid else None

    state = await restarted() or await eventually(restarted, "node-1 restarted", timeout=20)

    async def node_1_back() -> bool:
        return any(n.id == "node-1" and n.state == "alive" for n in (await client.cluster()).nodes)

    await eventually(node_1_back, "the restarted node-1 registered again", timeout=20)
    assert (await client.call("add", a=1, b=1, timeout=10))["sum"] == 2

    code, out, _ = await shoal(settings, "logs", "supervisor", "--data-dir", str(tmp_path))
    assert code == 0
    assert f"node-1 (pid {victim.pid}) exited with code -9; restarting in" in out
    assert "node-1 restarted" in out
    code, out, _ = await shoal(settings, "logs", "node-1", "-n", "200", "--data-dir", str(tmp_path))
    assert code == 0 and "node-1 |" in out and "joined" in out

    pids = cluster_pids(state)
    code, out, err = await shoal(settings, "down", "--data-dir", str(tmp_path))
    assert (code, out.strip()) == (0, "stopped"), err
    await wait_gone(pids, "no process of the cluster is left")
    assert not (tmp_path / "up" / "state.json").exists()
    assert not [n for n in (await client.cluster()).nodes if n.state == "alive"]
    code, out, _ = await shoal(settings, "down", "--data-dir", str(tmp_path))
    assert code == 0 and "no cluster is up" in out


async def test_ctrl_c_stops_the_foreground_cluster_and_the_engine_it_started(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", *UP, "--nodes", "1", "--data-dir", str(tmp_path),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        state = await read_state(tmp_path)
        engine = EmbeddedEngine(tmp_path).running()
        assert engine is not None and state.embedded
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    await wait_gone([*cluster_pids(state), engine.pid], "the cluster and its engine stopped")
    text = out.decode()
    assert "Shoal is up" in text and "Ctrl-C stops it." in text
    assert re.search(r"^node-1 +\| .* joined", text, re.M), "the children's logs are shown"
    assert "left (drained, deregistered)" in text, text
    assert "stopped the embedded engine" in err.decode()


async def test_a_killed_supervisor_takes_its_children_with_it(
    settings: Settings, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", *UP, "--no-logs", "--data-dir", str(tmp_path),
        cwd=REPO, env=node_env(settings), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        state = await read_state(tmp_path)
    finally:
        proc.kill()
        await proc.wait()
    await wait_gone(cluster_pids(state), "children end when their supervisor is SIGKILLed")


async def test_up_refuses_clearly(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code, _, err = await shoal(settings, "up", "--app", "tests.agents", "--port", port,
                                   "--data-dir", str(tmp_path))  # fmt: skip
    assert code == 1 and f"cannot serve the gateway on 127.0.0.1:{port}" in err
    assert "--port" in err

    code, _, err = await shoal(
        settings, "up", "--app", "no.such.module", "--data-dir", str(tmp_path)
    )
    assert code == 1 and "cannot import app module 'no.such.module'" in err

    env = {**node_env(settings), "SHOAL_NODE_CONCURRENCY": "0"}  # every node refuses to start
    code, _, err = await shoal(None, *UP, "--data-dir", str(tmp_path), env=env)
    assert code == 1 and "exited with code 2 while starting" in err
    assert "concurrency" in err, "the end of the failing node's log is shown"
    assert not (tmp_path / "up" / "state.json").exists()

    code, _, err = await shoal(settings, "logs", "node-9", "--data-dir", str(tmp_path))
    assert code == 1 and "no log named node-9" in err and "node-1" in err
    code, _, err = await shoal(settings, "logs", "--data-dir", str(tmp_path / "empty"))
    assert code == 1 and "no logs in" in err

    code, _, err = await shoal(settings, "up", "--nodes", "-1", "--data-dir", str(tmp_path))
    assert code == 2 and "--nodes" in err


async def test_a_second_up_in_the_same_place_is_refused(settings: Settings, tmp_path: Path) -> None:
    code, _, err = await shoal(settings, *UP, "--detach", "--nodes", "1", "--no-gateway",
                               "--data-dir", str(tmp_path))  # fmt: skip
    assert code == 0, err
    try:
        code, _, err = await shoal(settings, *UP, "--detach", "--data-dir", str(tmp_path))
        assert code == 1 and "a cluster is already running" in err and "shoal down" in err
    finally:
        code, _, _ = await shoal(settings, "down", "--data-dir", str(tmp_path))
    assert code == 0


@pytest.mark.parametrize("bad", ["0", "x"])
async def test_up_reads_shoal_toml_and_env_like_every_command(
    settings: Settings, tmp_path: Path, bad: str
) -> None:
    (tmp_path / "shoal.toml").write_text(f'[up]\nnodes = 1\napp = "tests.agents"\nport = {0}\n')
    env = {**node_env(settings), "SHOAL_CONFIG": str(tmp_path / "shoal.toml")}
    env["SHOAL_UP_GRACE"] = bad  # the environment wins over the file, and is checked
    code, _, err = await shoal(None, "up", "--detach", "--data-dir", str(tmp_path), env=env)
    if bad == "x":
        assert code == 2 and "grace" in err.lower()
        return
    assert code == 0, err
    try:
        state = await read_state(tmp_path)
        assert [c.name for c in state.children] == ["gateway", "node-1"]
        assert state.grace == 0
    finally:
        await shoal(settings, "down", "--data-dir", str(tmp_path))
