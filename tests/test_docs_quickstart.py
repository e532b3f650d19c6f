"""docs/quickstart.md, run as written: its files are written from its code blocks and
every shell line of its ```bash blocks is run in order, in a fresh directory, on
the embedded engine (the page's promise: nothing else installed).

Left out: the install line (`python3 -m venv … pip install -e .`), which is what
made this test's interpreter; and the `shoal demo` lines, which tests/test_demo.py
runs (with the defaults, smaller, with --json and with --keep).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.engine import EmbeddedEngine
from shoal.supervisor import ClusterState
from tests.conftest import REPO

pytestmark = pytest.mark.slow

PAGE = REPO / "docs" / "quickstart.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def blocks(kind: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(PAGE.read_text()) if lang == kind]


def shell_lines() -> list[str]:
    lines = []
    for body in blocks("bash"):
        for raw in body.splitlines():
            line = raw.split("  #")[0].strip()
            if not line or line.startswith(("python3 -m venv", "shoal demo")):
                continue
            lines.append(line)
    return lines


def files_of_the_page() -> dict[str, str]:
    """Each code block that starts with a `# path` comment is a file to write."""
    files = {}
    for kind in ("python", "toml"):
        for body in blocks(kind):
            first = body.splitlines()[0]
            if first.startswith("# ") and ("/" in first or first.endswith(".toml")):
                files[first[2:].strip()] = body
    return files


async def run(line: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_shell(
        line, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_every_command_of_the_quickstart_works(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SHOAL_UP_PORT"] = env["SHOAL_DEMO_PORT"] = "0"  # never depend on 8000 being free
    lines = shell_lines()
    assert "shoal up --detach" in lines and "shoal down" in lines, lines
    toml_at = lines.index("SHOAL_UP_NODES=4 shoal up --detach")
    outputs: dict[str, str] = {}
    try:
        for i, line in enumerate(lines):
            if i == toml_at:  # section 4: the file of the page is in place from here on
                (tmp_path / "shoal.toml").write_text(files_of_the_page()["shoal.toml"])
            elif i == 0:
                for name, body in files_of_the_page().items():
                    if name != "shoal.toml":
                        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                        (tmp_path / name).write_text(body)
            code, out, err = await run(line, tmp_path, env)
            assert code == 0, f"{line!r} exited {code}:\n{out}\n{err}"
            outputs[line] = out
            check(line, out, tmp_path)
    finally:
        await run("shoal down", tmp_path, env)
        engine = EmbeddedEngine(tmp_path / ".shoal")
        if engine.running():
            engine.stop()
    assert "hello Ada" in outputs["shoal call greet name=Ada"]


def check(line: str, out: str, cwd: Path) -> None:
    """What each command is documented to do, beyond exiting 0."""
    state = ClusterState.read(cwd / ".shoal" / "up")
    nodes = [c for c in state.children if c.name != "gateway"] if state else []
    if line == "shoal up --detach":
        assert "Shoal is up" in out and "dashboard" in out and len(nodes) == 2
    elif line.startswith("SHOAL_UP_NODES=4"):
        assert len(nodes) == 4, "the variable wins over the file's 3"
        assert state is not None and state.namespace == "staging", "top-level key applies"
    elif line.startswith("shoal up --nodes 1"):
        assert len(nodes) == 1, "the flag wins over variable and file"
    elif line == "shoal down":
        assert state is None and "stopped" in out
    elif "what is my name?" in line:
        assert "Ada" in out
    elif line.startswith("shoal logs node-1"):
        assert "node-1" in out
