"""The model client against a real Chat Completions server (shoal.testing.llm_server)
over real sockets: answers, streams, tool calls, retries, timeouts, typed errors,
and the API key kept out of every message, repr and log line."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import socket
import sys
import time
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shoal.errors import ConfigurationError
from shoal.llm import (
    NO_RETRY,
    Completion,
    LLMAuthError,
    LLMBadRequest,
    LLMClient,
    LLMConnectionError,
    LLMError,
    LLMRateLimited,
    LLMServerError,
    LLMStreamBroken,
    LLMStreamStalled,
    LLMTimeout,
    RetryPolicy,
    StreamDelta,
)
from shoal.llm.client import _retry_after
from shoal.testing.llm_server import LLMServer

KEY = "sk-test-DO-NOT-LEAK-0123456789"
FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05)
HELLO = [{"role": "user", "content": "hello there"}]
TOOLS = [
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
]


@pytest.fixture
async def llm(model_server: LLMServer) -> AsyncIterator[LLMClient]:
    async with LLMClient(model_server.url, model="test-model", retry=FAST_RETRY) as client:
        yield client


async def collect(stream: AsyncIterator[StreamDelta]) -> tuple[list[str], Completion]:
    pieces: list[str] = []
    async for delta in stream:
        if delta.done:
            assert delta.completion is not None
            return pieces, delta.completion
        pieces.append(delta.content)
    raise AssertionError("the stream ended without a done delta")


# --- answers ---------------------------------------------------------------------


async def test_complete_returns_the_answer_and_its_usage(
    llm: LLMClient, model_server: LLMServer
) -> None:
    answer = await llm.complete(HELLO, temperature=0, max_tokens=50, seed=7)
    assert answer.content == "You said: hello there"
    assert answer.finish_reason == "stop"
    assert answer.tool_calls == []
    assert answer.model == "test-model"
    assert answer.id.startswith("chatcmpl-")
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (2, 4)
    assert answer.usage.total_tokens == 6
    sent = model_server.stats.last_request
    assert sent is not None
    assert (sent["temperature"], sent["max_tokens"], sent["seed"]) == (0, 50, 7)
    assert "stream" not in sent


async def test_stream_yields_deltas_in_order_then_the_assembled_answer(
    llm: LLMClient, model_server: LLMServer
) -> None:
    text = "one two three four five six seven eight"
    model_server.settings.script = [text]
    model_server.settings.token_delay = 0.002
    pieces, answer = await collect(llm.stream(HELLO))
    assert pieces == ["one ", "two ", "three ", "four ", "five ", "six ", "seven ", "eight"]
    assert answer.content == text
    assert answer.finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 8
    sent = model_server.stats.last_request
    assert sent is not None
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("ask", "expected"),
    [
        ('please use add({"a": 1, "b": 2})', [("add", {"a": 1, "b": 2})]),
        (
            'use add({"a": 1}) and use lookup({"q": "shoal fish", "n": 3}) please',
            [("add", {"a": 1}), ("lookup", {"q": "shoal fish", "n": 3})],
        ),
    ],
)
async def test_tool_calls_are_parsed_whole_and_assembled_from_a_stream(
    llm: LLMClient, streamed: bool, ask: str, expected: list[tuple[str, dict[str, Any]]]
) -> None:
    messages = [{"role": "user", "content": ask}]
    if streamed:
        pieces, answer = await collect(llm.stream(messages, tools=TOOLS))
        assert pieces == []
    else:
        answer = await llm.complete(messages, tools=TOOLS)
    assert answer.finish_reason == "tool_calls"
    assert [(c.name, c.arguments) for c in answer.tool_calls] == expected
    assert len({c.id for c in answer.tool_calls}) == len(expected)
    assert all(c.id for c in answer.tool_calls)


# --- retries ---------------------------------------------------------------------


async def test_429_waits_the_retry_after_then_succeeds(
    llm: LLMClient, model_server: LLMServer
) -> None:
    model_server.settings.fail_next = 1
    model_server.settings.fail_status = 429
    model_server.settings.retry_after = 0.4
    before = model_server.stats.requests
    started = time.monotonic()
    answer = await llm.complete(HELLO)
    elapsed = time.monotonic() - started
    assert answer.content == "You said: hello there"
    assert model_server.stats.requests - before == 2
    assert 0.4 <= elapsed < 2.0  # waited what the server asked, not the fast backoff


async def test_a_retry_after_beyond_the_bound_is_raised_not_waited(
    llm: LLMClient, model_server: LLMServer
) -> None:
    model_server.settings.fail_next = 1
    model_server.settings.fail_status = 429
    model_server.settings.retry_after = 120
    started = time.monotonic()
    with pytest.raises(LLMRateLimited) as caught:
        await llm.complete(HELLO)
    assert time.monotonic() - started < 2.0
    assert caught.value.retry_after == 120
    assert caught.value.status == 429
    assert "retry after 120" in str(caught.value)


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after("0.5") == 0.5
    assert _retry_after(None) is None
    assert _retry_after("soon") is None
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    parsed = _retry_after(in_ten)
    assert parsed is not None
    assert 8 <= parsed <= 10
    assert _retry_after(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0


@pytest.mark.parametrize("streamed", [False, True])
async def test_5xx_is_retried_then_succeeds(
    llm: LLMClient, model_server: LLMServer, streamed: bool
) -> None:
    model_server.settings.fail_next = 2
    model_server.settings.fail_status = 503
    before = model_server.stats.requests
    if streamed:
        _, answer = await collect(llm.stream(HELLO))
    else:
        answer = await llm.complete(HELLO)
    assert answer.content == "You said: hello there"
    assert model_server.stats.requests - before == 3


async def test_retries_are_bounded_and_no_retry_tries_once(
    llm: LLMClient, model_server: LLMServer
) -> None:
    model_server.settings.fail_next = 10
    before = model_server.stats.requests
    with pytest.raises(LLMServerError) as caught:
        await llm.complete(HELLO)
    assert caught.value.status == 500
    assert model_server.stats.requests - before == FAST_RETRY.attempts
    async with LLMClient(model_server.url, model="m", retry=NO_RETRY) as once:
        with pytest.raises(LLMServerError):
            await once.complete(HELLO)
    assert model_server.stats.requests - before == FAST_RETRY.attempts + 1


async def test_a_stream_that_dies_midway_raises_with_the_partial_text_and_is_not_retried(
    llm: LLMClient, model_server: LLMServer
) -> None:
    model_server.settings.script = ["alpha beta gamma delta epsilon"]
    model_server.settings.die_after_chunks = 4  # the role event, then three tokens
    before = model_server.stats.requests
    seen: list[str] = []

    async def read_all() -> None:
        async for delta in llm.stream(HELLO):
            seen.append(delta.content)

    with pytest.raises(LLMStreamBroken) as caught:
        await read_all()
    assert seen == ["alpha ", "beta ", "gamma "]
    assert caught.value.partial.content == "alpha beta gamma "
    assert caught.value.partial.finish_reason is None
    assert model_server.stats.requests - before == 1  # retrying would repeat the text


# --- typed errors and timeouts ---------------------------------------------------


async def test_a_wrong_key_is_an_auth_error(model_server: LLMServer) -> None:
    model_server.settings.api_key = "the-right-key"
    async with LLMClient(model_server.url, api_key="wrong", model="m", retry=FAST_RETRY) as client:
        before = model_server.stats.requests
        with pytest.raises(LLMAuthError) as caught:
            await client.complete(HELLO)
        assert caught.value.status == 401
        assert "check the API key" in str(caught.value)
        assert model_server.stats.requests - before == 1  # not retried
    async with LLMClient(model_server.url, api_key="the-right-key", model="m") as client:
        assert (await client.complete(HELLO)).content == "You said: hello there"


async def test_an_unknown_path_is_a_bad_request_and_not_retried(model_server: LLMServer) -> None:
    async with LLMClient(model_server.url + "/nowhere", model="m", retry=FAST_RETRY) as client:
        with pytest.raises(LLMBadRequest) as caught:
            await client.complete(HELLO)
    assert caught.value.status == 404
    assert "rejected" in str(caught.value)


async def test_slow_first_token_times_out_on_the_read_timeout(model_server: LLMServer) -> None:
    model_server.settings.first_token_delay = 2.0
    async with LLMClient(model_server.url, model="m", read_timeout=0.2, retry=FAST_RETRY) as client:
        started = time.monotonic()
        with pytest.raises(LLMTimeout):
            await client.complete(HELLO)
        assert time.monotonic() - started < 1.5
        started = time.monotonic()
        with pytest.raises(LLMTimeout) as caught:
            await collect(client.stream(HELLO))
        assert not isinstance(caught.value, LLMStreamBroken)  # nothing had arrived
        assert time.monotonic() - started < 1.5


async def test_a_stream_that_stalls_midway_raises_stalled_with_the_partial_text(
    model_server: LLMServer,
) -> None:
    model_server.settings.script = ["fast slow"]
    model_server.settings.token_delay = 2.0
    async with LLMClient(model_server.url, model="m", read_timeout=0.3) as client:
        started = time.monotonic()
        with pytest.raises(LLMStreamStalled) as caught:
            await collect(client.stream(HELLO))
    assert time.monotonic() - started < 1.5
    assert isinstance(caught.value, LLMTimeout)
    assert caught.value.partial.content == ""  # the role event came, then nothing


async def test_the_total_timeout_bounds_a_stream_that_keeps_trickling(
    model_server: LLMServer,
) -> None:
    model_server.settings.script = [" ".join(["word"] * 50)]
    model_server.settings.token_delay = 0.05
    async with LLMClient(model_server.url, model="m", read_timeout=5, total_timeout=0.5) as client:
        started = time.monotonic()
        with pytest.raises(LLMStreamStalled) as caught:
            await collect(client.stream(HELLO))
    assert 0.5 <= time.monotonic() - started < 1.5
    assert caught.value.partial.content.startswith("word word")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_server_is_a_connection_error_after_the_retries() -> None:
    async with LLMClient(
        f"http://127.0.0.1:{_closed_port()}/v1", model="m", retry=FAST_RETRY
    ) as client:
        with pytest.raises(LLMConnectionError) as caught:
            await client.complete(HELLO)
        assert "is the model server running" in str(caught.value)
        with pytest.raises(LLMConnectionError):
            await collect(client.stream(HELLO))


# --- the API key stays secret ----------------------------------------------------


def _assert_secret(text: str) -> None:
    assert KEY not in text
    assert KEY[8:] not in text  # nor a recognisable part of it


def _assert_error_secret(error: BaseException) -> None:
    seen: BaseException | None = error
    while seen is not None:
        for text in (str(seen), repr(seen), repr(seen.args), repr(vars(seen))):
            _assert_secret(text)
        seen = seen.__cause__ or seen.__context__


async def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    model_server: LLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    model_server.settings.api_key = "another-key"  # the server echoes the wrong key back
    errors: list[LLMError] = []
    async with LLMClient(model_server.url, api_key=KEY, model="m", retry=FAST_RETRY) as client:
        _assert_secret(repr(client))
        _assert_secret(str(vars(client)).replace(repr(KEY), ""))  # only its own slot holds it
        assert "***" in repr(client)
        with pytest.raises(LLMAuthError) as auth:
            await client.complete(HELLO)
        errors.append(auth.value)
        with pytest.raises(LLMAuthError) as auth_stream:
            await collect(client.stream(HELLO))
        errors.append(auth_stream.value)
        model_server.settings.api_key = KEY
        for status in (429, 500, 400):
            model_server.settings.fail_next, model_server.settings.fail_status = 10, status
            model_server.settings.retry_after = 0.01
            with pytest.raises(LLMError) as failed:
                await client.complete(HELLO)
            errors.append(failed.value)
        model_server.settings.fail_next = 0
        model_server.settings.die_after_chunks = 2
        with pytest.raises(LLMStreamBroken) as broken:
            await collect(client.stream(HELLO))
        errors.append(broken.value)
        model_server.settings.die_after_chunks = None
        model_server.settings.first_token_delay = 1.0
    async with LLMClient(model_server.url, api_key=KEY, model="m", read_timeout=0.1) as client:
        with pytest.raises(LLMTimeout) as timed_out:
            await client.complete(HELLO)
        errors.append(timed_out.value)
    async with LLMClient(f"http://127.0.0.1:{_closed_port()}/v1", api_key=KEY, model="m") as client:
        with pytest.raises(LLMConnectionError) as unreachable:
            await client.complete(HELLO)
        errors.append(unreachable.value)
    assert len(errors) == 8
    assert any("Incorrect API key provided: ***" in str(e) for e in errors)  # echoed, redacted
    for error in errors:
        _assert_error_secret(error)
    assert caplog.records, "DEBUG logging should have captured the calls"
    _assert_secret(caplog.text)
    for record in caplog.records:
        _assert_secret(record.getMessage())


# --- configuration ---------------------------------------------------------------


async def test_configuration_comes_from_the_environment(
    model_server: LLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_server.settings.api_key = KEY
    monkeypatch.setenv("SHOAL_LLM_BASE_URL", model_server.url + "/")
    monkeypatch.setenv("SHOAL_LLM_API_KEY", KEY)
    monkeypatch.setenv("SHOAL_LLM_MODEL", "env-model")
    async with LLMClient() as client:
        answer = await client.complete(HELLO)
    assert answer.model == "env-model"
    async with LLMClient(model="arg-model") as client:  # arguments win over the environment
        assert (await client.complete(HELLO, model="call-model")).model == "call-model"


async def test_a_missing_base_url_or_model_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("SHOAL_LLM_BASE_URL", "SHOAL_LLM_API_KEY", "SHOAL_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigurationError, match="SHOAL_LLM_BASE_URL"):
        LLMClient()
    with pytest.raises(ConfigurationError, match="http"):
        LLMClient("localhost:8000")
    with pytest.raises(ConfigurationError, match="attempts"):
        RetryPolicy(attempts=0)
    async with LLMClient("http://127.0.0.1:9/v1") as client:
        with pytest.raises(ConfigurationError, match="SHOAL_LLM_MODEL"):
            await client.complete(HELLO)
        with pytest.raises(ConfigurationError, match="messages"):
            await client.complete([], model="m")


# --- the server as a process -----------------------------------------------------


SRC = str(Path(__file__).resolve().parents[1] / "src")


async def test_the_server_runs_as_a_process_for_benchmarks() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    args = ["-m", "shoal.testing.llm_server", "--port", "0", "--script", "from a process"]
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=PIPE, env=env)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("READY "), line
        async with LLMClient(f"http://127.0.0.1:{int(line.split()[1])}/v1", model="m") as client:
            _, answer = await collect(client.stream(HELLO))
        assert answer.content == "from a process"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
