"""The response cache (shoal.llm.response_cache) against a real engine and the real
test model server: deterministic requests answered once (across clients and
processes, streamed or not), every other request passed through, broken answers
never kept, hits and misses counted (helper process: tests/llm_cache_procs.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.engine import EmbeddedEngine
from shoal.llm import Completion, LLMClient, LLMStreamBroken, StreamDelta
from shoal.llm.response_cache import CachedModel, request_key
from shoal.observability import metrics
from shoal.testing.llm_server import LLMServer
from tests.conftest import helper_process, read_line
from tests.llm_cache_procs import CACHE, MODEL
from tests.test_llm_client import collect

HELLO = [{"role": "user", "content": "hello there"}]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


@pytest.fixture
async def llm(model_server: LLMServer) -> AsyncIterator[LLMClient]:
    async with LLMClient(model_server.url, model=MODEL) as client:
        yield client


@pytest.fixture
async def cached(llm: LLMClient, client: Client, request: pytest.FixtureRequest) -> CachedModel:
    """A cached model whose agent type is the test's name (its own metric series)."""
    return CachedModel(llm, client.cache(CACHE, ttl=60), agent_type=request.node.name)


def requests(server: LLMServer) -> int:
    return server.stats.requests


def counted(agent_type: str, result: str) -> float:
    sample = metrics.REGISTRY.get_sample_value(
        "shoal_llm_response_cache_total", {"agent_type": agent_type, "result": result}
    )
    return sample or 0.0


# --- complete ------------------------------------------------------------------------


async def test_a_repeated_temperature_zero_request_is_served_without_asking_the_model(
    cached: CachedModel, model_server: LLMServer
) -> None:
    first = await cached.complete(HELLO, temperature=0)
    before = requests(model_server)
    again = await cached.complete(HELLO, temperature=0.0, key="another-conversation")
    assert requests(model_server) == before  # no request reached the server
    assert first.cached is False and again.cached is True
    assert again.content == first.content == "You said: hello there"
    assert (again.id, again.usage, again.finish_reason) == (first.id, first.usage, "stop")


async def test_a_different_message_model_tools_or_parameter_is_a_miss(
    cached: CachedModel, model_server: LLMServer
) -> None:
    await cached.complete(HELLO, temperature=0)
    variants: list[tuple[Sequence[Mapping[str, Any]], dict[str, Any]]] = [
        ([{"role": "user", "content": "hello here"}], {}),
        (HELLO, {"model": "other-model"}),
        (HELLO, {"tools": TOOLS}),
        (HELLO, {"max_tokens": 50}),
        (HELLO, {"seed": 7}),
        ([{"role": "system", "content": "be brief"}, *HELLO], {}),
    ]
    for messages, params in variants:
        before = requests(model_server)
        answer = await cached.complete(messages, temperature=0, **params)
        assert requests(model_server) == before + 1, params
        assert answer.cached is False
    assert (await cached.complete(HELLO, temperature=0, tools=[])).cached  # same as none


async def test_requests_that_are_not_deterministic_pass_through_uncounted(
    cached: CachedModel, model_server: LLMServer, request: pytest.FixtureRequest
) -> None:
    calls: list[dict[str, Any]] = [{}, {"temperature": 0.7}, {"temperature": 0, "n": 2}]
    for params in calls * 2:
        before = requests(model_server)
        answer = await cached.complete(HELLO, **params)
        assert requests(model_server) == before + 1, params
        assert answer.cached is False
        _, done = await collect(cached.stream(HELLO, **params))
        assert requests(model_server) == before + 2 and done.cached is False
    name = request.node.name
    assert counted(name, "hit") == counted(name, "miss") == 0


async def test_hits_and_misses_are_counted_per_agent_type(
    cached: CachedModel, request: pytest.FixtureRequest
) -> None:
    answers = metrics.REGISTRY.get_sample_value(
        "shoal_llm_answers_total", {"provider": "-", "source": "cache"}
    )
    for _ in range(3):
        await cached.complete(HELLO, temperature=0)
    await collect(cached.stream(HELLO, temperature=0))
    name = request.node.name
    assert (counted(name, "miss"), counted(name, "hit")) == (1, 3)
    after = metrics.REGISTRY.get_sample_value(
        "shoal_llm_answers_total", {"provider": "-", "source": "cache"}
    )
    assert after == (answers or 0) + 3


async def test_an_answer_of_tool_calls_is_stored_and_rebuilt_whole(
    cached: CachedModel, model_server: LLMServer
) -> None:
    ask = [{"role": "user", "content": 'please use add({"a": 1, "b": [2, 3]})'}]
    first = await cached.complete(ask, tools=TOOLS, temperature=0)
    assert first.finish_reason == "tool_calls" and first.tool_calls
    before = requests(model_server)
    _, again = await collect(cached.stream(ask, tools=TOOLS, temperature=0))
    assert requests(model_server) == before
    assert again.cached and again.tool_calls == first.tool_calls
    assert again.tool_calls[0].arguments == {"a": 1, "b": [2, 3]}


class Unfinished:
    """A model whose answers never finish properly (a content filter cut them)."""

    model = MODEL

    def __init__(self) -> None:
        self.calls = 0

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion:
        self.calls += 1
        return Completion("partial", [], "content_filter", None, MODEL, f"cut-{self.calls}")

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamDelta]:
        yield StreamDelta(done=True, completion=await self.complete(messages))

    async def aclose(self) -> None:
        return None


async def test_an_answer_that_did_not_finish_is_returned_but_never_stored(
    client: Client,
) -> None:
    inner = Unfinished()
    model = CachedModel(inner, client.cache(CACHE, ttl=60))
    first = await model.complete(HELLO, temperature=0)
    second = await model.complete(HELLO, temperature=0)
    _, streamed = await collect(model.stream(HELLO, temperature=0))
    assert inner.calls == 3
    assert [a.id for a in (first, second, streamed)] == ["cut-1", "cut-2", "cut-3"]
    assert not any(a.cached for a in (first, second, streamed))


# --- stream --------------------------------------------------------------------------


async def test_a_stream_miss_flows_from_the_model_and_its_answer_serves_the_next_calls(
    cached: CachedModel, model_server: LLMServer
) -> None:
    ask = [{"role": "user", "content": "tell me four short words"}]
    before = requests(model_server)
    pieces, done = await collect(cached.stream(ask, temperature=0))
    assert requests(model_server) == before + 1 and model_server.stats.streams >= 1
    assert "".join(pieces) == done.content == "You said: tell me four short words"
    assert done.cached is False and done.usage is not None

    again, hit = await collect(cached.stream(ask, temperature=0, key="elsewhere"))
    assert requests(model_server) == before + 1
    assert again == pieces  # word-sized deltas, as the model wrote them
    assert hit.cached is True and (hit.id, hit.usage) == (done.id, done.usage)
    whole = await cached.complete(ask, temperature=0)  # one key for both ways of asking
    assert whole.cached is True and requests(model_server) == before + 1


async def test_a_stream_hit_of_a_completed_answer_flows_in_word_sized_pieces(
    cached: CachedModel, model_server: LLMServer
) -> None:
    ask = [{"role": "user", "content": "spread  this\tout please"}]
    first = await cached.complete(ask, temperature=0)
    before = requests(model_server)
    pieces, done = await collect(cached.stream(ask, temperature=0))
    assert requests(model_server) == before
    assert len(pieces) == 6 and "".join(pieces) == first.content
    assert done.cached is True and done.content == first.content


async def test_a_broken_stream_is_not_stored(cached: CachedModel, model_server: LLMServer) -> None:
    model_server.settings.die_after_chunks = 3
    with pytest.raises(LLMStreamBroken):
        await collect(cached.stream(HELLO, temperature=0))
    model_server.settings.die_after_chunks = None
    before = requests(model_server)
    _, done = await collect(cached.stream(HELLO, temperature=0))
    assert requests(model_server) == before + 1 and done.cached is False
    assert (await cached.complete(HELLO, temperature=0)).cached is True


# --- across clients and processes ----------------------------------------------------


async def test_twenty_concurrent_identical_misses_in_two_clients_ask_the_model_once(
    settings: Settings, model_server: LLMServer, request: pytest.FixtureRequest
) -> None:
    model_server.settings.token_delay = 0.05  # the misses overlap
    before = requests(model_server)
    async with (
        Client(settings=settings) as a,
        Client(settings=settings) as b,
        LLMClient(model_server.url, model=MODEL) as llm,
    ):
        name = request.node.name
        models = [CachedModel(llm, c.cache(CACHE, ttl=60), agent_type=name) for c in (a, b)]
        answers = await asyncio.gather(
            *(models[i % 2].complete(HELLO, temperature=0) for i in range(20))
        )
    assert requests(model_server) == before + 1
    assert {a.content for a in answers} == {"You said: hello there"}
    assert sorted(a.cached for a in answers) == [False] + [True] * 19
    assert (counted(name, "miss"), counted(name, "hit")) == (1, 19)


def asker(settings: Settings, url: str, n: int, message: str) -> Any:
    return helper_process(settings, "tests.llm_cache_procs", url, str(n), message)


async def test_another_process_shares_the_single_flight_and_the_stored_answer(
    settings: Settings, cached: CachedModel, model_server: LLMServer
) -> None:
    model_server.settings.token_delay = 0.1
    ask = [{"role": "user", "content": "one answer for all of us"}]
    before = requests(model_server)
    with asker(settings, model_server.url, 10, ask[0]["content"]) as proc:
        assert await read_line(proc, 15) == "ready"
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        ours = await asyncio.gather(*(cached.complete(ask, temperature=0) for _ in range(10)))
        theirs = json.loads(await read_line(proc, 15))
    assert requests(model_server) == before + 1
    expected = "You said: one answer for all of us"
    assert {a.content for a in ours} | {content for content, _ in theirs} == {expected}
    flags = [a.cached for a in ours] + [flag for _, flag in theirs]
    assert flags.count(False) == 1  # the one call that asked the model


async def test_an_unreachable_engine_costs_the_cache_not_the_answer(
    tmp_path: Path, model_server: LLMServer, llm: LLMClient, caplog: pytest.LogCaptureFixture
) -> None:
    engine = EmbeddedEngine(tmp_path / "engine")
    try:
        settings = Settings(url=engine.ensure().url, namespace="llm-cache")
        async with Client(settings=settings) as client:
            model = CachedModel(llm, client.cache(CACHE, ttl=60))
            await model.complete(HELLO, temperature=0)
            engine.stop()
            before = requests(model_server)
            answer = await model.complete(HELLO, temperature=0)
            _, streamed = await collect(model.stream(HELLO, temperature=0))
    finally:
        engine.stop()
    assert requests(model_server) == before + 2  # the model answered both, uncached
    assert answer.content == streamed.content == "You said: hello there"
    assert not answer.cached and not streamed.cached
    assert "response cache 'answers' unavailable, calling the model" in caplog.text


# --- keys and configuration ----------------------------------------------------------


def test_the_key_is_a_hash_of_the_canonical_request_without_the_affinity_key() -> None:
    one = request_key(HELLO, None, {"temperature": 0, "max_tokens": 9, "model": "m"})
    same = request_key(
        [{"content": "hello there", "role": "user"}],
        [],
        {"model": "m", "max_tokens": 9, "temperature": 0.0},
    )
    assert one == same and one is not None and len(one.split(":")[1]) == 64
    assert request_key(HELLO, None, {"temperature": 0}, "m") != request_key(
        HELLO, None, {"temperature": 0}, "n"
    )
    assert request_key(HELLO, None, {"temperature": 0.2}) is None
    assert request_key(HELLO, None, {}) is None
    assert request_key(HELLO, None, {"temperature": False}) is None


async def test_bad_construction_says_what_is_wanted(client: Client, llm: LLMClient) -> None:
    cache = client.cache(CACHE)
    with pytest.raises(ConfigurationError, match="ChatModel"):
        CachedModel(object(), cache)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="Cache"):
        CachedModel(llm, {})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="agent_type"):
        CachedModel(llm, cache, agent_type="")
    with pytest.raises(ConfigurationError, match="JSON"):
        await CachedModel(llm, cache).complete(
            [{"role": "user", "content": object()}], temperature=0
        )


async def test_pools_of_different_models_do_not_share_answers(client: Client) -> None:
    from shoal.llm import Provider, ProviderPool

    with LLMServer(script=["I am model A"]) as a, LLMServer(script=["I am model B"]) as b:
        pool_a = ProviderPool(client, [Provider("pa", model="model-a", base_url=a.url)])
        pool_b = ProviderPool(client, [Provider("pb", model="model-b", base_url=b.url)])
        cache = client.cache("llm-pools", ttl=60)
        first = await CachedModel(pool_a, cache).complete(HELLO, temperature=0)
        second = await CachedModel(pool_b, cache).complete(HELLO, temperature=0)
        again = await CachedModel(pool_b, cache).complete(HELLO, temperature=0)
        await pool_a.aclose()
        await pool_b.aclose()
    assert first.content == "I am model A" and second.content == "I am model B"
    assert again.cached and b.stats.requests == 1
