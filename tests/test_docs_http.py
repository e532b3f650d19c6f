"""Every ``curl`` line of docs/http-api.md and docs/security.md, run against a real
gateway and node: the examples a user copies must work as written."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from shoal import Client, Settings
from shoal.apikeys import KeyStore

from .conftest import REPO, eventually, node_process
from .gateways import gateway_process

DOCS = ("docs/http-api.md", "docs/security.md", "docs/observability.md")


def curl_commands(path: Path) -> list[str]:
    """The curl commands of the page's bash blocks, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("curl "):
                commands.append(line)
    return commands


@pytest.mark.slow
async def test_every_curl_example_in_the_http_docs_works(
    client: Client, settings: Settings
) -> None:
    commands = [c for doc in DOCS for c in curl_commands(REPO / doc)]
    assert len(commands) >= 20, "the docs lost their examples?"
    with (
        node_process(settings, "examples.research_team"),
        gateway_process(settings) as (gateway, _),
    ):
        await client.wait_for_hosts("find_sources", timeout=20)
        task = await client.submit("find_sources", question="why do tides turn?")
        await task.result(timeout=20)
        dead = await client.submit("find_sources", question=42, max_attempts=1)
        await eventually(
            lambda: _is_dead(client, dead.id), "the bad find_sources task in the DLQ", 20
        )
        await client.call("investigate", question="what moves the tides?",
                          agent="researcher/tides", result_timeout=30)  # fmt: skip
        created = await KeyStore(client).create("docs", ["read", "submit", "message", "admin"])
        env = {
            **os.environ, "GW": gateway, "TASK": task.id, "DEAD": dead.id,
            "NEXT": task.id, "KEY": created.secret,
        }  # fmt: skip
        for command in commands:
            # With keys in the namespace, every call carries the admin key (the docs
            # say to add the header; those that show it already set it themselves).
            if "Authorization" not in command:
                command = command.replace("curl ", 'curl -H "Authorization: Bearer $KEY" ', 1)
            run = await asyncio.to_thread(
                subprocess.run,
                ["bash", "-c", command.replace("curl ", "curl -f ", 1)],
                env=env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert run.returncode == 0, f"{command}\n-> {run.returncode}: {run.stderr}{run.stdout}"
            if "/events" not in command and "/metrics" not in command:
                json.loads(run.stdout)  # every other answer is JSON


async def _is_dead(client: Client, task_id: str) -> bool:
    return (await client.status(task_id)).status == "dead"
