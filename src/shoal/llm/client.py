"""A client for the OpenAI-compatible Chat Completions API, on ``httpx``.

Most model servers Shoal will meet (vLLM, Ollama, llama.cpp server, OpenAI and
the gateways in front of them) speak ``POST {base_url}/chat/completions``, so one
small client covers them. It gives typed results instead of JSON, typed errors a
caller can act on (see ``shoal.llm.errors``), a bounded retry that honours
``Retry-After`` and never repeats a stream the caller has already seen part of,
and three timeouts (connect, between stream chunks, whole answer).

The API key is a secret: it goes into the ``Authorization`` header and nowhere
else — not into messages, reprs, logs or exception arguments; server error text
that echoes it is redacted.

    async with LLMClient("http://127.0.0.1:8000/v1", model="qwen2.5") as llm:
        answer = await llm.complete([{"role": "user", "content": "Hello"}])
        async for delta in llm.stream([{"role": "user", "content": "Hello"}]):
            print(delta.content, end="")
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Self, TypeVar

import httpx
import msgspec
import tenacity

from shoal.errors import ConfigurationError
from shoal.llm.errors import (
    LLMAuthError,
    LLMBadRequest,
    LLMConnectionError,
    LLMError,
    LLMRateLimited,
    LLMServerError,
    LLMStreamBroken,
    LLMStreamStalled,
    LLMTimeout,
)
from shoal.llm.types import (
    Completion,
    StreamDelta,
    ToolCall,
    Usage,
    WireError,
    WireResponse,
    error_decoder,
    response_decoder,
    tool_call,
)
from shoal.resilience import NO_RETRY, RetryPolicy
from shoal.resilience import parse_retry_after as _retry_after

__all__ = [
    "DEFAULT_RETRY",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "NO_RETRY",
    "LLMClient",
    "RetryPolicy",
]

ENV_BASE_URL = "SHOAL_LLM_BASE_URL"
ENV_API_KEY = "SHOAL_LLM_API_KEY"
ENV_MODEL = "SHOAL_LLM_MODEL"
MAX_CONNECTIONS = 4096  # concurrent calls per client (a node's turns, at most)
_ERROR_TEXT_MAX = 300  # characters of a server's error message kept in ours
_REDACTED = "***"

log = logging.getLogger("shoal.llm")
T = TypeVar("T")


# The client's default retry: three tries, backing off from 0.5 s up to 8 s (full
# jitter), a Retry-After of up to 30 s waited for. Which errors are retried, the
# errors say themselves (``LLMError.retryable``): 429, 5xx, connection errors.
DEFAULT_RETRY = RetryPolicy(attempts=3, backoff=0.5, max_backoff=8.0, max_retry_after=30.0)


class LLMClient:
    """One OpenAI-compatible endpoint: ``base_url`` (e.g. ``http://host:8000/v1``),
    an optional ``api_key`` and a default ``model``; each falls back to its
    environment variable (``SHOAL_LLM_BASE_URL``, ``SHOAL_LLM_API_KEY``,
    ``SHOAL_LLM_MODEL``).

    Timeouts, in seconds: ``connect_timeout`` to open a connection,
    ``read_timeout`` for the response to start and between stream chunks (a slow
    first token counts here), ``total_timeout`` for the whole answer, retries and
    their waits included. Pass ``http_client`` to share a connection pool; it is
    then the caller's to close.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        total_timeout: float = 600.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        url = base_url or os.environ.get(ENV_BASE_URL, "")
        if not url:
            raise ConfigurationError(
                "no model endpoint configured: pass base_url= (e.g. http://127.0.0.1:8000/v1)"
                f" or set {ENV_BASE_URL}"
            )
        parsed = httpx.URL(url.rstrip("/"))
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigurationError(
                f"the model endpoint must be an http(s) URL like http://127.0.0.1:8000/v1,"
                f" got {parsed.copy_with(username=None, password=None)}"
            )
        if min(connect_timeout, read_timeout, total_timeout) <= 0:
            raise ConfigurationError("LLMClient timeouts must be > 0 seconds")
        self._url = parsed.join(parsed.path + "/chat/completions")
        self._where = str(self._url.copy_with(username=None, password=None))
        # api_key="" says "no key": the environment's is not read (a provider pool's
        # local replicas must not be sent a hosted API's key)
        self._api_key = (api_key if api_key is not None else os.environ.get(ENV_API_KEY)) or None
        self.model = model or os.environ.get(ENV_MODEL) or None
        self.retry = retry or DEFAULT_RETRY
        self.read_timeout = read_timeout
        self.total_timeout = total_timeout
        timeout = httpx.Timeout(
            connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout
        )
        self._owns_http = http_client is None
        # httpx's default pool (100 connections) would queue the 101st concurrent
        # stream of a busy node until its connect timeout: one connection per
        # call in flight, bounded by the caller's own concurrency.
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS, max_keepalive_connections=100)
        self._http = http_client or httpx.AsyncClient(timeout=timeout, limits=limits)
        self._timeout = timeout

    @property
    def identity(self) -> str:
        """The endpoint and default model (no credentials): what a response cache
        keys on, so two clients of different servers or models never share answers."""
        return f"{self._where} {self.model or ''}"

    def __repr__(self) -> str:
        key = _REDACTED if self._api_key else None
        return f"LLMClient({self._where!r}, model={self.model!r}, api_key={key!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool (unless it was passed in)."""
        if self._owns_http:
            await self._http.aclose()

    # --- calls ---------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        model: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> Completion:
        """The whole answer to ``messages`` (OpenAI message dicts). ``extra`` keys
        (``top_p``, ``seed``, ``stop``, ``response_format``...) go into the request
        body as they are. ``key`` (an affinity key) means nothing to one endpoint;
        it is taken so that a client and a ProviderPool are interchangeable."""
        body = self._body(
            messages, model, tools, tool_choice, temperature, max_tokens, extra, stream=False
        )
        deadline = time.monotonic() + self.total_timeout
        return await self._retried(lambda: self._complete_once(body, deadline), deadline)

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        model: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        **extra: Any,
    ) -> AsyncIterator[StreamDelta]:
        """The answer as it is written: content deltas in order, then one
        ``done=True`` delta with the assembled ``Completion`` (tool calls, finish
        reason and usage, which is asked for with ``stream_options.include_usage``).

        Failures before the first byte are retried per the policy; after it, the
        stream raises ``LLMStreamBroken`` (or ``LLMStreamStalled``) with the part
        received, and is never retried here: the caller has seen that text.
        """
        body = self._body(
            messages, model, tools, tool_choice, temperature, max_tokens, extra, stream=True
        )
        deadline = time.monotonic() + self.total_timeout
        deltas: AsyncIterator[StreamDelta] | None = None
        first: StreamDelta | None = None
        async for attempt in self._retrying(deadline):
            with attempt:
                # Up to the first delta a failure is retried (a failure after bytes
                # arrived is an LLMStreamBroken, never retried); after it, the
                # caller has seen text.
                deltas = self._stream_once(body, deadline, _Assembler())
                first = await anext(deltas)
        assert deltas is not None
        assert first is not None
        try:
            yield first
            async for delta in deltas:
                yield delta
        finally:
            await deltas.aclose()  # type: ignore[attr-defined]

    # --- one try -------------------------------------------------------------------

    async def _complete_once(self, body: bytes, deadline: float) -> Completion:
        try:
            async with asyncio.timeout(_remaining(deadline)):
                response = await self._http.post(self._url, content=body, headers=self._headers())
        except TimeoutError:
            raise LLMTimeout(
                f"{self._where} gave no whole answer within {self.total_timeout}s"
            ) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code != 200:
            raise self._status_error(response, response.content)
        try:
            wire = response_decoder.decode(response.content)
        except msgspec.DecodeError as exc:
            raise LLMServerError(
                f"{self._where} answered with a body that is not a chat completion: {exc}"
            ) from None
        if not wire.choices:
            raise LLMServerError(f"{self._where} answered without any choice")
        assembler = _Assembler()
        assembler.add(wire)
        return assembler.completion()

    async def _stream_once(
        self, body: bytes, deadline: float, acc: _Assembler
    ) -> AsyncIterator[StreamDelta]:
        request = self._http.build_request("POST", self._url, content=body, headers=self._headers())
        try:
            response = await asyncio.wait_for(
                self._http.send(request, stream=True), _remaining(deadline)
            )
        except TimeoutError:
            raise LLMTimeout(
                f"{self._where} did not start answering within {self.total_timeout}s"
            ) from None
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        try:
            if response.status_code != 200:
                raise self._status_error(response, await response.aread())
            lines = response.aiter_lines()
            while True:
                line = await self._next_line(lines, deadline, acc)
                if line is None:
                    break
                acc.received = True
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = response_decoder.decode(data)
                except msgspec.DecodeError as exc:
                    raise LLMStreamBroken(
                        f"{self._where} sent a stream chunk that is not JSON: {exc}",
                        acc.completion(),
                    ) from None
                piece = acc.add(chunk)
                if piece:
                    yield StreamDelta(content=piece)
        finally:
            await response.aclose()
        if acc.finish_reason is None and not acc.done_seen:
            raise LLMStreamBroken(
                f"{self._where} ended the stream without finishing the answer", acc.completion()
            )
        yield StreamDelta(done=True, completion=acc.completion())

    async def _next_line(
        self, lines: AsyncIterator[str], deadline: float, acc: _Assembler
    ) -> str | None:
        """The next SSE line (None at the end), within both the read and the total
        timeout; a failure after bytes arrived becomes a broken stream."""
        try:
            line = await asyncio.wait_for(
                anext(lines), min(self.read_timeout, _remaining(deadline))
            )
        except StopAsyncIteration:
            return None
        except (TimeoutError, httpx.TimeoutException):
            if not acc.received:
                raise LLMTimeout(
                    f"{self._where} sent nothing for {self.read_timeout}s (read_timeout)"
                ) from None
            raise LLMStreamStalled(
                f"{self._where} stopped streaming mid-answer (read or total timeout)",
                acc.completion(),
            ) from None
        except httpx.HTTPError as exc:
            if not acc.received:
                raise self._transport_error(exc) from None
            raise LLMStreamBroken(
                f"{self._where} dropped the connection mid-answer ({type(exc).__name__});"
                " what arrived is on .partial",
                acc.completion(),
            ) from None
        return line

    # --- helpers -------------------------------------------------------------------

    async def _retried(self, call: Callable[[], Awaitable[T]], deadline: float) -> T:
        async for attempt in self._retrying(deadline):
            with attempt:
                return await call()
        raise AssertionError("unreachable: tenacity either returns or raises")

    def _retrying(self, deadline: float) -> tenacity.AsyncRetrying:
        """The retry policy's controller for one call, within its total timeout."""
        return self.retry.retrying(deadline).copy(before_sleep=self._log_retry)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.info(
            "model call failed (try %d of %d), retrying in %.2fs: %s",
            state.attempt_number,
            self.retry.attempts,
            state.upcoming_sleep,
            error,
        )

    def _body(
        self,
        messages: Sequence[Mapping[str, Any]],
        model: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        tool_choice: str | Mapping[str, Any] | None,
        temperature: float | None,
        max_tokens: int | None,
        extra: Mapping[str, Any],
        *,
        stream: bool,
    ) -> bytes:
        chosen = model or self.model
        if not chosen:
            raise ConfigurationError(
                f"no model named: pass model= to the call or the client, or set {ENV_MODEL}"
            )
        if not messages:
            raise ConfigurationError(
                "messages is empty: a chat completion needs at least one message"
            )
        body: dict[str, Any] = {"model": chosen, "messages": list(messages), **extra}
        optional = {
            "tools": list(tools) if tools else None,
            "tool_choice": tool_choice,
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
        log.debug(
            "chat completion to %s: model=%s stream=%s messages=%d",
            self._where,
            chosen,
            stream,
            len(messages),
        )
        return msgspec.json.encode(body)

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, _REDACTED)
        return text

    def _status_error(self, response: httpx.Response, body: bytes) -> LLMError:
        status = response.status_code
        detail = self._redact(_server_message(body))[:_ERROR_TEXT_MAX]
        said = f"{self._where} answered {status}" + (f": {detail}" if detail else "")
        if status == 429:
            retry_after = _retry_after(response.headers.get("retry-after"))
            hint = f"retry after {retry_after:.1f}s" if retry_after is not None else "retry later"
            return LLMRateLimited(f"{said} (rate limited; {hint})", status, retry_after)
        if status in (401, 403):
            return LLMAuthError(
                f"{said} (check the API key, api_key= or {ENV_API_KEY},"
                " and that it may use this model)",
                status,
            )
        if status >= 500:
            return LLMServerError(f"{said} (server error; another try or replica may work)", status)
        return LLMBadRequest(f"{said} (the request was rejected: fix it rather than retry)", status)

    def _transport_error(self, exc: httpx.HTTPError) -> LLMError:
        kind = type(exc).__name__
        if isinstance(exc, httpx.ConnectTimeout):
            return LLMTimeout(f"could not connect to {self._where} within {self._timeout.connect}s")
        if isinstance(exc, httpx.TimeoutException):
            return LLMTimeout(
                f"{self._where} did not answer within {self.read_timeout}s (read_timeout; {kind})"
            )
        return LLMConnectionError(
            f"could not reach {self._where} ({kind}); is the model server running?"
        )


class _Assembler:
    """Builds a Completion from a whole response or from stream chunks: content
    pieces in order, tool calls from their indexed fragments."""

    def __init__(self) -> None:
        self.received = False  # any stream byte arrived: retrying would repeat text
        self.done_seen = False
        self.parts: list[str] = []
        self.tools: dict[int, list[str]] = {}  # index -> [id, name, arguments so far]
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.model = ""
        self.id = ""

    def add(self, chunk: WireResponse) -> str:
        """Take one response or chunk in; the content it adds."""
        self.id = self.id or chunk.id
        self.model = self.model or chunk.model
        self.usage = chunk.usage or self.usage
        added = ""
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # n > 1 is not supported: the first choice is the answer
            message = choice.delta or choice.message
            if message is not None:
                added += message.content or ""
                for position, call in enumerate(message.tool_calls or []):
                    # Stream fragments name their call by index; a whole message
                    # lists its calls in order and often without an index.
                    index = call.index if choice.delta is not None else position
                    slot = self.tools.setdefault(index, ["", "", ""])
                    slot[0] = call.id or slot[0]
                    if call.function is not None:
                        slot[1] = call.function.name or slot[1]
                        slot[2] += call.function.arguments or ""
            self.finish_reason = choice.finish_reason or self.finish_reason
        if added:
            self.parts.append(added)
        return added

    def completion(self) -> Completion:
        calls: list[ToolCall] = [
            tool_call(id_, name, args)
            for _, (id_, name, args) in sorted(self.tools.items())
            if name
        ]
        return Completion(
            "".join(self.parts), calls, self.finish_reason, self.usage, self.model, self.id
        )


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _server_message(body: bytes) -> str:
    """The error text of an OpenAI-style ``{"error": {"message": ...}}`` body, a
    FastAPI-style ``{"detail": ...}``, or the start of a plain-text body."""
    try:
        wire: WireError = error_decoder.decode(body)
    except msgspec.DecodeError:
        return body[:_ERROR_TEXT_MAX].decode("utf-8", "replace").strip()
    if isinstance(wire.error, str):
        return wire.error
    if wire.error is not None:
        return wire.error.message
    return str(wire.detail) if wire.detail is not None else ""
