"""The response cache: deterministic model requests answered once, cluster-wide.

``CachedModel(model, client.cache("llm", ttl=3600))`` is a ChatModel in front of
another one (an LLMClient, a provider pool). A request with ``temperature=0``
(and at most one choice) is looked up in a two-level cache
(shoal.coordination.cache) under a hash of the whole request; everything else
passes through untouched and uncounted.

* **Key.** sha256 of the canonical JSON (sorted keys, no whitespace) of the
  request as it would be sent: model, messages, tools and every other parameter
  (``tool_choice``, ``max_tokens``, ``seed``, ``top_p``, ``stop``...), ``None``
  values left out, ``temperature`` normalised to 0 — and what answers it (the
  wrapped model's ``identity``: a provider pool's chain of (provider, model,
  service or base URL), a client's endpoint and model). The affinity ``key`` (the
  conversation id) is *not* in it: it only picks a replica, the answer does not
  depend on it, so two conversations asking the same thing share one answer.
* **What is stored.** Only answers that finished (``finish_reason`` stop,
  tool_calls or length), never a broken or partial stream, as msgpack data
  (the Completion as builtins). A hit returns the stored Completion with
  ``cached=True``; its ``usage`` is what the original call spent, kept readable,
  and accounting must not charge it again (no tokens were spent now).
* **complete()** uses the cache's single flight: concurrent identical misses in
  every process of the namespace call the model once; the other callers get
  that answer with ``cached=True``.
* **stream()** looks up, then on a hit yields the stored text in word-sized
  deltas (a UI still sees it flow) and the done delta; on a miss it streams
  through and stores the finished answer before yielding its done delta.
* **The cache is an optimisation.** When the engine is unreachable the model is
  called directly (logged): a model call never fails because its cache did.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import msgspec

from shoal.coordination.cache import Cache
from shoal.errors import ConfigurationError, EngineUnavailable
from shoal.llm.model import ChatModel
from shoal.llm.types import Completion, StreamDelta
from shoal.observability.metrics import LLM_ANSWERS, LLM_CACHE

__all__ = ["STORED_FINISH_REASONS", "CachedModel", "request_key"]

log = logging.getLogger("shoal.llm.cache")

STORED_FINISH_REASONS = frozenset({"stop", "tool_calls", "length"})
KEY_VERSION = "r1"  # in every key: a change of the key or value format starts afresh
_WORD = re.compile(r"\s*\S+\s*|\s+")  # word-sized pieces that join back to the text


def _plain(obj: Any) -> Any:
    """Mappings and sequences that are not dicts and lists, as JSON sees them."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, Sequence) and not isinstance(obj, str | bytes):
        return list(obj)
    raise TypeError(f"a {type(obj).__qualname__} is not JSON data")


def _deterministic(params: Mapping[str, Any]) -> bool:
    """``temperature`` given and 0 (greedy decoding: ``top_p`` changes nothing
    then), and one choice asked for."""
    temperature = params.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        return False
    n = params.get("n")
    return temperature == 0 and (n is None or n == 1)


def request_key(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    params: Mapping[str, Any],
    default_model: str | None = None,
    identity: str | None = None,
) -> str | None:
    """The cache key of a request, or None when it is not deterministic (not
    cached). ``default_model`` stands for ``model`` when the call names none;
    ``identity`` names what answers it (a client's endpoint, a pool's chain)."""
    if not _deterministic(params):
        return None
    request = {name: value for name, value in params.items() if value is not None}
    request["temperature"] = 0  # 0 and 0.0 are one request
    request.setdefault("model", default_model)
    if identity is not None:
        request[" answered by"] = identity  # no request parameter has this name
    request["messages"] = messages
    if tools:  # no tools and an empty list are the same request on the wire
        request["tools"] = tools
    try:
        canonical = msgspec.json.encode(request, order="sorted", enc_hook=_plain)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigurationError(
            f"this model request cannot be cached: it is not JSON data ({exc}); pass "
            "messages, tools and parameters as JSON-compatible values"
        ) from None
    return f"{KEY_VERSION}:{hashlib.sha256(canonical).hexdigest()}"


def _storable(answer: Completion) -> bool:
    return answer.finish_reason in STORED_FINISH_REASONS


def _pieces(text: str) -> list[str]:
    return _WORD.findall(text)


class _Unstorable(Exception):
    """The model's answer did not finish properly: it goes to its callers, not
    into the cache (raised out of the single flight so nothing is stored)."""

    def __init__(self, answer: Completion) -> None:
        super().__init__(answer.finish_reason)
        self.answer = answer


class CachedModel:
    """A ChatModel that answers deterministic requests from ``cache`` (see the
    module's docstring). ``agent_type`` labels the hit/miss metric.

    The cache's ``ttl`` is how long an answer is reused; its ``fill_timeout``
    bounds a model call made through ``complete()`` (give it at least the model's
    total timeout).
    """

    def __init__(self, inner: ChatModel, cache: Cache, *, agent_type: str = "-") -> None:
        if not isinstance(inner, ChatModel):
            raise ConfigurationError(
                f"CachedModel wraps a ChatModel (an LLMClient, a provider pool...), got "
                f"{type(inner).__qualname__}"
            )
        if not isinstance(cache, Cache):
            raise ConfigurationError(
                f"CachedModel needs a shoal Cache (client.cache('llm', ttl=...)), got "
                f"{type(cache).__qualname__}"
            )
        if not isinstance(agent_type, str) or not agent_type:
            raise ConfigurationError(
                f"agent_type must be a non-empty str (the metric label), got {agent_type!r}"
            )
        self.inner = inner
        self.cache = cache
        self.agent_type = agent_type

    def __repr__(self) -> str:
        return f"CachedModel({self.inner!r}, cache={self.cache.name!r})"

    async def aclose(self) -> None:
        """Close the wrapped model (the cache belongs to its client)."""
        await self.inner.aclose()

    def key_of(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None,
        params: Mapping[str, Any],
    ) -> str | None:
        """The cache key of this request here (None: it is not cached). Besides the
        request it holds what answers it: the model's ``identity`` (a provider
        pool's chain of providers and models, a client's endpoint and model) —
        a pool has no one ``model`` — so different models never share answers."""
        identity = getattr(self.inner, "identity", None)
        return request_key(
            messages,
            tools,
            params,
            getattr(self.inner, "model", None),
            identity if isinstance(identity, str) else None,
        )

    # --- complete ----------------------------------------------------------------------

    async def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> Completion:
        """The answer: from the cache, or from the model once across the cluster."""
        cache_key = self.key_of(messages, tools, params)
        if cache_key is None:
            return await self.inner.complete(messages, key=key, tools=tools, **params)
        ours: list[Completion] = []  # set when this call is the one that asked the model

        async def ask() -> Any:
            answer = await self.inner.complete(messages, key=key, tools=tools, **params)
            ours.append(answer)
            if not _storable(answer):
                raise _Unstorable(answer)
            return msgspec.to_builtins(msgspec.structs.replace(answer, cached=False))

        try:
            stored = await self.cache.get_or_set(cache_key, ask)
        except _Unstorable as exc:  # shared with the callers of this process
            return self._answered(exc.answer, asked=bool(ours))
        except EngineUnavailable as exc:
            log.warning(
                "response cache %r unavailable, calling the model: %s", self.cache.name, exc
            )
            answer = ours[0] if ours else await self._ask(messages, key, tools, params)
            return self._answered(answer, asked=True)
        found = None if ours else self._rebuild(cache_key, stored)
        if found is None:
            answer = ours[0] if ours else await self._ask(messages, key, tools, params)
            return self._answered(answer, asked=True)
        return self._answered(found, asked=False)

    async def _ask(
        self,
        messages: Sequence[Mapping[str, Any]],
        key: str | None,
        tools: Sequence[Mapping[str, Any]] | None,
        params: Mapping[str, Any],
    ) -> Completion:
        """The model's answer, past the cache (it could not be used)."""
        return await self.inner.complete(messages, key=key, tools=tools, **params)

    def _answered(self, answer: Completion, *, asked: bool) -> Completion:
        """Count a deterministic request: ``asked``, it called the model (a miss);
        else its answer came from the cache or from another caller's call."""
        if asked:
            LLM_CACHE.labels(self.agent_type, "miss").inc()
            return answer
        LLM_CACHE.labels(self.agent_type, "hit").inc()
        LLM_ANSWERS.labels(answer.provider or "-", "cache").inc()
        return msgspec.structs.replace(answer, cached=True)

    def _rebuild(self, cache_key: str, stored: Any) -> Completion | None:
        try:
            return msgspec.convert(stored, Completion)
        except msgspec.ValidationError as exc:  # not written by this version: a miss
            log.warning(
                "response cache %r: entry %s is not a completion (%s)",
                self.cache.name,
                cache_key,
                exc,
            )
            return None

    # --- stream --------------------------------------------------------------------------

    async def stream(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        key: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamDelta]:
        """The answer as deltas: a hit's text in word-sized pieces, else the model's
        stream, its finished answer stored before the done delta (so a consumer
        that stops at the done delta does not lose the store).

        No single flight here: a stream's callers want tokens as they are written,
        and one model stream cannot be shared across processes; waiting for
        another caller's whole answer would turn time to first token into time to
        last token. Concurrent identical streams each ask the model; the last
        finished one stays in the cache.
        """
        cache_key = self.key_of(messages, tools, params)
        found = None if cache_key is None else await self._lookup(cache_key)
        if found is not None:
            answer = self._answered(found, asked=False)
            for piece in _pieces(answer.content):
                yield StreamDelta(content=piece)
            yield StreamDelta(done=True, completion=answer)
            return
        if cache_key is not None:
            LLM_CACHE.labels(self.agent_type, "miss").inc()
        deltas = self.inner.stream(messages, key=key, tools=tools, **params)
        try:
            async for delta in deltas:
                done = delta.completion if delta.done else None
                if cache_key is not None and done is not None and _storable(done):
                    await self._store(cache_key, done)
                yield delta
        finally:
            close = getattr(deltas, "aclose", None)
            if close is not None:  # an abandoned stream ends its request now
                await close()

    async def _lookup(self, cache_key: str) -> Completion | None:
        try:
            stored = await self.cache.get(cache_key)
        except EngineUnavailable as exc:
            log.warning(
                "response cache %r unavailable, calling the model: %s", self.cache.name, exc
            )
            return None
        return None if stored is None else self._rebuild(cache_key, stored)

    async def _store(self, cache_key: str, answer: Completion) -> None:
        value = msgspec.to_builtins(msgspec.structs.replace(answer, cached=False))
        try:
            await self.cache.set(cache_key, value)
        except EngineUnavailable as exc:  # the answer stands; only its reuse is lost
            log.warning("response cache %r: storing an answer failed: %s", self.cache.name, exc)
