"""The examples under examples/ do what their docs say, against the real engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from examples import research_team

from shoal import Client, Settings
from tests.conftest import REPO, node_env, running_node


async def test_research_team_agents_work_together_and_remember(
    client: Client, settings: Settings
) -> None:
    async with running_node(research_team.agents, settings):
        first = await research_team.run_team(client, project="ocean")
        second = await research_team.run_team(client, project="ocean")
    assert (first["project"], first["run"], second["run"]) == ("ocean", 1, 2)
    questions = [q for qs in research_team.TOPICS.values() for q in qs]
    assert [a["question"] for a in first["answers"]] == questions
    verdicts = {a["question"]: a["verdict"] for a in first["answers"]}
    assert verdicts["Why does the Moon cause tides?"] == "accepted"
    assert verdicts["What shelters fish along cold coasts?"] == "needs more sources"
    # each researcher handled its own questions in order, one at a time
    assert [a["notes_so_far"] for a in first["answers"]] == [1, 2, 1, 2]
    # the editors got every published finding of their topic before compiling
    reports = {r["topic"]: r for r in first["reports"]}
    assert set(reports) == {"tides", "reefs"}
    assert len(reports["tides"]["findings"]) == 2 and reports["tides"]["accepted"] == 2
    assert reports["reefs"]["accepted"] == 1
    # state carried over from the first run to the second
    assert second["researchers"]["tides"] == {
        "topic": "tides",
        "notes": 4,
        "questions": research_team.TOPICS["tides"] * 2,
    }
    assert second["critic_reviews"] == 8
    assert await client.agent_state("lead/ocean") == {"runs": 2}
    editor = await client.agent_state("editor/reefs") or {}
    assert len(editor["findings"]) == 2, "a finding published twice is stored once"


async def test_research_team_driver_prints_the_reports(settings: Settings) -> None:
    async with running_node(research_team.agents, settings):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "examples/research_team.py", "--project", "bay",
            cwd=REPO, env=node_env(settings),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = output.decode()
    assert proc.returncode == 0, text
    assert "project bay, run 1" in text
    assert "report on tides: 2 accepted" in text
    assert "report on reefs: 1 accepted" in text
    assert "critic/strict has reviewed 4 draft(s) in all" in text
