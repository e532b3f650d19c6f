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
        return {
            "count": len(self.state["seen"]),
            "sender": self.ctx.sender,
            "node": self.ctx.node_id,
        }

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


# --- appended for tests/test_agent_failover.py -----------------------------------------

_probes: dict[int, Any] = {}


def _probe() -> Any:
    """This process's own connection to the engine (outside Shoal's commits), one per
    event loop: what a turn records there is seen even if its commit is refused."""
    import redis.asyncio

    loop = id(asyncio.get_running_loop())
    if loop not in _probes:
        url = os.environ.get("SHOAL_REDIS_URL")
        if not url:
            raise RuntimeError("Guarded needs SHOAL_REDIS_URL (node_process sets it)")
        _probes[loop] = redis.asyncio.Redis.from_url(url)
    return _probes[loop]


class Guarded(Agent):
    """Detects turns of one agent that overlap (two nodes, or two turns on one node)
    and messages run more than once, through the engine but outside the turn's commit.

    A message is ``{"probe": <key prefix>, "seq": n, "hold": seconds}``. A turn holds
    ``<probe>:busy:<agent id>`` up by one while it runs and records itself in
    ``<probe>:overlaps`` if another turn of the agent held it already; it counts its
    runs in the hash ``<probe>:runs`` (field ``<agent id>:<seq>``) and per node in
    ``<probe>:nodes``. The state keeps the sequence numbers in the order the turns
    committed them."""

    @handler
    async def receive(self, message: dict[str, Any]) -> int:
        probe, base, seq = _probe(), message["probe"], message["seq"]
        me = self.ctx.agent_id
        busy = f"{base}:busy:{me}"
        depth = await probe.incr(busy)
        try:
            if depth != 1:
                await probe.rpush(
                    f"{base}:overlaps", f"{me} seq {seq} on {self.ctx.node_id}: depth {depth}"
                )
            await probe.hincrby(f"{base}:runs", f"{me}:{seq}", 1)
            await probe.hincrby(f"{base}:nodes", self.ctx.node_id, 1)
            await asyncio.sleep(float(message.get("hold", 0.0)))  # widens any overlap
            self.state.setdefault("seqs", []).append(seq)
        finally:
            await probe.decr(busy)
        return len(self.state["seqs"])
