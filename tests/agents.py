"""Agents used by the tests (importable as ``tests.agents`` by node processes too)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

from shoal import Agent, Retry, capability


class PermanentError(Exception):
    """Declared non-retryable below."""


class Toolbox(Agent):
    switch = False

    @capability("echo")
    async def echo(self, value: Any = None) -> Any:
        return value

    @capability("add")
    def add(self, a: int, b: int) -> dict[str, Any]:
        """A sync handler: runs in the node's thread pool, not on the event loop."""
        return {"sum": a + b, "thread": threading.current_thread().name}

    @capability("whoami")
    async def whoami(self, i: int = 0) -> dict[str, Any]:
        return {"i": i, "node": self.ctx.node_id, "attempt": self.ctx.attempt}

    @capability("report")
    async def report(self, steps: int = 3) -> str:
        for step in range(steps):
            await self.ctx.progress((step + 1) / steps, f"step {step + 1}")
        self.ctx.log("all steps done")
        self.ctx.emit({"custom": True})
        return "reported"

    @capability("sync_report")
    def sync_report(self) -> str:
        self.ctx.progress(0.5, "from a thread")
        return "ok"

    @capability("sleepy")
    async def sleepy(self, seconds: float = 5.0) -> str:
        await asyncio.sleep(seconds)  # the work itself: a handler that takes time
        return "woke"

    @capability("blocking_sleep")
    def blocking_sleep(self, seconds: float = 5.0) -> str:
        time.sleep(seconds)  # the work itself: a sync handler that blocks its thread
        return "woke"

    @capability("flaky", backoff=0.05, max_backoff=0.2)
    async def flaky(self, succeed_on: int = 3) -> int:
        if self.ctx.attempt < succeed_on:
            raise RuntimeError(f"attempt {self.ctx.attempt} fails")
        return self.ctx.attempt

    @capability("always_fails", max_attempts=2, backoff=0.05)
    async def always_fails(self) -> None:
        raise ValueError("this never works")

    @capability("permanent", non_retryable=(PermanentError,), backoff=0.05)
    async def permanent(self) -> None:
        raise PermanentError("no point retrying")

    @capability("asks_retry", max_attempts=3)
    async def asks_retry(self, wait: float = 0.3) -> dict[str, Any]:
        if self.ctx.attempt == 1:
            raise Retry(delay=wait, reason="not yet")
        return {"attempt": self.ctx.attempt, "at": time.time()}

    @capability("parent")
    async def parent(self, n: int = 3) -> list[Any]:
        return [await self.ctx.call("echo", value=i) for i in range(n)]

    @capability("parent_waits")
    async def parent_waits(self) -> Any:
        return await self.ctx.call("sleepy", seconds=30)

    @capability("switchable", max_attempts=1)
    async def switchable(self) -> str:
        """Fails until a test flips Toolbox.switch (in-process nodes share the class)."""
        if not Toolbox.switch:
            raise RuntimeError("switched off")
        return "switched on"

    @capability("bad_event")
    async def bad_event(self) -> None:
        self.ctx.emit({"when": object()})

    @capability("nap")
    async def nap(self, seconds: float = 1.0, i: int = 0) -> dict[str, Any]:
        await asyncio.sleep(seconds)  # the work itself
        return {"i": i, "node": self.ctx.node_id, "token": self.ctx.fencing_token}

    @capability("blocks_loop")
    async def blocks_loop(self, seconds: float = 5.0) -> dict[str, Any]:
        """Misbehaves on purpose: blocks the node's event loop (a sync sleep in an
        async handler) — the node must still look alive to its peers."""
        time.sleep(seconds)  # noqa: ASYNC251 - the misbehaviour under test
        return {"node": self.ctx.node_id, "token": self.ctx.fencing_token}

    @capability("poison", max_attempts=2)
    async def poison(self) -> None:
        os._exit(1)  # kills the node running it, every time

    @capability("own_timeout", max_attempts=1)
    async def own_timeout(self) -> None:
        raise TimeoutError("the upstream API timed out")

    @capability("returns_object")
    async def returns_object(self) -> Any:
        return object()

    @capability("bounded", max_queue_length=5)
    async def bounded(self) -> None:
        return None


class Other(Agent):
    @capability("other")
    async def other(self) -> str:
        return "other"
