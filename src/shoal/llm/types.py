"""Wire types of the Chat Completions API (msgspec, decoded strictly but tolerant
of extra fields) and the typed results the client returns.

The wire structs mirror only the fields Shoal reads; servers (vLLM, Ollama,
llama.cpp, OpenAI, gateways) add many more, which msgspec ignores.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

__all__ = ["Completion", "StreamDelta", "ToolCall", "Usage"]


# --- public results --------------------------------------------------------------


class Usage(msgspec.Struct, frozen=True):
    """Token accounting as the server reported it."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ToolCall(msgspec.Struct, frozen=True):
    """One function call the model asked for.

    ``arguments`` is the parsed JSON object, or None when the model produced text
    that is not a JSON object (models do); ``raw_arguments`` is always the text, so
    the caller can tell the model what was wrong.
    """

    id: str
    name: str
    raw_arguments: str
    arguments: dict[str, Any] | None


class Completion(msgspec.Struct, frozen=True):
    """One whole answer: ``content`` (may be empty when the model only calls tools),
    ``tool_calls``, ``finish_reason`` ("stop", "length", "tool_calls", ...; None if a
    stream broke), ``usage`` (None when the server sent none), ``model``, and the
    server's ``id`` for the response.

    Who answered: ``provider`` (the provider's name in a ProviderPool, "" for a
    bare LLMClient), ``instance`` (the service instance id, or host:port of a
    fixed endpoint) and ``cached`` (True when the response cache answered and no
    model was called).
    """

    content: str
    tool_calls: list[ToolCall]
    finish_reason: str | None
    usage: Usage | None
    model: str
    id: str
    provider: str = ""
    instance: str = ""
    cached: bool = False


class StreamDelta(msgspec.Struct, frozen=True):
    """One step of a streamed answer.

    Content arrives as ``content`` pieces, in order. The last delta of a stream has
    ``done=True`` and ``completion`` set: the whole text, the tool calls assembled
    from their fragments, the finish reason and the usage (when the server sent it).
    """

    content: str = ""
    done: bool = False
    completion: Completion | None = None


def tool_call(id: str, name: str, raw_arguments: str) -> ToolCall:
    """A ToolCall with its arguments parsed when they are a JSON object."""
    try:
        parsed = json.loads(raw_arguments) if raw_arguments else {}
    except ValueError:
        parsed = None
    return ToolCall(id, name, raw_arguments, parsed if isinstance(parsed, dict) else None)


# --- wire: responses ---------------------------------------------------------------


class WireFunction(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class WireToolCall(msgspec.Struct):
    id: str | None = None
    index: int = 0
    type: str | None = None
    function: WireFunction | None = None


class WireMessage(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    tool_calls: list[WireToolCall] | None = None


class WireChoice(msgspec.Struct):
    index: int = 0
    message: WireMessage | None = None
    delta: WireMessage | None = None
    finish_reason: str | None = None


class WireResponse(msgspec.Struct):
    """A whole response or one streamed chunk (they differ only in message/delta)."""

    id: str = ""
    model: str = ""
    choices: list[WireChoice] = msgspec.field(default_factory=list)
    usage: Usage | None = None


class WireErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None


class WireError(msgspec.Struct):
    error: WireErrorBody | str | None = None
    detail: Any = None


response_decoder = msgspec.json.Decoder(WireResponse)
error_decoder = msgspec.json.Decoder(WireError)
