"""What an LLMAgent needs from "the model": one interface that a bare LLMClient,
a ProviderPool (replicas, affinity, breakers, fallback, quotas) and the response
cache in front of either all implement, so the agent does not care which it has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from shoal.llm.types import Completion, StreamDelta

__all__ = ["ChatModel"]


@runtime_checkable
class ChatModel(Protocol):
    """Chat Completions, by whatever route.

    ``key`` is the affinity key (the conversation id): a pool sends the calls of
    one key to the same replica while it is healthy, so its KV cache stays warm.
    Other keywords are request parameters (``model``, ``temperature``,
    ``max_tokens``, ``tool_choice``, ``seed``...). The returned Completion says
    who answered (``provider``, ``instance``, ``cached``).
    """

    def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamDelta]: ...

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion: ...

    async def aclose(self) -> None: ...
