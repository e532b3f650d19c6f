"""Addressed, stateful agents used by the agent-plane tests (importable by node
processes as ``tests.stateful``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from shoal import Agent, capability, handler, subscribe


class Counter(Agent):
    """Counts, and remembers every message in arrival order."""

    @capability("increment")
    async def increment(self, by: int = 1) -> int:
        self.state["n"] = self.state.get("n", 0) + by
        return int(self.state["n"])

    @capability("slow_append")
    async def slow_append(self, item: Any, seconds: float = 0.0) -> int:
        """Appends after a pause, to show that turns do not overlap."""
        await asyncio.sleep(seconds)  # simulated I/O inside a turn
        self.state.setdefault("seen", []).append(item)
        return len(self.state["seen"])

    @capability("whereami")
    async def whereami(self) -> dict[str, Any]:
        return {"node": self.ctx.node_id, "pid": os.getpid(), "token": self.ctx.fencing_token}

    @handler
    async def receive(self, message: Any) -> Any:
        self.state.setdefault("seen", []).append(message)
        if isinstance(message, dict) and message.get("fail"):
            raise ValueError("asked to fail")
        return {"count": len(self.state["seen"]), "sender": self.ctx.sender, "node": self.ctx.node_id}

    @subscribe("findings")
    async def on_finding(self, message: Any) -> None:
        self.state.setdefault("findings", []).append(message)


class Relay(Agent):
    """Asks another agent and records the answer: request/response between agents."""

    @capability("ask")
    async def ask(self, target: str, message: Any) -> Any:
        reply = await self.ctx.request(target, message, timeout=10)
        self.state["last_reply"] = reply
        return {"reply": reply, "node": self.ctx.node_id}

    @capability("announce")
    async def announce(self, finding: str) -> int:
        return await self.ctx.publish("findings", {"finding": finding})


agents = [Counter, Relay]
