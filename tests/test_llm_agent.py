"""LLMAgent against the real test model server, a real engine and real nodes: the
answer streamed as ordered token events and followed by a client, memory across
turns with a window and a summary, tool calls as tasks (in parallel, on another
node, to another agent), a model stream broken mid-answer, and a node SIGKILLed
mid-answer whose re-run turn continues the stream without repeating text."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import pytest

from shoal import Client, Settings, TaskFailed
from shoal.apikeys import KeyStore
from shoal.llm import Answer, AnswerPiece, follow_answer
from shoal.llm.client import ENV_API_KEY, ENV_BASE_URL
from shoal.llm.tools import _schema_of
from shoal.observability.metrics import REGISTRY
from shoal.testing.llm_server import LLMServer
from tests import llm_agents
from tests.conftest import node_env, node_process, running_node
from tests.gateways import bearer, serving

LONG = " ".join(f"word{i}" for i in range(60))


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> Iterator[LLMServer]:
    with LLMServer() as server:
        monkeypatch.setenv(ENV_BASE_URL, server.url)
        yield server


async def pieces_of(client: Client, task_id: str) -> list[AnswerPiece]:
    return [piece async for piece in follow_answer(client, task_id)]


def shown(pieces: list[AnswerPiece]) -> str:
    """The text a UI shows after applying the pieces."""
    text = ""
    for piece in pieces:
        text = text[: len(text) - piece.rewind] + piece.text
    return text


async def test_a_turn_streams_its_answer_in_order_and_returns_it(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    async with running_node(llm_agents.agents, settings):
        handle = await client.submit(
            "assistant.chat", agent="assistant/c1", message="hello there friend"
        )
        pieces = await pieces_of(client, handle.id)
        assert await handle.result(timeout=10) == "You said: hello there friend"
    assert shown(pieces) == "You said: hello there friend"
    assert [p.text for p in pieces] == ["You ", "said: ", "hello ", "there ", "friend"]
    offsets = [p.event.data["offset"] for p in pieces]
    assert offsets == [0, 4, 10, 16, 22]  # each token where the previous one ended
    assert all(p.rewind == 0 and p.restart is None for p in pieces)
    events = await client.event_history(handle.id)
    answer = [e.data for e in events if e.kind == "event" and e.data["type"] == "answer"]
    assert answer[0]["usage"] == {"prompt_tokens": 8, "completion_tokens": 5}
    assert answer[0]["cached"] is False
    # the prompt had the system prompt first
    assert model.stats.last_request is not None
    assert model.stats.last_request["messages"][0] == {
        "role": "system",
        "content": "You are a test assistant.",
    }


async def test_memory_is_kept_across_turns_within_the_window_with_a_summary(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    async with running_node(llm_agents.agents, settings):
        for said in ("one", "two", "three"):
            await client.call(
                "forgetful.chat", agent="forgetful/c", message=said, result_timeout=10
            )
        last = model.stats.last_request
        state = await client.agent_state("forgetful/c")
    assert state is not None
    # window 2: the last exchange stays; the earlier user messages are summarised
    assert state["messages"] == [
        {"role": "user", "content": "three"},
        {"role": "assistant", "content": "You said: three"},
    ]
    assert state["summary"] == "one; two"
    assert last is not None
    contents = [m["content"] for m in last["messages"]]
    assert contents[1] == "Summary of the earlier conversation: one"
    assert contents[2:] == ["two", "You said: two", "three"]


async def test_tool_calls_of_one_answer_run_at_once_as_tasks(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    llm_agents.GATE["barrier"] = asyncio.Barrier(2)  # neither returns until both started
    message = 'use meet({"who": "a"}) use meet({"who": "b"})'
    async with running_node(llm_agents.agents, settings, concurrency=8):
        handle = await client.submit("assistant.chat", agent="assistant/g", message=message)
        answer = await handle.result(timeout=20)
    assert answer == "Tool results: a met | b met"
    events = [e.data for e in await client.event_history(handle.id) if e.kind == "event"]
    calls = [e for e in events if e["type"] == "tool_call"]
    results = [e for e in events if e["type"] == "tool_result"]
    assert [(c["name"], c["index"]) for c in calls] == [("meet", 0), ("meet", 1)]
    assert sorted(r["content"] for r in results) == ["a met", "b met"]
    assert all(r["ok"] for r in results)


async def test_tools_run_on_another_node_and_another_agent_answers(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    env = {ENV_BASE_URL: model.url, "LLM_TEST_AGENTS": "tools"}
    with node_process(settings, "tests.llm_agents", "--name", "toolbox", env=env):
        await client.wait_for_hosts("lookup_word", timeout=15)
        await client.wait_for_hosts("helper.chat", timeout=15)
        async with running_node([llm_agents.Assistant], settings, name="asker"):
            message = 'use lookup_word({"word": "abc"}) use helper({"message": "hi"})'
            answer = await client.call(
                "assistant.chat", agent="assistant/t", message=message, result_timeout=20
            )
            # an unknown tool and bad arguments go back to the model, not into a failure
            odd = await client.call(
                "assistant.chat",
                agent="assistant/t",
                message='use lookup_word({"nope": 1})',
                result_timeout=20,
            )
        helper_state = await client.agent_state("helper/assistant.t.0")
    assert answer == "Tool results: abc backwards is cba (node toolbox) | You said: hi"
    assert helper_state is not None  # the helper conversation is its own agent
    assert helper_state["messages"][0] == {"role": "user", "content": "hi"}
    assert odd.startswith("Tool results: error: ConfigurationError: tool lookup_word takes")


async def test_a_stream_broken_mid_answer_is_asked_again_without_repeating_text(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    model.settings.die_after_chunks = 4  # role + 3 tokens, then the connection dies
    model.settings.die_count = 1
    async with running_node(llm_agents.agents, settings):
        handle = await client.submit("assistant.chat", agent="assistant/b", message="a b c d e f")
        pieces = await pieces_of(client, handle.id)
        assert await handle.result(timeout=10) == "You said: a b c d e f"
    assert shown(pieces) == "You said: a b c d e f"
    restarts = [p for p in pieces if p.restart]
    assert len(restarts) == 1 and restarts[0].restart is not None
    assert restarts[0].restart["kept"] == len("You said: a ")  # what the first stream said
    assert "stream broke" in restarts[0].restart["reason"]
    assert "".join(p.text for p in pieces) == "You said: a b c d e f"  # nothing twice
    assert model.stats.streams == 2


def _replay(events: list[Any]) -> Answer:
    answer = Answer()
    for data in events:
        answer.apply(data)
    return answer


@pytest.mark.slow
async def test_a_node_killed_mid_answer_the_rerun_continues_the_stream(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    model.settings.token_delay = 0.04  # 62 tokens: ~2.5 s of answer
    env = {ENV_BASE_URL: model.url, "LLM_TEST_AGENTS": "assistant"}
    with (
        node_process(settings, "tests.llm_agents", "--name", "n1", env=env) as n1,
        node_process(settings, "tests.llm_agents", "--name", "n2", env=env) as n2,
    ):
        procs = {"n1": n1, "n2": n2}
        await client.wait_for_hosts("assistant.chat", count=2, timeout=15)
        handle = await client.submit("assistant.chat", agent="assistant/k", message=LONG)
        pieces: list[AnswerPiece] = []
        follower = follow_answer(client, handle.id)
        async for piece in follower:
            pieces.append(piece)
            if len(pieces) == 10:
                break
        owner = (await handle.status()).node
        assert owner in procs
        procs[owner].send_signal(signal.SIGKILL)
        procs[owner].wait()
        resumed = follow_answer(client, handle.id, after=pieces[-1].event.id)
        pieces += [piece async for piece in resumed]
        result = await handle.result(timeout=30)
        info = await handle.status()
    expected = f"You said: {LONG}"
    assert result == expected
    assert info.attempts == 2 and info.node != owner
    assert shown(pieces) == expected
    restarts = [p for p in pieces if p.restart]
    assert len(restarts) == 1 and restarts[0].restart is not None
    marker = restarts[0].restart
    assert marker["attempt"] == 2
    before = pieces[: pieces.index(restarts[0])]
    # the marker keeps exactly what the client had; the text after it is new
    assert marker["kept"] == len(shown(before)) >= len("You said: word0 ")
    assert all(p.rewind == 0 for p in pieces)
    assert "".join(p.text for p in pieces) == expected  # no text twice
    # the whole event history replays to the same answer
    events = [e.data for e in await client.event_history(handle.id) if e.kind == "event"]
    assert _replay(events).text == expected


async def _sse_tokens(
    response: httpx.Response, stop_after: int | None = None
) -> tuple[list[str], str | None]:
    """Token texts from an SSE response (and the last event id read), stopping
    after ``stop_after`` tokens or at the stream's end."""
    texts: list[str] = []
    last_id: str | None = None
    event_id: str | None = None
    async for line in response.aiter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            last_id = event_id
            event = json.loads(line[5:])
            data = event.get("data")
            if isinstance(data, dict) and data.get("type") == "token":
                texts.append(data["text"])
                if stop_after is not None and len(texts) == stop_after:
                    break
    return texts, last_id


async def test_http_followers_resume_the_token_stream_with_last_event_id(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    model.settings.token_delay = 0.02
    async with (
        running_node(llm_agents.agents, settings),
        serving(settings) as url,
        httpx.AsyncClient(base_url=url, timeout=20) as api,
    ):
        body = {"capability": "assistant.chat", "agent": "assistant/h", "args": {"message": LONG}}
        submitted = (await api.post("/v1/tasks", json=body)).json()
        path = f"/v1/tasks/{submitted['id']}/events"
        async with api.stream("GET", path) as first:
            head, cut = await _sse_tokens(first, stop_after=5)
        assert cut is not None  # the connection is dropped here, mid-answer
        async with api.stream("GET", path, headers={"Last-Event-ID": cut}) as second:
            rest, _ = await _sse_tokens(second)
        answer = await client.result(submitted["id"], timeout=10)
    assert len(head) == 5
    assert "".join(head + rest) == answer == f"You said: {LONG}"


SECRET = "sk-test-0123456789abcdef"


async def test_the_api_key_is_in_no_log_event_or_error(
    client: Client,
    settings: Settings,
    model: LLMServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    model.settings.api_key = SECRET
    monkeypatch.setenv(ENV_API_KEY, SECRET)
    caplog.set_level(logging.DEBUG)
    async with running_node(llm_agents.agents, settings):
        ok = await client.call("helper.chat", agent="helper/k", message="hi", result_timeout=10)
        model.settings.api_key = SECRET + "-rotated"  # now ours is wrong: 401 echoing it
        handle = await client.submit("helper.chat", agent="helper/k", message="again")
        with pytest.raises(TaskFailed) as failed:
            await handle.result(timeout=10)
        info = await handle.status()
        events = await client.event_history(handle.id)
    assert ok == "You said: hi"
    assert "LLMAuthError" in str(failed.value) and "API key" in str(failed.value)
    assert info.attempts == 1  # an auth error is not retried
    seen = [str(failed.value), repr(info), repr(events), caplog.text]
    assert all(SECRET not in text for text in seen)
    assert model.stats.unauthorized == 1


async def test_an_agent_with_cache_responses_answers_a_repeated_request_from_the_cache(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    async with running_node(llm_agents.agents, settings):
        first = await client.submit("cached.chat", agent="cached/a", message="same question")
        assert await first.result(timeout=10) == "You said: same question"
        second = await client.submit("cached.chat", agent="cached/b", message="same question")
        pieces = await pieces_of(client, second.id)
        assert await second.result(timeout=10) == "You said: same question"
        # a different conversation's second turn is another request: the model answers
        await client.call("cached.chat", agent="cached/a", message="more", result_timeout=10)
    assert model.stats.requests == 2
    assert shown(pieces) == "You said: same question"  # streamed from the cache as well
    answers = [
        e.data
        for e in await client.event_history(second.id)
        if e.kind == "event" and e.data["type"] == "answer"
    ]
    assert answers[0]["cached"] is True


async def test_shoal_chat_prints_the_answer_as_it_is_written(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    env = {**node_env(settings), ENV_BASE_URL: model.url}
    shoal = [sys.executable, "-m", "shoal.cli", "chat"]

    def chat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*shoal, *args], env=env, capture_output=True, text=True, timeout=60)

    with node_process(settings, "tests.llm_agents", env=env):
        await client.wait_for_hosts("helper.chat", timeout=15)
        said = await asyncio.to_thread(chat, "helper/cli", "hello from the shell")
        wrong = await asyncio.to_thread(chat, "helper", "hi")
    assert said.returncode == 0, said.stderr
    assert said.stdout == "You said: hello from the shell\n"
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert "type/key" in wrong.stderr, wrong.stderr


async def test_every_follower_gets_the_whole_answer_before_the_end(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    """A turn's commit (with its task's 'done') is written apart from the batched
    events; it must not overtake the last ones (it did for ~15 % of turns under
    load before the turn waited for its events)."""

    async def events_of(task_id: str) -> list[str]:
        return [
            e.data["type"] if e.kind == "event" else e.kind async for e in client.events(task_id)
        ]

    async with running_node(llm_agents.agents, settings):
        handles = await asyncio.gather(
            *(
                client.submit("helper.chat", agent=f"helper/many{i}", message=f"w{i}")
                for i in range(60)
            )
        )
        followed = await asyncio.gather(*(events_of(h.id) for h in handles))
    for kinds in followed:
        assert kinds[-2:] == ["answer", "done"], kinds


async def test_tokens_are_charged_to_the_turn_the_agent_type_and_the_callers_api_key(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    def spent(agent_type: str, api_key: str, kind: str) -> float:
        labels = {"agent_type": agent_type, "provider": "-", "model": "test", "api_key": api_key,
                  "kind": kind}  # fmt: skip
        return REGISTRY.get_sample_value("shoal_llm_tokens_total", labels) or 0.0

    async with running_node(llm_agents.agents, settings), serving(settings) as url:
        created = await KeyStore(client).create("llm-billing", ["submit", "read"])
        key = created.key.id
        before = spent("assistant", key, "completion"), spent("helper", key, "completion")
        body = {
            "capability": "assistant.chat",
            "agent": "assistant/billed",
            "args": {"message": 'use helper({"message": "one two three"})'},
        }
        async with httpx.AsyncClient(base_url=url, headers=bearer(created.secret)) as http:
            answer = await http.post("/v1/tasks", params={"wait": 15}, json=body)
        outcome = answer.json()["outcome"]
        turn = await client.status(outcome["task"]["id"])
        tool_task = (await client.list_tasks(capability="helper.chat")).tasks[0]
    assert outcome["result"] == "Tool results: You said: one two three"
    # the turn's two model calls: the tool call (1 token) and the answer (7 words)
    assert turn.submitted_by == created.key.id
    assert turn.usage["completion_tokens"] == 1 + 7
    assert turn.usage["prompt_tokens"] > 0
    # the helper's own turn is charged to the same key, in its own record
    assert tool_task.submitted_by == created.key.id and tool_task.usage["completion_tokens"] == 5
    after = spent("assistant", key, "completion"), spent("helper", key, "completion")
    assert after[0] - before[0] == 8 and after[1] - before[1] == 5


async def test_an_agent_keeps_its_replica_and_fails_over_to_the_fallback_provider(
    client: Client, settings: Settings, model: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LLMServer() as replica_a, LLMServer() as replica_b, LLMServer() as hosted:
        monkeypatch.setenv(llm_agents.FALLBACK_URL, hosted.url)
        replicas = {"a": replica_a, "b": replica_b}
        for name, server in replicas.items():
            await client.registry.register("llm-local", server.url, id=name)
        async with running_node(llm_agents.agents, settings):
            for i in range(3):
                await client.call(
                    "routed.chat", agent="routed/c", message=f"t{i}", result_timeout=10
                )
            counts = sorted(s.stats.requests for s in replicas.values())
            for server in replicas.values():
                server.settings.fail_next = 100  # the local provider is down
            handle = await client.submit("routed.chat", agent="routed/c", message="down?")
            answer = await handle.result(timeout=20)
        events = [e.data for e in await client.event_history(handle.id) if e.kind == "event"]
    assert counts == [0, 3]  # one conversation, one replica (its KV cache stays warm)
    assert answer == "You said: down?"
    answered = [e for e in events if e["type"] == "answer"]
    assert answered[0]["provider"] == "hosted" and hosted.stats.answered == 1


WAVERING_RULES = [
    {"system": "wavering", "step": 0, "say": "Checking ({request}).",
     "reply": 'use lookup_word({"word": "abc"})'},
    {"system": "wavering", "step": 1, "reply": "The answer is {results}"},
]  # fmt: skip


async def test_a_rerun_whose_model_says_other_things_rewinds_and_never_repeats_text(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    """Attempt 1 streams call 0 ("Checking (1).") and call 1, then fails; attempt
    2's call 0 says "Checking (3).": clients keep "Checking (", drop the rest —
    call 1's old text too — and get everything new once."""
    model.settings.rules = WAVERING_RULES
    llm_agents.FAIL_AFTER_ANSWERING["on"] = True
    async with running_node(llm_agents.agents, settings):
        handle = await client.submit("wavering.chat", agent="wavering/w", message="why?")
        pieces = await pieces_of(client, handle.id)
        answer = await handle.result(timeout=20)
    assert answer.startswith("The answer is abc backwards is cba")
    assert shown(pieces) == "Checking (3)." + answer
    restarts = [p.restart for p in pieces if p.restart]
    assert restarts[0] == {"type": "restart", "attempt": 2, "call": 0, "kept": len("Checking ("),
                           "reason": "the turn is run again"}  # fmt: skip
    rewound = sum(p.rewind for p in pieces)
    assert rewound == len("1).") + len(answer)  # what attempt 1 said beyond "Checking ("
    assert model.stats.requests == 4  # the tool ran once: its task was found again
    assert (await client.list_tasks(capability="lookup_word")).tasks[0].attempts == 1


async def test_a_redriven_turn_continues_its_stream_behind_a_restart(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    """A redrive starts the attempts at 1 again: the turn still finds what its
    dead run streamed, by the events."""
    llm_agents.FAIL_AFTER_ANSWERING["on"] = True
    async with running_node(llm_agents.agents, settings):
        handle = await client.submit(
            "wavering.chat", agent="wavering/r", message="plain", max_attempts=1
        )
        with pytest.raises(TaskFailed):
            await handle.result(timeout=10)
        llm_agents.FAIL_AFTER_ANSWERING["on"] = False
        assert await client.redrive("wavering.chat", [handle.id]) == [handle.id]
        assert await handle.result(timeout=10) == "You said: plain"
        events = [e.data for e in await client.event_history(handle.id) if e.kind == "event"]
    tokens = "".join(e["text"] for e in events if e["type"] == "token")
    assert tokens == "You said: plain"  # nothing twice
    # the re-run repeats all the client had: it keeps it whole, and nothing is new
    assert [e["kept"] for e in events if e["type"] == "restart"] == [len("You said: plain")]
    assert _replay(events).text == "You said: plain"


async def test_tool_arguments_reach_the_handler_never_the_task_options(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    message = 'use echo_args({"delay": 30, "agent": "nobody/x", "timeout": 1, "q": 2})'
    async with running_node(llm_agents.agents, settings):
        started = time.monotonic()
        answer = await client.call("open.chat", agent="open/o", message=message)
        took = time.monotonic() - started
    assert json.loads(answer.removeprefix("Tool results: ")) == {
        "delay": 30, "agent": "nobody/x", "timeout": 1, "q": 2,
    }  # fmt: skip
    assert took < 10  # not delayed by 30 s


async def test_a_long_turn_is_remembered_whole_even_beyond_the_window(
    client: Client, settings: Settings, model: LLMServer
) -> None:
    async with running_node(llm_agents.agents, settings):
        await client.call("forgetful.chat", agent="forgetful/t", message="hello")
        answer = await client.call(
            "forgetful.chat", agent="forgetful/t", message='use lookup_word({"word": "ab"})'
        )
        state = await client.agent_state("forgetful/t")
    assert answer.startswith("Tool results: ab backwards is ba")
    assert state is not None
    roles = [m["role"] for m in state["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant"]  # window 2, turn kept whole
    assert state["summary"] == "hello"


def test_tool_schemas_are_inferred_with_array_items_and_enums() -> None:
    async def handler(
        self: Any, names: list[str], scores: tuple[float, ...], mode: Literal["a", "b"],
        data: dict[str, Any], anything: list, limit: int | None = None,
    ) -> None: ...  # fmt: skip

    schema, names = _schema_of(handler)
    assert schema["properties"] == {
        "names": {"type": "array", "items": {"type": "string"}},
        "scores": {"type": "array", "items": {"type": "number"}},
        "mode": {"enum": ["a", "b"]},
        "data": {"type": "object"},
        "anything": {"type": "array", "items": {}},
        "limit": {"type": "integer"},
    }
    assert schema["required"] == ["names", "scores", "mode", "data", "anything"]
    assert names == {"names", "scores", "mode", "data", "anything", "limit"}
