"""``LLMAgent``: a conversation with a model, as a Shoal agent.

Each conversation is an addressed agent (``<type>/<conversation id>``): its turns
run one at a time on the node that owns it, its memory is ``self.state`` (saved
after every turn, so a turn that dies leaves the memory as it was before it), and
a turn is a task — so it is retried on another node when its node dies, and its
answer streams into the task's events as the model writes it.

A turn: the user's message, the system prompt and the remembered messages go to
the model; when the model asks for tools, each tool call becomes a Shoal task
(``shoal.llm.tools``), all of one answer's calls at once, and their results go
back to the model; this repeats until the model answers without tools (at most
``max_tool_rounds`` rounds). The answer is the task's result.

Streaming and restarts (``shoal.llm.answer`` documents the events): a turn
re-run on another node reads what the dead attempt already streamed and writes
only the rest; it marks the place with a ``restart`` event. The same happens when
a model replica dies mid-answer and the call is made again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from shoal.agent import Agent, TaskContext, capability
from shoal.errors import ConfigurationError, ShoalError
from shoal.llm.answer import Answer
from shoal.llm.client import LLMClient
from shoal.llm.errors import LLMAuthError, LLMBadRequest, LLMStreamBroken
from shoal.llm.tools import Tool, tool_result_text
from shoal.llm.types import Completion, ToolCall
from shoal.observability import metrics

if TYPE_CHECKING:
    from shoal.client import Client
    from shoal.llm.model import ChatModel

__all__ = ["LLMAgent"]

_BASE_CHAT = "chat"
# events only a run of an LLMAgent's turn writes: one of them means it ran before
_TURN_EVENTS = frozenset({"token", "tool_call", "tool_result", "answer", "restart"})
RESPONSE_CACHE = "llm-responses"  # the two-level cache the response cache uses
_ARGS_SHOWN = 500  # characters of tool arguments / results put into events
# The model route of each agent class, per engine client (one per process in a
# node): built once, shared by every conversation of that class.
_MODELS: weakref.WeakKeyDictionary[Client, dict[type[LLMAgent], ChatModel]] = (
    weakref.WeakKeyDictionary()
)


class LLMAgent(Agent):
    """Subclass it, set the class attributes, host it on nodes, and talk to a
    conversation with ``client.call("<type>.chat", agent="<type>/<id>",
    message=...)`` (or submit and follow the task to see the answer stream).

    - ``system_prompt``: the instructions every model call starts with;
    - ``model_name``: the model (default ``SHOAL_LLM_MODEL``);
    - ``providers``: a ProviderPool's providers (replicas, affinity, failover,
      quotas); empty: the one endpoint of ``SHOAL_LLM_BASE_URL``/``_API_KEY``;
      override ``build_model`` for anything else;
    - ``tools``: ``capability_tool(...)`` / ``agent_tool(...)`` the model may call;
    - ``memory_window``: messages remembered (the oldest fall out, after
      ``summarize`` was offered them); ``max_tool_rounds``: tool rounds per turn;
    - ``temperature``, ``max_tokens``: request parameters (None: the server's);
    - ``cache_responses``: answer repeated deterministic requests (temperature 0)
      from the response cache;
    - ``max_stream_restarts``: model calls re-made after a stream broke mid-answer.

    The capability is ``<agent_type>.chat`` (``chat_capability``), taking
    ``message``; its result is the answer's text.
    """

    system_prompt: ClassVar[str] = "You are a helpful assistant."
    model_name: ClassVar[str | None] = None
    providers: ClassVar[Sequence[Any]] = ()
    tools: ClassVar[Sequence[Tool]] = ()
    memory_window: ClassVar[int] = 40
    max_tool_rounds: ClassVar[int] = 8
    temperature: ClassVar[float | None] = None
    max_tokens: ClassVar[int | None] = None
    cache_responses: ClassVar[bool] = False
    max_stream_restarts: ClassVar[int] = 2
    chat_capability: ClassVar[str] = _BASE_CHAT

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _check_class(cls)
        spec = cls._capabilities.get(_BASE_CHAT)
        if spec is not None and spec.method_name == "chat":
            # Capability names are cluster-wide: each LLM agent type gets its own.
            name = cls.__dict__.get("chat_capability") or f"{cls.agent_type}.chat"
            cls.chat_capability = name
            others = {k: v for k, v in cls._capabilities.items() if k != _BASE_CHAT}
            cls._capabilities = {**others, name: dataclasses.replace(spec, name=name)}

    @capability(
        _BASE_CHAT,
        max_attempts=3,
        non_retryable=(ConfigurationError, LLMBadRequest, LLMAuthError),
    )
    async def chat(self, message: str) -> str:
        """One turn of the conversation: the answer to ``message``."""
        return await self.respond(message)

    # --- hooks ----------------------------------------------------------------------

    def build_model(self, client: Client) -> ChatModel:
        """The model route of this agent class, built once per process: a
        ProviderPool over ``providers``, else one endpoint from the environment.
        Override to build your own (any ``ChatModel``)."""
        if self.providers:
            from shoal.llm.providers import ProviderPool

            return ProviderPool(client, list(self.providers))
        return LLMClient(model=self.model_name)

    async def summarize(self, dropped: list[dict[str, Any]], summary: str | None) -> str | None:
        """Called when messages fall out of the memory window, with them and the
        summary so far; return the new summary (kept as a system message after the
        prompt), or None to just forget them (the default). A model call here is
        fine: ``await self.model().complete([...])``."""
        return summary

    def request_params(self) -> dict[str, Any]:
        """Parameters of every model call (model, temperature, max_tokens)."""
        params: dict[str, Any] = {}
        if self.model_name:
            params["model"] = self.model_name
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        return params

    # --- the turn ---------------------------------------------------------------------

    def model(self) -> ChatModel:
        """This class's model route (built by ``build_model`` on first use; with
        ``cache_responses``, behind the response cache)."""
        client = self.ctx.client
        models = _MODELS.setdefault(client, {})
        route = models.get(type(self))
        if route is None:
            route = self.build_model(client)
            if self.cache_responses:
                from shoal.llm.response_cache import CachedModel

                # fill_timeout: the model's own timeouts bound a call (up to a day for a
                # provider), and one cache object serves every agent type of the client
                cache = client.cache(RESPONSE_CACHE, fill_timeout=86_400.0)
                route = CachedModel(route, cache, agent_type=self.agent_type)
            models[type(self)] = route
            client.on_close(route.aclose)  # its connections live as long as the client
        return route

    async def respond(self, message: str) -> str:
        """Answer ``message`` within this conversation (what ``chat`` does); the
        memory is updated only when the turn succeeds."""
        if not isinstance(message, str) or not message.strip():
            raise ConfigurationError("message must be a non-empty string")
        if self.key is None:
            raise ConfigurationError(
                f"{type(self).__name__} is a conversation: address it by id "
                f"(agent='{self.agent_type}/<conversation id>')"
            )
        turn = _Turn(self, self.ctx)
        await turn.resume_point()
        remembered = list(self.state.get("messages", []))
        summary = self.state.get("summary")
        new: list[dict[str, Any]] = [{"role": "user", "content": message}]
        offered = [tool.schema() for tool in self.tools]
        answer = ""
        for round_ in range(self.max_tool_rounds + 1):
            prompt = self._prompt(remembered + new, summary)
            tools = offered if offered and round_ < self.max_tool_rounds else None
            completion = await turn.model_call(prompt, tools)
            # calls asked for when no tools were offered are not run: not kept either,
            # or the memory would hold calls without results (a 400 ever after)
            new.append(_assistant_message(completion, with_calls=tools is not None))
            answer = completion.content
            if not completion.tool_calls or tools is None:
                break
            new.extend(await turn.run_tools(completion.tool_calls))
        await turn.finish()
        await self._remember(remembered + new, summary)
        return answer

    def _prompt(self, messages: list[dict[str, Any]], summary: str | None) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system_prompt}]
        if summary:
            head.append(
                {"role": "system", "content": f"Summary of the earlier conversation: {summary}"}
            )
        return head + messages

    async def _remember(self, messages: list[dict[str, Any]], summary: str | None) -> None:
        """Keep the last ``memory_window`` messages, cut where a user message
        starts (a tool result never loses the call it answers). The turn just
        answered is always kept whole, even when it alone is longer than the
        window."""
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
        cut = max(0, len(messages) - self.memory_window)
        while 0 < cut < last_user and messages[cut].get("role") != "user":
            cut += 1
        cut = min(cut, last_user)
        if cut:
            summary = await self.summarize(messages[:cut], summary)
        state: dict[str, Any] = {"messages": messages[cut:]}
        if summary:
            state["summary"] = summary
        self.state = state


class _Turn:
    """One run of one turn: its model calls (numbered), what an earlier attempt
    already streamed, tool calls, token accounting."""

    def __init__(self, agent: LLMAgent, ctx: TaskContext) -> None:
        self.agent = agent
        self.ctx = ctx
        self.calls = 0
        self.shown: list[str] = []  # per model call, the text clients already have
        self.resumed = False
        self.marked = False

    async def resume_point(self) -> None:
        """Read what earlier runs of this turn streamed: a re-run attempt, or a
        redriven task (whose attempts count from 1 again)."""
        seen = Answer()
        ran_before = False
        for event in await self.ctx.client.event_history(self.ctx.task_id):
            if event.kind == "event" and isinstance(event.data, dict):
                ran_before = ran_before or event.data.get("type") in _TURN_EVENTS
                seen.apply(event.data)
        if not ran_before:
            return
        self.resumed = True
        self.shown = list(seen.calls)
        if not any(self.shown):
            self._mark(0, 0, "the turn is run again")

    def _mark(self, call: int, kept: int, reason: str) -> None:
        """Write a restart marker; clients keep ``kept`` characters of ``call``
        and drop every later call's text — and so does this turn's view."""
        self.marked = True
        if call < len(self.shown):
            self.shown[call:] = [self.shown[call][:kept]]
        self.ctx.emit(
            {"type": "restart", "attempt": self.ctx.attempt, "call": call, "kept": kept,
             "reason": reason}
        )  # fmt: skip

    async def model_call(
        self, prompt: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> Completion:
        call = self.calls
        self.calls += 1
        already = self.shown[call] if call < len(self.shown) else ""
        writer = _CallWriter(self, call, already, "the turn is run again" if already else "")
        agent = self.agent
        model = agent.model()
        restarts = 0
        while True:
            try:
                completion = await self._stream(model, prompt, tools, writer)
                break
            except LLMStreamBroken as broken:
                self._account_broken(prompt, broken.partial, writer.pieces)
                if restarts >= agent.max_stream_restarts:
                    raise
                restarts += 1
                writer.again(f"the model stream broke ({broken}); asked again")
        writer.finish()
        self._account(completion)
        self.ctx.emit(
            {"type": "answer", "call": call, "provider": completion.provider,
             "instance": completion.instance, "model": completion.model,
             "cached": completion.cached, "finish_reason": completion.finish_reason,
             "usage": _usage_dict(completion)}
        )  # fmt: skip
        return completion

    async def _stream(
        self,
        model: ChatModel,
        prompt: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        writer: _CallWriter,
    ) -> Completion:
        completion: Completion | None = None
        stream = model.stream(
            prompt, key=self.agent.key, tools=tools, **self.agent.request_params()
        )
        writer.pieces = 0
        async for delta in stream:
            if delta.content:
                writer.pieces += 1
                writer.write(delta.content)
            if delta.done:
                completion = delta.completion
        if completion is None:
            raise ShoalError("the model stream ended without its final delta")
        return completion

    async def run_tools(self, calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
        """Run one answer's tool calls at once; their results as tool messages, in
        the order the model asked."""
        call = self.calls - 1
        seen: dict[str, int] = {}
        ordinals = []
        for tool_call in calls:
            ordinals.append(seen.get(tool_call.name, 0))
            seen[tool_call.name] = ordinals[-1] + 1
        results = await asyncio.gather(
            *(self._run_tool(call, i, c, ordinals[i]) for i, c in enumerate(calls))
        )
        return list(results)

    async def _run_tool(
        self, call: int, index: int, tool_call: ToolCall, ordinal: int
    ) -> dict[str, Any]:
        ctx = self.ctx
        tools = {tool.name: tool for tool in self.agent.tools}
        tool = tools.get(tool_call.name)
        ctx.emit(
            {"type": "tool_call", "call": call, "index": index, "name": tool_call.name,
             "arguments": tool_call.raw_arguments[:_ARGS_SHOWN]}
        )  # fmt: skip
        ok = False
        if tool is None:
            content = f"error: there is no tool {tool_call.name!r}; the tools are {sorted(tools)}"
        elif tool_call.arguments is None:
            content = (
                f"error: the arguments must be a JSON object, got {tool_call.raw_arguments[:200]!r}"
            )
        else:
            digest = hashlib.sha256(
                f"{tool_call.name}\0{tool_call.raw_arguments}".encode()
            ).hexdigest()[:16]
            try:
                result = await tool.run(
                    ctx, tool_call.arguments,
                    idempotency_key=f"{ctx.task_id}:{call}:{index}:{digest}",
                    conversation=self.agent.key or "", ordinal=ordinal,
                )  # fmt: skip
                content, ok = tool_result_text(result), True
            except Exception as exc:  # a failed tool is news for the model, not the turn's end
                content = f"error: {type(exc).__name__}: {exc}"
        ctx.emit(
            {"type": "tool_result", "call": call, "index": index, "name": tool_call.name,
             "ok": ok, "content": content[:_ARGS_SHOWN]}
        )  # fmt: skip
        return {"role": "tool", "tool_call_id": tool_call.id, "content": content}

    async def finish(self) -> None:
        """Drop what an earlier attempt streamed beyond this one's calls, and make
        sure a re-run turn is marked."""
        if not self.resumed:
            return
        extra = any(self.shown[self.calls :])
        if extra or not self.marked:
            self._mark(self.calls, 0, "the turn is run again")
        await self.ctx.emit({"type": "turn_end", "calls": self.calls})

    def _account(self, completion: Completion) -> None:
        """Charge the call's tokens to the agent type and the submitting API key
        (metrics) and to the task (its record's usage)."""
        usage = completion.usage
        if usage is None or completion.cached:
            return  # a cached answer spent nothing now
        self._charge(completion, usage.prompt_tokens, usage.completion_tokens)

    def _account_broken(
        self, prompt: list[dict[str, Any]], partial: Completion, pieces: int
    ) -> None:
        """A stream that broke mid-answer sent no usage, but its tokens were
        spent: charge an estimate — the prompt's characters / 4 and one token per
        piece received (what servers stream)."""
        if partial.usage is not None:
            self._charge(partial, partial.usage.prompt_tokens, partial.usage.completion_tokens)
            return
        chars = sum(len(str(m.get("content") or "")) for m in prompt)
        self._charge(partial, -(-chars // 4), pieces)

    def _charge(self, completion: Completion, prompt_tokens: int, completion_tokens: int) -> None:
        agent = self.agent
        api_key = self.ctx.submitted_by or "-"
        model = completion.model or agent.model_name or "-"
        labels = (agent.agent_type, completion.provider or "-", model, api_key)
        metrics.LLM_TOKENS.labels(*labels, "prompt").inc(prompt_tokens)
        metrics.LLM_TOKENS.labels(*labels, "completion").inc(completion_tokens)
        self.ctx.record_usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


class _CallWriter:
    """Streams one model call's text into token events, skipping what clients
    already have from an earlier attempt (or an earlier, broken stream of this
    call) as long as the new text repeats it, and marking the restart where the
    new text first says something new."""

    def __init__(self, turn: _Turn, call: int, shown: str, reason: str) -> None:
        self.turn = turn
        self.call = call
        self.shown = shown  # what clients have of this call
        self.produced = ""  # the text of the current generation
        self.synced = not shown  # shown == produced and new text is streamed
        self.reason = reason
        self.pieces = 0  # content pieces of the current generation (for accounting)

    def write(self, piece: str) -> None:
        self.produced += piece
        if self.synced:
            self._token(piece)
            return
        if len(self.produced) < len(self.shown) and self.shown.startswith(self.produced):
            return  # still repeating what clients have
        same = _common_prefix(self.shown, self.produced)
        self.turn._mark(self.call, same, self.reason)
        self.shown = self.shown[:same]
        self.synced = True
        self._token(self.produced[same:])

    def _token(self, text: str) -> None:
        if text:
            self.turn.ctx.emit(
                {"type": "token", "call": self.call, "offset": len(self.shown), "text": text}
            )
            self.shown += text

    def again(self, reason: str) -> None:
        """A new generation of this call begins (the last stream broke)."""
        self.produced = ""
        self.synced = not self.shown
        self.reason = reason

    def finish(self) -> None:
        if not self.synced:  # the new text is a prefix of (or equal to) what was shown
            kept = len(self.produced)
            if kept < len(self.shown):  # equal: nothing to say yet (the turn marks at its end)
                self.turn._mark(self.call, kept, self.reason)
            self.shown = self.produced
            self.synced = True


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_message(completion: Completion, *, with_calls: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": completion.content or None}
    if completion.tool_calls and with_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.raw_arguments}}
            for c in completion.tool_calls
        ]  # fmt: skip
    return message


def _usage_dict(completion: Completion) -> dict[str, int] | None:
    usage = completion.usage
    if usage is None:
        return None
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def _check_class(cls: type[LLMAgent]) -> None:
    """Class attributes are configuration: check them at import time."""
    if not isinstance(cls.system_prompt, str):
        raise ConfigurationError(f"{cls.__qualname__}.system_prompt must be a string")
    for name in ("memory_window", "max_tool_rounds", "max_stream_restarts"):
        value = getattr(cls, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigurationError(f"{cls.__qualname__}.{name} must be a whole number >= 0")
    if cls.memory_window < 1:
        raise ConfigurationError(f"{cls.__qualname__}.memory_window must be >= 1")
    names = [getattr(tool, "name", None) for tool in cls.tools]
    for tool in cls.tools:
        if not isinstance(tool, Tool):
            raise ConfigurationError(
                f"{cls.__qualname__}.tools holds {tool!r}: make tools with capability_tool() "
                "or agent_tool()"
            )
    if len(set(names)) != len(names):
        raise ConfigurationError(f"{cls.__qualname__}.tools has two tools of one name: {names}")
    if cls.temperature is not None and not (
        isinstance(cls.temperature, int | float) and 0 <= cls.temperature <= 2
    ):
        raise ConfigurationError(f"{cls.__qualname__}.temperature must be 0..2")
