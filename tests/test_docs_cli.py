"""Every `$ shoal …` line of docs/cli.md, run as written against a real engine and
real nodes: the examples a user copies must work.

The lines of all ``console`` blocks run in order in one bash session (so ``TASK=$(shoal
submit …)`` feeds a later ``shoal task $TASK``). A line whose shown output has an
``error:`` line (or a traceback) must fail; every other line must succeed. Lines
that run until stopped — ``shoal node``, ``shoal gateway``, ``status --watch`` — are
left out (the nodes here are started the same way), and so is ``shoal bench``, which
tests/test_cli_more.py runs with tiny settings.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal import Client, Settings

from .conftest import REPO, node_env, node_process

DOC = REPO / "docs" / "cli.md"
LONG_RUNNING = ("shoal node", "shoal gateway", "--watch", "shoal bench", "completion")


@dataclass(frozen=True)
class Example:
    command: str
    fails: bool  # the docs show an error for it


def examples(path: Path) -> list[Example]:
    """The `$ shoal …` lines of the page's console blocks, with whether they fail."""
    found: list[Example] = []
    for block in re.findall(r"```console\n(.*?)```", path.read_text(), flags=re.S):
        for chunk in re.split(r"(?m)^\$ ", block)[1:]:
            command, _, shown = chunk.partition("\n")
            if "shoal" not in command or any(skip in command for skip in LONG_RUNNING):
                continue
            fails = any(line.startswith(("error:", "Traceback")) for line in shown.splitlines())
            found.append(Example(command.strip(), fails))
    return found


def script(found: list[Example], logs: Path) -> str:
    """One bash session: each line's output and exit code kept under ``logs``."""
    lines = [f'shoal() {{ "{sys.executable}" -m shoal.cli "$@"; }}']
    for i, example in enumerate(found):
        # On lines of their own: a trailing "# comment" must not swallow the brace.
        lines += ["{", example.command, f"}} >{logs}/{i}.out 2>{logs}/{i}.err"]
        lines.append(f"echo $? >{logs}/{i}.rc")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
async def test_every_shoal_example_in_the_cli_docs_works(
    settings: Settings, client: Client, tmp_path: Path
) -> None:
    found = examples(DOC)
    assert len(found) >= 40, "the docs lost their examples?"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**node_env(settings), "SHOAL_DATA_DIR": str(tmp_path / "engine")}
    with node_process(settings, "tests.docs_app", "--name", "worker-1"):
        for capability in ("summarize", "increment", "always_fails"):
            await client.wait_for_hosts(capability, timeout=30)
        run = await asyncio.to_thread(
            subprocess.run, ["bash", "-c", script(found, logs)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr
    for i, example in enumerate(found):
        code = int((logs / f"{i}.rc").read_text())
        said = (logs / f"{i}.out").read_text() + (logs / f"{i}.err").read_text()
        if example.fails:
            assert code != 0, f"{example.command}: should fail, exit 0:\n{said}"
            assert "error:" in said or "Traceback" in said, f"{example.command}:\n{said}"
        else:
            assert code == 0, f"{example.command}: exit {code}:\n{said}"
