"""`shoal demo`, run as the README tells a newcomer to run it: a real 3-node cluster
on the embedded engine, a real SIGKILL, and a verdict that can fail."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from shoal.engine import EmbeddedEngine
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def embedded_env() -> dict[str, str]:
    """No SHOAL_* of the test session: the demo starts its own embedded engine."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}


async def run_demo(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "demo", "--port", "0", "--json", *args,
        cwd=REPO, env=embedded_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def shoal_children_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


async def test_the_demo_loses_nothing_when_a_node_is_killed_and_keep_stays_up(
    tmp_path: Path,
) -> None:
    """`shoal demo` with its defaults (what the README runs), --json and --keep: the
    report, then the cluster left up with its dashboard until Ctrl-C."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "demo", "--port", "0", "--json", "--keep",
        "--data-dir", str(tmp_path),
        cwd=REPO, env=embedded_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    try:
        report = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))
        seen = b""
        async with asyncio.timeout(30):
            while b"the cluster stays up" not in seen:
                line = await proc.stderr.readline()
                assert line, f"demo --keep ended before saying the cluster stays up: {seen!r}"
                seen += line
        async with httpx.AsyncClient(timeout=10) as http:
            assert (await http.get(report["dashboard"])).status_code == 200
        children = shoal_children_of(proc.pid)
        assert len(children) >= 3, "the gateway and the surviving nodes still run"
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
    err = seen.decode()
    assert proc.returncode == 0, err
    assert report["passed"] is True
    assert report["submitted"] == report["succeeded"] > 500
    assert (report["lost"], report["failed"], report["wrong"]) == (0, 0, 0)
    takeover = report["takeover"]
    assert takeover is not None and takeover["seconds"] is not None, err
    assert takeover["seconds"] < 10, "the killed node's work had a new home within seconds"
    assert takeover["partitions"] > 0, "the killed node held agent partitions"
    assert takeover["victim"] not in takeover["moved_to"], "its tasks ended elsewhere"
    assert set(report["by_node"]) == {"node-1", "node-2", "node-3"}, "work spread over all"
    assert f"SIGKILL {takeover['victim']} (pid " in err, "the kill is shown as it happens"
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert EmbeddedEngine(tmp_path).running() is None, "the engine it started is stopped"
    assert not (tmp_path / "demo" / "state.json").exists()


async def test_the_demo_fails_when_a_task_is_lost_or_wrong(tmp_path: Path) -> None:
    """The check can fail: tests.demo_broken never finishes one document and answers
    another wrongly."""
    code, out, err = await run_demo(
        "--app", "tests.demo_broken", "--documents", "12", "--users", "2", "--turns", "2",
        "--timeout", "6", "--data-dir", str(tmp_path),
    )  # fmt: skip
    assert code == 1, err
    report = json.loads(out)
    assert report["passed"] is False
    assert (report["submitted"], report["lost"], report["wrong"]) == (16, 1, 1)
    assert report["succeeded"] == 15, "the wrong answer is a success with a wrong result"
    assert EmbeddedEngine(tmp_path).running() is None, "stopped even when it failed"
