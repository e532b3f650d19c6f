"""The example apps bundled in shoal.examples do what docs/examples.md says, against the
real engine: in-process nodes, node processes, one of them killed mid-run, and the
documented shell commands."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from typing import Any

import pytest

from shoal import Client, Settings, TaskFailed, TaskHandle, examples
from shoal.app import load_agents
from shoal.examples import chat, pipeline, workload
from tests.conftest import REPO, eventually, node_env, node_process, running_node
from tests.test_cli import shoal as shoal_command

TWO_PARAGRAPHS = (
    "Tides follow the Moon. The Moon pulls the oceans and the oceans rise.\n\n"
    "Reefs grow in warm water. Warm water for too long bleaches reefs."
)


def chunk_total(texts: list[str]) -> int:
    return sum(len(pipeline.split_chunks(text)) for text in texts)


async def summarizer_chunks(client: Client) -> dict[str, int]:
    """How many chunks each summariser agent has recorded in its state."""
    states = {f"summarizer/{k}": await client.agent_state(f"summarizer/{k}") for k in range(4)}
    return {agent: (state or {}).get("chunks", 0) for agent, state in states.items()}


async def process_all(client: Client, docs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    handles = await client.submit_many(
        "process_document", [{"doc_id": d, "text": t} for d, t in docs]
    )
    return list(await asyncio.gather(*(h.result(timeout=30) for h in handles)))


def check_documents(results: list[dict[str, Any]], docs: list[tuple[str, str]]) -> None:
    """Each result is the document's, with the summary computed without Shoal."""
    for result, (doc_id, text) in zip(results, docs, strict=True):
        chunks = pipeline.split_chunks(text)
        assert result["doc_id"] == doc_id
        assert result["chunks"] == len(chunks)
        assert result["summary"] == pipeline.expected_summary(text)
        wanted = {pipeline.summarizer_for(doc_id, i) for i in range(len(chunks))}
        assert result["summarized_by"] == sorted(wanted)


# --- the pure parts ---------------------------------------------------------------


def test_the_text_work_is_deterministic_and_splits_long_paragraphs() -> None:
    long = " ".join(f"Sentence number {i} is here." for i in range(10))
    assert len(pipeline.split_chunks(long)) == 3  # 4 + 4 + 2 sentences
    assert pipeline.split_chunks(TWO_PARAGRAPHS) == [
        "Tides follow the Moon. The Moon pulls the oceans and the oceans rise.",
        "Reefs grow in warm water. Warm water for too long bleaches reefs.",
    ]
    assert pipeline.expected_summary(TWO_PARAGRAPHS) == (
        "The Moon pulls the oceans and the oceans rise. Reefs grow in warm water."
    )
    assert pipeline.expected_summary("") == "" and pipeline.split_chunks("  ") == []
    assert workload.documents(5) == workload.documents(5)
    assert [d for d, _ in workload.documents(3)] == ["doc-0000", "doc-0001", "doc-0002"]
    assert {len(pipeline.split_chunks(t)) for _, t in workload.documents(6)} == {2, 3, 4}


def test_the_chat_script_goes_in_rounds_and_exercises_every_rule() -> None:
    script = workload.chat_script(users=3, turns=8)
    assert len(script) == 24
    assert [u for u, _ in script[:4]] == ["user-00", "user-01", "user-02", "user-00"]
    intents = {chat.match_rule(text)[0] for _, text in script}
    assert intents >= {"greet", "set_name", "remember", "calculate", "get_name", "summarize"}
    assert intents >= {"recall", "history"}


def test_the_calculator_evaluates_arithmetic_only() -> None:
    assert chat.evaluate("2 + 3 * 4") == 14
    assert chat.evaluate("(1 + 2) ^ 3 / 9") == 3
    assert chat.evaluate("7 / 2") == 3.5
    for bad in ["__import__('os')", "2 ** 1000", "1 / 0", "x + 1", "2 +", "True + 1"]:
        with pytest.raises(chat.CalculationError):
            chat.evaluate(bad)


def test_each_app_module_loads_alone_and_the_package_hosts_both() -> None:
    types = {a.agent_type for a in load_agents("shoal.examples")}
    assert types == {"splitter", "summarizer", "reducer", "chat", "calculator"}
    assert {a.agent_type for a in load_agents("shoal.examples.pipeline")} == {
        "splitter", "summarizer", "reducer",
    }  # fmt: skip
    assert set(load_agents("shoal.examples.chat")) == set(examples.agents)


# --- the pipeline -------------------------------------------------------------------


async def test_pipeline_summaries_are_right_and_fan_out_to_stateful_summarizers(
    client: Client, settings: Settings
) -> None:
    docs = workload.documents(12)
    async with running_node(examples.agents, settings) as node:
        results = await process_all(client, docs)
        stats = await client.request("summarizer/1", "stats")
    check_documents(results, docs)
    assert all(len(r["summarized_by"]) >= 2 and r["node"] == node.node_id for r in results)
    counts = await summarizer_chunks(client)
    assert sum(counts.values()) == chunk_total([t for _, t in docs]), "each chunk once"
    assert all(counts.values()), f"every summariser took a share: {counts}"
    assert stats["chunks"] == counts["summarizer/1"] and stats["words"] > 0
    assert len(stats["top_words"]) == 5
    reduced = [await client.agent_state(f"reducer/{k}") or {} for k in range(2)]
    assert sum(r.get("documents", 0) for r in reduced) == len(docs)


async def test_pipeline_progress_event_and_an_empty_document(
    client: Client, settings: Settings
) -> None:
    async with running_node(pipeline.agents, settings):
        handle = await client.submit("process_document", doc_id="tides", text=TWO_PARAGRAPHS)
        kinds = [(e.kind, e.data) async for e in handle.events()]
        empty = await client.call("process_document", doc_id="empty", text="", result_timeout=10)
    assert ("progress", {"fraction": 0.9, "message": "2 chunk(s) summarised"}) in kinds
    assert (empty["chunks"], empty["summary"], empty["summarized_by"]) == (0, "", [])


# --- the chat -----------------------------------------------------------------------


async def talk(client: Client, user: str, *lines: str) -> list[dict[str, Any]]:
    """Send lines to chat/<user> (queued at once: the agent answers them in order)."""
    handles = [await client.submit("chat", agent=f"chat/{user}", text=line) for line in lines]
    return [await h.result(timeout=30) for h in handles]


async def test_chat_remembers_per_user_and_counts_turns(client: Client, settings: Settings) -> None:
    async with running_node(chat.agents, settings):
        alice = await talk(client, "alice", "hi", "My name is Alice", "remember that tides turn")
        bob = await talk(client, "bob", "hello", "who am I?")
        later = await talk(client, "alice", "hi", "what is my name?", "what do you remember?")
        said = await client.request("chat/alice", {"text": "what did I say?"})
    assert [r["turn"] for r in alice + later] == [1, 2, 3, 4, 5, 6]
    assert [r["turn"] for r in bob] == [1, 2] and {r["user"] for r in bob} == {"bob"}
    assert alice[0]["reply"] == "Hello! What is your name?"
    assert later[0]["reply"] == "Hello, Alice!"
    assert later[1]["reply"] == "Your name is Alice."
    assert later[2]["reply"] == "I remember: your name is Alice; tides turn."
    assert bob[1]["reply"] == "I don't know your name yet."
    assert said["turn"] == 7 and said["reply"] == "You said: 'what do you remember?'."
    state = await client.agent_state("chat/alice") or {}
    assert state["turns"] == 7 and state["facts"] == {"name": "Alice", "notes": ["tides turn"]}
    assert len(state["recent"]) == chat.RECENT_LINES  # the window is bounded


async def test_chat_calls_the_calculator_and_the_pipeline(
    client: Client, settings: Settings
) -> None:
    async with running_node(chat.agents, settings):
        lines = ["calculate: 2 + 3 * 4", "what is 1 / 0?", f"summarize: {TWO_PARAGRAPHS}"]
        calc, bad, summary = await talk(client, "carol", *lines)
        plain = await client.call("calculate", expression="2 ^ 10", result_timeout=10)
        asked = await client.request("chat/carol", "what is 6 * 7?")  # a message turn
        with pytest.raises(TaskFailed, match="address it"):
            await client.call("chat", text="hi", result_timeout=10)
    assert (calc["intent"], calc["reply"]) == ("calculate", "2 + 3 * 4 = 14")
    assert bad["reply"] == "I can't calculate that: division by zero"
    assert summary["intent"] == "summarize"
    assert summary["reply"] == f"Summary (2 chunk(s)): {pipeline.expected_summary(TWO_PARAGRAPHS)}"
    assert plain == 1024
    assert (asked["turn"], asked["reply"]) == (4, "6 * 7 = 42")
    assert sum((await summarizer_chunks(client)).values()) == 2  # the chat's document


# --- two node processes, one killed while documents are in flight --------------------


async def run_chat_script(client: Client, script: list[tuple[str, str]]) -> list[TaskHandle]:
    return [await client.submit("chat", agent=f"chat/{user}", text=text) for user, text in script]


@pytest.mark.slow
async def test_every_document_and_chat_turn_completes_when_a_node_is_killed(
    client: Client, settings: Settings
) -> None:
    docs = workload.documents(400)
    script = workload.chat_script(users=4, turns=8)
    with (
        node_process(settings, "shoal.examples") as victim,
        node_process(settings, "shoal.examples"),
    ):
        await client.wait_for_hosts("process_document", count=2, timeout=20)
        handles = await client.submit_many(
            "process_document", [{"doc_id": d, "text": t} for d, t in docs]
        )
        turns = await run_chat_script(client, script)
        await eventually(lambda: first_done(handles, 20), "20 documents done", timeout=20)
        victim.send_signal(signal.SIGKILL)
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        replies = await asyncio.gather(*(h.result(timeout=30) for h in turns))
        infos = await asyncio.gather(*(h.status() for h in handles))
    check_documents(list(results), docs)
    assert any(i.attempts > 1 for i in infos), "the kill hit documents in flight"
    check_chat(script, list(replies))
    summarised = [t for _, t in docs] + [line[len("summarize: ") :] for _, line in script
                                          if line.startswith("summarize: ")]  # fmt: skip
    counts = await summarizer_chunks(client)
    assert sum(counts.values()) == chunk_total(summarised), "no chunk summarised twice"


async def first_done(handles: list[TaskHandle], count: int) -> bool:
    done = 0
    for handle in handles:
        done += (await handle.status()).done
        if done >= count:
            return True
    return False


def check_chat(script: list[tuple[str, str]], replies: list[dict[str, Any]]) -> None:
    """Every user's turns are numbered 1, 2, ... in the order sent (each turn counted
    once, even one replayed on a survivor), and the summaries are right."""
    seen: dict[str, int] = {}
    for (user, line), reply in zip(script, replies, strict=True):
        seen[user] = seen.get(user, 0) + 1
        assert (reply["user"], reply["turn"]) == (user, seen[user])
        if line.startswith("summarize: "):
            assert reply["reply"].endswith(pipeline.expected_summary(line[11:]))


# --- the shell commands of docs/examples.md and README.md ----------------------------

DOC_TEXT = (
    "Tides follow the Moon. The Moon pulls the oceans. The oceans rise twice a day. "
    "Tides are highest at full Moon. Reefs grow in warm water. Warm water bleaches reefs."
)

README_TEXT = "Tides follow the Moon. The Moon pulls the oceans."


async def test_the_documented_commands_work(client: Client, settings: Settings) -> None:
    with node_process(settings, "shoal.examples.pipeline"):
        await client.wait_for_hosts("process_document", timeout=20)
        doc = await run(settings, "submit", "process_document", "doc_id=tides",
                        f"text={DOC_TEXT}", "--wait")  # fmt: skip
        short = await run(settings, "submit", "process_document", "doc_id=tides",
                          f"text={README_TEXT}", "--wait")  # fmt: skip
        stats = await run(settings, "request", "summarizer/0", '"stats"')
    with node_process(settings, "shoal.examples.chat"):
        await client.wait_for_hosts("chat", timeout=20)
        hello = await run(settings, "call", "chat", "--agent", "chat/alice",
                          "text=my name is Alice")  # fmt: skip
        name = await run(settings, "request", "chat/alice", '{"text": "what is my name?"}')
        calc = await run(settings, "submit", "calculate", "expression=2 + 3 * 4", "--wait")
        state = await shoal_command(settings, "agent", "chat/alice", "--state")
    assert doc["chunks"] == 2 and doc["summary"] == pipeline.expected_summary(DOC_TEXT)
    assert doc["summary"] == "Tides follow the Moon. Reefs grow in warm water."
    assert doc["summarized_by"] == ["summarizer/0", "summarizer/3"]
    assert short["summary"] == "Tides follow the Moon."
    assert stats == {"agent": "summarizer/0", "chunks": 1, "words": 8,
                     "top_words": ["reefs", "warm", "water", "bleaches", "grow"]}  # fmt: skip
    assert (hello["reply"], hello["turn"]) == ("Nice to meet you, Alice.", 1)
    assert (name["reply"], name["turn"]) == ("Your name is Alice.", 2)
    assert calc == 14
    assert state[0] == 0 and '"name": "Alice"' in state[1] and '"turns": 2' in state[1]


async def test_the_documented_python_example_runs(settings: Settings) -> None:
    text = (REPO / "docs" / "examples.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]  # the first Python block
    async with running_node(examples.agents, settings):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, cwd=REPO, env=node_env(settings),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
    lines = output.decode().splitlines()
    assert proc.returncode == 0, output.decode()
    assert lines[0].startswith("doc-0000 ") and len(lines) == 21
    assert lines[-1] == "1 6 * 7 = 42"


async def run(settings: Settings, *args: str) -> Any:
    code, out, err = await shoal_command(settings, *args)
    assert code == 0, err
    return json.loads(out)


def test_documented_commands_are_in_the_docs() -> None:
    """The commands tested above are the ones the docs show."""
    readme, guide = ((REPO / name).read_text() for name in ("README.md", "docs/examples.md"))
    submit = "shoal submit process_document doc_id=tides text="
    assert f'{submit}"{README_TEXT}" --wait' in readme
    assert f'{submit}"{DOC_TEXT}" --wait' in guide
    for command in [
        "shoal node --app shoal.examples.pipeline",
        "shoal request summarizer/0 '\"stats\"'",
    ]:
        assert command in readme and command in guide, command
    for command in [
        "shoal node --app shoal.examples.chat",
        "shoal node --app shoal.examples ",
        'shoal call chat --agent chat/alice text="my name is Alice"',
        'shoal request chat/alice \'{"text": "what is my name?"}\'',
        'shoal submit calculate expression="2 + 3 * 4" --wait',
        "shoal agent chat/alice --state",
    ]:
        assert command in guide, command
