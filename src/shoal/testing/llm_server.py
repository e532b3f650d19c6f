"""A small, real, deterministic model server speaking the Chat Completions API.

Shoal's model plane is tested and benchmarked against real sockets, real SSE
streams and real dropped connections; only the model is fake. This server answers
``POST /v1/chat/completions`` (and ``/chat/completions``), streaming or not:

- the answer is the next line of ``script`` (in turn, cycling), or else
  ``"You said: <last user message>"``; it is split into word tokens, each sent
  after ``token_delay`` (the first after ``first_token_delay`` too);
- when the request has ``tools`` and the last user message contains
  ``use NAME({...json...})`` for a tool it lists, the answer is those tool calls,
  in order (``finish_reason="tool_calls"``); streamed arguments come in pieces;
  when the conversation ends with tool results, the answer is
  ``"Tool results: <first> | <second>..."``;
- an answer longer than the request's ``max_tokens`` is cut there
  (``finish_reason="length"``), as a real server does;
- ``usage`` counts words: prompt = words of all messages, completion = tokens sent;
  a stream sends it last when ``stream_options.include_usage`` asks;
  ``stats.request_times`` / ``stats.token_log`` record when requests came and
  tokens went (for quota tests; they grow with every request);
- knobs (``LLMServerSettings``, changed in-process or by ``POST /_control``):
  ``api_key`` (401 otherwise, with the wrong key echoed in the error like some
  providers do: clients must redact it), ``fail_next`` requests answered
  ``fail_status`` (+ ``Retry-After: retry_after``), ``die_after_chunks`` (a stream
  is cut, connection closed, after N SSE events; only ``die_count`` streams when
  set); ``GET /_stats`` counts;
- ``rules`` script multi-agent flows: each is ``{"system": S, "step": N, "reply": R}``
  and applies when the system prompt contains ``S`` and the request is the
  ``N``-th model call after the last user message (0: the first; 1: after one round
  of tool results...; no ``step``: any); the first that applies answers ``R``, in
  which ``use NAME({...})`` calls to offered tools become tool calls (their JSON
  may nest) and ``{user}`` / ``{results}`` are replaced by the last user message
  and the trailing tool results (`` | ``-joined); ``{user_json}`` /
  ``{results_json}`` are the same escaped to sit inside a JSON string; ``{request}``
  is the number of the request (so a re-asked call gets another answer). A rule's
  ``say`` is text sent along with its tool calls (default none).

In-process (a thread with its own event loop, so sync and async tests use it):

    with LLMServer(token_delay=0.01) as server:
        client = LLMClient(server.url, model="test")

As a process, for benchmarks: ``python -m shoal.testing.llm_server --port 8000
--token-delay 0.02`` prints ``READY <port>`` once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shoal.errors import ConfigurationError

__all__ = ["LLMServer", "LLMServerSettings", "create_app", "main"]

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
_GRACEFUL_S = 1
_TOOL_USE = re.compile(r"use (\w+)\((\{.*?\})\)")
_TOKEN = re.compile(r"\S+\s*")
_TOOL_START = re.compile(r"use (\w+)\((?=\{)")
_DECODER = json.JSONDecoder()


@dataclass
class LLMServerSettings:
    """What the server does with the next requests; every field is a key of
    ``POST /_control``."""

    api_key: str | None = None  # required as "Authorization: Bearer <key>" when set
    token_delay: float = 0.0  # seconds before each token
    first_token_delay: float = 0.0  # and before the first one (time to first token)
    fail_next: int = 0  # the next N requests fail (counted down per request)
    fail_status: int = 500
    retry_after: float | None = None  # sent as Retry-After with each failure
    die_after_chunks: int | None = None  # streams are cut after this many SSE events
    die_count: int | None = None  # only this many streams are cut (None: every one)
    script: list[str] = field(default_factory=list)  # answers in turn; empty: echo
    rules: list[dict[str, Any]] = field(default_factory=list)  # see the module doc


@dataclass
class _Stats:
    requests: int = 0
    streams: int = 0
    answered: int = 0  # whole answers sent (a cut stream is not one)
    failures: int = 0  # injected failures
    unauthorized: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_request: dict[str, Any] | None = None
    # when each request arrived and [when, tokens] of each answer's usage (wall
    # clock): what a provider's per-minute quota counts, for quota tests
    request_times: list[float] = field(default_factory=list)
    token_log: list[list[float]] = field(default_factory=list)


class _Model:
    """The fake model and its knobs; one per app."""

    def __init__(self, settings: LLMServerSettings) -> None:
        self.settings = settings
        self.stats = _Stats()
        self._turn = 0

    async def chat(self, request: Request) -> Response:
        s = self.settings
        self.stats.requests += 1
        self.stats.request_times.append(time.time())
        if s.api_key and request.headers.get("authorization") != f"Bearer {s.api_key}":
            self.stats.unauthorized += 1
            given = request.headers.get("authorization", "").removeprefix("Bearer ")
            return _error(
                401, f"Incorrect API key provided: {given or '(none)'}", "invalid_api_key"
            )
        if s.fail_next > 0:
            s.fail_next -= 1
            self.stats.failures += 1
            headers = {"Retry-After": f"{s.retry_after:g}"} if s.retry_after is not None else {}
            return _error(s.fail_status, "injected failure", "server_error", headers)
        try:
            body = json.loads(await request.body())
            messages = body["messages"]
            model = str(body["model"])
            if not isinstance(messages, list) or not messages:
                raise TypeError("messages")
        except (ValueError, KeyError, TypeError):
            return _error(
                400,
                "the body must be JSON with 'model' and a non-empty 'messages' list",
                "invalid_request",
            )
        self.stats.last_request = body
        text, calls = self._answer(messages, body.get("tools") or [])
        text, finish = _within(text, calls, body.get("max_tokens"))
        prompt = sum(len(str(m.get("content") or "").split()) for m in messages)
        if body.get("stream"):
            self.stats.streams += 1
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                self._stream(model, text, calls, prompt, usage, finish),
                media_type="text/event-stream",
            )
        tokens = _TOKEN.findall(text)
        await asyncio.sleep(s.first_token_delay + s.token_delay * len(tokens))
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, name, args in calls
            ]
        done = self._usage(prompt, len(tokens) + len(calls))
        self.stats.answered += 1
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": finish,
        }
        return JSONResponse(
            {**self._head(model, "chat.completion"), "choices": [choice], "usage": done}
        )

    def _answer(
        self, messages: list[Any], tools: list[Any]
    ) -> tuple[str, list[tuple[str, str, str]]]:
        self._turn += 1
        results = _trailing_tool_results(messages)
        ruled = self._by_rule(messages, tools, results)
        if ruled is not None:
            return ruled
        if results:  # the model's next step after its tools answered: say what they said
            return "Tool results: " + " | ".join(results), []
        last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1])
        said = str(last.get("content") or "")
        names = {t.get("function", {}).get("name") for t in tools}
        calls = [
            (f"call_{self._turn}_{i}", name, args)
            for i, (name, args) in enumerate(_TOOL_USE.findall(said))
            if name in names
        ]
        if calls:
            return "", calls
        script = self.settings.script
        return (script[(self._turn - 1) % len(script)] if script else f"You said: {said}"), []

    def _by_rule(
        self, messages: list[Any], tools: list[Any], results: list[str]
    ) -> tuple[str, list[tuple[str, str, str]]] | None:
        system = next((str(m.get("content")) for m in messages if m.get("role") == "system"), "")
        user_at = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        step = sum(1 for m in messages[user_at + 1 :] if m.get("role") == "assistant")
        for rule in self.settings.rules:
            if str(rule.get("system", "")) in system and rule.get("step", step) == step:
                said = str(messages[user_at].get("content") or "") if user_at >= 0 else ""
                reply = _fill(str(rule.get("reply", "")), said, " | ".join(results), self._turn)
                names = {t.get("function", {}).get("name") for t in tools}
                calls = [
                    (f"call_{self._turn}_{i}", name, args)
                    for i, (name, args) in enumerate(_tool_uses(reply))
                    if name in names
                ]
                say = _fill(str(rule.get("say", "")), said, " | ".join(results), self._turn)
                return (say, calls) if calls else (reply, [])
        return None

    async def _stream(
        self,
        model: str,
        text: str,
        calls: list[tuple[str, str, str]],
        prompt: int,
        usage: bool,
        finish: str = "stop",
    ) -> AsyncIterator[bytes]:
        s, head, sent = self.settings, self._head(model, "chat.completion.chunk"), 0
        cut_after = s.die_after_chunks
        if cut_after is not None and s.die_count is not None:
            if s.die_count <= 0:
                cut_after = None
            else:
                s.die_count -= 1

        def event(delta: dict[str, Any] | None, finish: str | None = None, **more: Any) -> bytes:
            nonlocal sent
            if cut_after is not None and sent >= cut_after:
                raise ConnectionAbortedError("die_after_chunks: cutting the stream")
            sent += 1
            choices = (
                [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
            )
            return f"data: {json.dumps({**head, 'choices': choices, **more})}\n\n".encode()

        await asyncio.sleep(s.first_token_delay)
        yield event({"role": "assistant"})
        tokens = _TOKEN.findall(text)
        for token in tokens:
            await asyncio.sleep(s.token_delay)
            yield event({"content": token})
        for i, (cid, name, args) in enumerate(calls):
            await asyncio.sleep(s.token_delay)
            start = {
                "index": i,
                "id": cid,
                "type": "function",
                "function": {"name": name, "arguments": ""},
            }
            yield event({"tool_calls": [start]})
            half = len(args) // 2
            for piece in (args[:half], args[half:]):
                yield event({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
        yield event({}, finish)
        if usage:
            yield event(None, usage=self._usage(prompt, len(tokens) + len(calls)))
        self.stats.answered += 1
        yield b"data: [DONE]\n\n"

    def _usage(self, prompt: int, completion: int) -> dict[str, int]:
        self.stats.prompt_tokens += prompt
        self.stats.completion_tokens += completion
        self.stats.token_log.append([time.time(), prompt + completion])
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _head(self, model: str, kind: str) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self._turn}",
            "object": kind,
            "created": int(time.time()),
            "model": model,
        }

    async def control(self, request: Request) -> Response:
        try:
            changes = json.loads(await request.body() or b"{}")
            apply_settings(self.settings, changes)
        except (ValueError, ConfigurationError) as exc:
            return _error(400, str(exc), "invalid_request")
        return JSONResponse(asdict(self.settings))

    async def read_stats(self, request: Request) -> Response:
        return JSONResponse(asdict(self.stats))

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "shoal-test", "object": "model"}]})


def _trailing_tool_results(messages: list[Any]) -> list[str]:
    """The contents of the tool messages that end the conversation, in order."""
    found: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        found.append(str(message.get("content") or ""))
    return found[::-1]


def _within(text: str, calls: list[tuple[str, str, str]], max_tokens: Any) -> tuple[str, str]:
    """The answer cut at ``max_tokens`` tokens, as a real server does, and its
    finish reason ("length" when cut)."""
    if calls:
        return text, "tool_calls"
    tokens = _TOKEN.findall(text)
    if (
        isinstance(max_tokens, int)
        and not isinstance(max_tokens, bool)
        and max_tokens < len(tokens)
    ):
        return "".join(tokens[:max_tokens]), "length"
    return text, "stop"


def _fill(reply: str, user: str, results: str, request: int) -> str:
    values = {
        "{request}": str(request),
        "{user_json}": json.dumps(user)[1:-1],
        "{results_json}": json.dumps(results)[1:-1],
        "{user}": user,
        "{results}": results,
    }
    for placeholder, value in values.items():
        reply = reply.replace(placeholder, value)
    return reply


def _tool_uses(text: str) -> list[tuple[str, str]]:
    """``use NAME({...})`` in ``text``, with the JSON read whole (it may nest)."""
    found = []
    for match in _TOOL_START.finditer(text):
        try:
            value, end = _DECODER.raw_decode(text, match.end())
        except ValueError:
            continue
        if isinstance(value, dict) and text[end : end + 1] == ")":
            found.append((match.group(1), text[match.end() : end]))
    return found


def apply_settings(settings: LLMServerSettings, changes: Any) -> None:
    """Apply ``changes`` (a dict of field names) to ``settings``; a clear
    ConfigurationError names an unknown field."""
    if not isinstance(changes, dict):
        raise ConfigurationError("control settings must be a JSON object")
    known = {f.name for f in fields(LLMServerSettings)}
    for key, value in changes.items():
        if key not in known:
            raise ConfigurationError(f"unknown setting {key!r}; known: {', '.join(sorted(known))}")
        setattr(settings, key, value)


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"message": message, "type": kind}}, status, headers)


def create_app(settings: LLMServerSettings | None = None) -> tuple[Starlette, _Model]:
    """The ASGI app and its model (whose ``settings``/``stats`` the caller may use)."""
    model = _Model(settings or LLMServerSettings())
    routes = [
        Route("/v1/chat/completions", model.chat, methods=["POST"]),
        Route("/chat/completions", model.chat, methods=["POST"]),
        Route("/v1/models", model.models),
        Route("/_control", model.control, methods=["POST"]),
        Route("/_stats", model.read_stats),
    ]
    return Starlette(routes=routes), model


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def _config(app: Starlette, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        lifespan="off",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=_GRACEFUL_S,
    )


class LLMServer:
    """The server in this process, on a thread with its own event loop.

    ``settings`` and ``stats`` are the live objects: set a knob between calls
    (``server.settings.fail_next = 2``). ``url`` ends in ``/v1``, as clients expect.
    """

    def __init__(self, settings: LLMServerSettings | None = None, **knobs: Any) -> None:
        self.settings = settings or LLMServerSettings()
        apply_settings(self.settings, knobs)
        app, self._model = create_app(self.settings)
        self._sock = _listen(0)
        self.port: int = self._sock.getsockname()[1]
        # "critical": a stream cut on purpose is logged by uvicorn as an app error.
        self._server = uvicorn.Server(_config(app, "critical"))
        self._thread = threading.Thread(
            target=self._run, name=f"llm-server-{self.port}", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def stats(self) -> _Stats:
        return self._model.stats

    def reset(self) -> Self:
        """Every knob back at its default (for a server shared by several tests);
        the counters keep counting."""
        for knob in fields(LLMServerSettings):
            if knob.default_factory is not MISSING:
                setattr(self.settings, knob.name, knob.default_factory())
            else:
                setattr(self.settings, knob.name, knob.default)
        return self

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test model server on port {self.port} did not start")
            time.sleep(0.005)  # polling a thread's flag; there is no event to wait on
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(START_TIMEOUT_S)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _ReadyServer(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shoal.testing.llm_server",
        description="A deterministic fake model server (OpenAI Chat Completions) for tests and"
        " benchmarks. Prints 'READY <port>' once it serves; stops on SIGTERM or SIGINT.",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument(
        "--first-token-delay", type=float, default=0.0, help="extra seconds before the first"
    )
    parser.add_argument(
        "--script", action="append", default=[], help="an answer (repeat for several, in turn)"
    )
    args = parser.parse_args(argv)
    settings = LLMServerSettings(
        api_key=args.api_key,
        token_delay=args.token_delay,
        first_token_delay=args.first_token_delay,
        script=args.script,
    )
    try:
        sock = _listen(args.port)
    except OSError as exc:
        parser.exit(2, f"llm_server: {exc}\n")
    app, _ = create_app(settings)
    try:
        _ReadyServer(_config(app, "warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    main()
