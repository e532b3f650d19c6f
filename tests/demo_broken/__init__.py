"""The bundled examples with two faults, for proving that ``shoal demo`` fails when it
should: one document never finishes (lost) and one gets a wrong summary."""

from __future__ import annotations

import asyncio
from typing import Any

from shoal import capability
from shoal.agent import Agent
from shoal.examples import agents as example_agents
from shoal.examples.pipeline import Splitter

NEVER_ENDS = "doc-0003"
WRONG = "doc-0005"


class FaultySplitter(Splitter):
    @capability("process_document")
    async def process_document(self, doc_id: str, text: str) -> dict[str, Any]:
        if doc_id == NEVER_ENDS:
            await asyncio.Event().wait()  # hangs: the demo must count it as lost
        result = await super().process_document(doc_id, text)
        if doc_id == WRONG:
            result["summary"] = "not what the document says"
        return result


agents: list[type[Agent]] = [FaultySplitter, *(a for a in example_agents if a is not Splitter)]
