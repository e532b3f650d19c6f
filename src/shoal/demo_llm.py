"""The LLM part of ``shoal demo``: the research assistant, when a model is configured.

With ``SHOAL_LLM_BASE_URL`` (and ``SHOAL_LLM_MODEL``) set, the demo asks the
research assistant (``shoal.examples.research``) one question after its non-LLM
workload: a node in the demo's process hosts the planner, researchers, writer and
their tools; the question is a task to ``planner/<id>``, and its answer is
followed as it streams. Before that, one tiny direct call checks the endpoint, so
a wrong URL, key or model name is reported at once, in the endpoint's own words.

Without an endpoint nothing here runs and the demo says so: a model is never
faked. Whatever happens, this part only reports — it cannot change the verdict of
the non-LLM workload (a model is outside Shoal's control, and the endpoint a user
points at may be slow or down).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.client import Client
from shoal.errors import ShoalError
from shoal.llm.answer import follow_answer
from shoal.llm.client import ENV_BASE_URL, ENV_MODEL, NO_RETRY, LLMClient
from shoal.settings import Settings

QUESTION = "How does Shoal keep an agent's work going when the node running it dies?"
PROBE_TIMEOUT_S = 30.0  # the endpoint check: one short answer
LLM_TIMEOUT_S = 180.0  # the whole part: three agents' turns on a laptop-sized model
NOT_CONFIGURED = (
    f"no model endpoint configured: set {ENV_BASE_URL} (and {ENV_MODEL}) to include the "
    "LLM research assistant; running the non-LLM workload"
)


def endpoint() -> str | None:
    """The configured model endpoint, if any."""
    return os.environ.get(ENV_BASE_URL) or None


@dataclass
class LLMReport:
    """What the LLM part did. ``ok``: an answer arrived, streamed, non-empty."""

    configured: bool
    ok: bool = False
    error: str = ""  # what failed, in words a user can act on
    model: str = ""
    answer: str = ""
    first_token_s: float | None = None  # from submitting the question
    seconds: float = 0.0
    token_events: int = 0
    completion_tokens: int = 0
    tool_calls: list[str] = field(default_factory=list)  # the planner's, in order

    def data(self) -> dict[str, Any]:
        """For ``shoal demo --json``."""
        return {
            "configured": self.configured, "ok": self.ok, "error": self.error or None,
            "model": self.model or None, "answer_chars": len(self.answer),
            "first_token_s": _round(self.first_token_s), "seconds": round(self.seconds, 2),
            "token_events": self.token_events, "completion_tokens": self.completion_tokens,
            "tool_calls": self.tool_calls,
        }  # fmt: skip


async def run_llm_part(
    settings: Settings, on_text: Callable[[str], None], timeout: float = LLM_TIMEOUT_S
) -> LLMReport:
    """Check the endpoint, then ask the research assistant, streaming its answer to
    ``on_text``; every failure ends up in the report, none is raised."""
    report = LLMReport(configured=True, model=os.environ.get(ENV_MODEL, ""))
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            await _probe()
            await _ask(settings, report, on_text)
    except TimeoutError:
        report.error = f"no answer within {timeout:.0f}s"
    except ShoalError as exc:
        report.error = f"{type(exc).__name__}: {exc}"
    report.seconds = time.monotonic() - started
    report.ok = not report.error and bool(report.answer.strip())
    if not report.ok and not report.error:
        report.error = "the answer was empty"
    return report


async def _probe() -> None:
    """One short direct call: the endpoint answers, the key and model are right."""
    async with LLMClient(retry=NO_RETRY, read_timeout=PROBE_TIMEOUT_S) as llm:
        await llm.complete([{"role": "user", "content": "Say OK."}], max_tokens=5)


async def _ask(settings: Settings, report: LLMReport, on_text: Callable[[str], None]) -> None:
    from shoal.examples import research  # imported here: its module warns without a model
    from shoal.node import Node, NodeConfig

    node = Node(
        research.agents, settings, NodeConfig(name=f"llm-{uuid.uuid4().hex[:4]}", grace_period=2.0)
    )
    running = asyncio.create_task(node.run())
    try:
        async with Client(settings=settings) as client:
            await client.wait_for_hosts("planner.chat", timeout=15)
            submitted = time.monotonic()
            handle = await client.submit(
                "planner.chat", agent=f"planner/demo-{uuid.uuid4().hex[:6]}",
                message=QUESTION, max_attempts=1,
            )  # fmt: skip
            async for piece in follow_answer(client, handle.id):
                if report.first_token_s is None and piece.text:
                    report.first_token_s = time.monotonic() - submitted
                report.token_events += 1
                on_text(piece.text)
            report.answer = str(await handle.result(timeout=30))
            _read_events(report, [e.data for e in await client.event_history(handle.id)])
    finally:
        node.stop()
        await asyncio.wait_for(running, 30)


def _read_events(report: LLMReport, events: list[Any]) -> None:
    for data in events:
        if not isinstance(data, dict):
            continue
        if data.get("type") == "tool_call":
            report.tool_calls.append(str(data.get("name")))
        elif data.get("type") == "answer":
            report.completion_tokens += int((data.get("usage") or {}).get("completion_tokens", 0))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
