"""Agents for the LLMAgent tests, hosted in-process and by ``shoal node`` processes.

``LLM_TEST_AGENTS`` picks what a node process hosts: ``tools`` (the lookup
capability and the helper agent), ``assistant``, or ``all`` (the default). The
model endpoint comes from ``SHOAL_LLM_BASE_URL`` (a test LLMServer).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from shoal import Agent, Client, capability
from shoal.llm import ChatModel, LLMAgent, Provider, ProviderPool, agent_tool, capability_tool


class Lookup(Agent):
    @capability("lookup_word")
    async def lookup_word(self, word: str) -> str:
        """Look a word up.

        The answer names the node that ran it."""
        return f"{word} backwards is {word[::-1]} (node {self.ctx.node_id})"


GATE: dict[str, Any] = {}  # in-process only: a barrier two tool calls must meet at


class Gate(Agent):
    @capability("meet", concurrency=4)
    async def meet(self, who: str) -> str:
        """Wait until every caller of the gate is here: proves calls run at once."""
        barrier: asyncio.Barrier = GATE["barrier"]
        await asyncio.wait_for(barrier.wait(), 10)
        return f"{who} met"


class Helper(LLMAgent):
    system_prompt = "You help the assistant."
    model_name = "test"
    temperature = 0


class Assistant(LLMAgent):
    system_prompt = "You are a test assistant."
    model_name = "test"
    temperature = 0
    tools = [
        capability_tool(Lookup.lookup_word),
        capability_tool(Gate.meet),
        agent_tool("helper", description="Ask the helper agent."),
    ]


class Forgetful(LLMAgent):
    """Remembers two messages; summarises what falls out."""

    model_name = "test"
    temperature = 0
    memory_window = 2
    tools = [capability_tool(Lookup.lookup_word)]

    async def summarize(self, dropped: list[dict[str, Any]], summary: str | None) -> str | None:
        said = [str(m["content"]) for m in dropped if m["role"] == "user"]
        return "; ".join(filter(None, [summary, *said]))


class Cached(LLMAgent):
    """Answers repeated deterministic requests from the response cache."""

    model_name = "test"
    temperature = 0
    cache_responses = True


class Echo(Agent):
    @capability("echo_args")
    async def echo_args(self, **kwargs: Any) -> dict[str, Any]:
        """Say which arguments arrived."""
        return kwargs


class Open(LLMAgent):
    """Offers a tool whose schema names no arguments: anything the model writes
    reaches the handler — as arguments, never as task options."""

    model_name = "test"
    temperature = 0
    tools = [capability_tool("echo_args", parameters={"type": "object"})]


FAIL_AFTER_ANSWERING: dict[str, bool] = {"on": True}  # in-process only


class Wavering(LLMAgent):
    """Fails its first attempt after answering (while FAIL_AFTER_ANSWERING is
    on): its re-run asks the model again, which says something else."""

    system_prompt = "wavering"
    model_name = "test"
    temperature = 0
    tools = [capability_tool(Lookup.lookup_word)]

    async def respond(self, message: str) -> str:
        answer = await super().respond(message)
        if self.ctx.attempt == 1 and FAIL_AFTER_ANSWERING["on"]:
            raise RuntimeError("the first attempt fails after answering")
        return answer


FALLBACK_URL = "LLM_TEST_FALLBACK_URL"


class Routed(LLMAgent):
    """Asks the replicas of the ``llm-local`` service (affinity by conversation),
    then the fixed endpoint in ``LLM_TEST_FALLBACK_URL``."""

    model_name = "test"
    temperature = 0

    def build_model(self, client: Client) -> ChatModel:
        return ProviderPool(
            client,
            [
                Provider("local", model="test", service="llm-local"),
                Provider("hosted", model="test", base_url=os.environ[FALLBACK_URL]),
            ],
        )


_CHOICES = {
    "tools": [Lookup, Helper],
    "assistant": [Assistant],
    "all": [Lookup, Gate, Echo, Helper, Assistant, Forgetful, Cached, Routed, Open, Wavering],
}
agents = _CHOICES[os.environ.get("LLM_TEST_AGENTS", "all")]
