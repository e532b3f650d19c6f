"""The research-assistant example (shoal.examples.research) against the real test model
server, a real engine and real nodes: the planner's one answer asks two researchers
at once, the researchers' tools are capabilities over the bundled notes, the writer
turns the findings into the answer, and the answer streams back to the client. And
`shoal up --app shoal.examples.research` without a model: it starts and hosts the
agents, and a question fails with a clear message, not a traceback."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal import Client, Settings, TaskFailed
from shoal.examples import research
from shoal.llm import follow_answer
from shoal.llm.client import ENV_BASE_URL, ENV_MODEL
from shoal.testing.llm_server import LLMServer
from tests.conftest import REPO, node_env, node_process, running_node
from tests.test_cli import shoal

QUESTION = "How does Shoal keep working when a node dies?"

# What a real model is asked to do by the example's prompts, made deterministic.
RULES: list[dict[str, Any]] = [
    {"system": "You are the planner", "step": 0,
     "reply": 'use researcher({"message": "leases"}) use researcher({"message": "partitions"})'},
    {"system": "You are the planner", "step": 1,
     "reply": 'use writer({"message": "Question: {user_json} Findings: {results_json}"})'},
    {"system": "You are the planner", "step": 2, "reply": "{results}"},
    {"system": "You are a researcher", "step": 0,
     "reply": 'use search_notes({"query": "{user_json}"}) '
              'use fetch_note({"note_id": "{user_json}"})'},
]  # fmt: skip


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[LLMServer]:
    with LLMServer(rules=RULES) as server:
        monkeypatch.setenv(ENV_BASE_URL, server.url)
        monkeypatch.setenv(ENV_MODEL, "test")
        yield server


def test_the_notes_search_is_deterministic_and_ranked() -> None:
    found = research.search("what happens when a node dies and its lease expires")
    assert found[0]["id"] == "leases"
    assert research.search("lease node") == research.search("lease node")
    assert research.search("zebra quantum") == []
    assert len(research.search("the node and the engine")) <= research.SEARCH_RESULTS


def events_of(data: list[Any], kind: str) -> list[dict[str, Any]]:
    return [d for d in data if isinstance(d, dict) and d.get("type") == kind]


async def test_the_planner_asks_researchers_at_once_then_the_writer_and_streams_the_answer(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    env = {ENV_BASE_URL: model.url, ENV_MODEL: "test"}
    with node_process(settings, "shoal.examples.research", "--name", "other", env=env):
        await client.wait_for_hosts("researcher.chat", timeout=15)
        async with running_node(research.agents, settings, name="here", concurrency=8):
            handle = await client.submit("planner.chat", agent="planner/q1", message=QUESTION)
            streamed = "".join([p.text async for p in follow_answer(client, handle.id)])
            answer = await handle.result(timeout=20)
            history = await client.event_history(handle.id)
        states = {
            a: await client.agent_state(a)
            for a in ("researcher/planner.q1.0", "researcher/planner.q1.1", "writer/planner.q1.0")
        }
    assert streamed == answer, "the client saw the answer as it was written"
    assert answer.startswith(f"You said: Question: {QUESTION} Findings: Tool results: ")
    assert "[leases] Leases and node death: A node holds a lease" in answer
    assert "[partitions] Virtual agents and partitions: Agents are virtual" in answer
    data = [e.data for e in history if e.kind == "event"]
    calls = [(c["call"], c["index"], c["name"]) for c in events_of(data, "tool_call")]
    # both researchers were asked in one answer (run at once), the writer after them
    assert calls == [(0, 0, "researcher"), (0, 1, "researcher"), (1, 0, "writer")]
    assert all(r["ok"] for r in events_of(data, "tool_result"))
    for key, topic in (
        ("researcher/planner.q1.0", "leases"),
        ("researcher/planner.q1.1", "partitions"),
    ):
        state = states[key]
        assert state is not None, f"{key} answered as its own conversation"
        tools = [m["content"] for m in state["messages"] if m["role"] == "tool"]
        assert json.loads(tools[0])[0]["id"] == topic, "search_notes ran"
        assert tools[1].startswith(f"[{topic}] "), "fetch_note ran"
    assert states["writer/planner.q1.0"] is not None
    assert model.stats.answered == 1 + 2 * 2 + 1 + 2  # planner 3, researchers 2 each, writer


async def test_without_a_model_endpoint_a_question_fails_saying_so(
    client: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_BASE_URL, raising=False)
    async with running_node(research.agents, settings):
        with pytest.raises(TaskFailed, match="no model endpoint configured") as failed:
            await client.call("planner.chat", agent="planner/x", message="hi", result_timeout=10)
        info = await client.status(failed.value.task_id)
    assert info.attempts == 1, "not retried: another try cannot fix it"


async def test_shoal_up_hosts_the_example_and_warns_without_a_model(
    client: Client, settings: Settings, tmp_path: Path
) -> None:
    env = {k: v for k, v in node_env(settings).items() if not k.startswith("SHOAL_LLM_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "up", "--app", "shoal.examples.research",
        "--nodes", "1", "--no-gateway", "--grace", "5", "--data-dir", str(tmp_path),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for name in ("planner.chat", "researcher.chat", "writer.chat", "search_notes"):
            await client.wait_for_hosts(name, timeout=20)
        code, out, err = await shoal(settings, "call", "planner.chat", "--agent", "planner/q",
                                     "message=hello", env=env)  # fmt: skip
        proc.send_signal(signal.SIGINT)
        up_out, up_err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out + err
    assert code != 0 and "no model endpoint configured" in text and ENV_BASE_URL in text
    assert "Traceback" not in text
    shown = (up_out + up_err).decode()
    assert f"no model endpoint configured ({ENV_BASE_URL} is not set)" in shown
    assert ENV_MODEL in shown and "Traceback" not in shown
    assert 'shoal chat planner/first "Hello!"' in shown  # the first-task hint talks to it
    assert proc.returncode == 0, shown


async def test_a_follow_up_question_continues_the_planner_conversation(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    model.settings.rules = []  # plain echo: the memory is what is checked
    async with running_node(research.agents, settings):
        first = await client.call("planner.chat", agent="planner/q2", message="one",
                                  result_timeout=10)  # fmt: skip
        await client.call("planner.chat", agent="planner/q2", message="two", result_timeout=10)
        request = model.stats.last_request
    state = await client.agent_state("planner/q2")
    assert state is not None
    assert first == "You said: one"
    assert [m["content"] for m in state["messages"]] == [
        "one", "You said: one", "two", "You said: two",
    ]  # fmt: skip
    assert (
        request is not None and request["messages"][0]["content"] == research.Planner.system_prompt
    )
