"""Agents for tests/test_config.py (importable as ``tests.config_app`` by node
processes too): each capability shows one live setting at work."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from shoal import Agent, capability


class Limited(Agent):
    """``cfg_gated`` tasks wait for ``gate``; the class counts how many run at once."""

    gate: asyncio.Event | None = None
    in_flight = 0
    peak = 0

    @classmethod
    def reset(cls) -> None:
        cls.gate, cls.in_flight, cls.peak = asyncio.Event(), 0, 0

    @capability("cfg_gated", concurrency=2)
    async def gated(self, i: int = 0) -> int:
        cls = type(self)
        cls.in_flight += 1
        cls.peak = max(cls.peak, cls.in_flight)
        try:
            assert cls.gate is not None
            await cls.gate.wait()
            await asyncio.sleep(0.02)  # long enough for overlapping starts to show
        finally:
            cls.in_flight -= 1
        return i

    @capability("cfg_other")
    async def other(self) -> str:
        return "other"


class Flaky(Agent):
    @capability("cfg_flaky")
    async def flaky(self) -> None:
        raise RuntimeError("always fails")


class Ticker(Agent):
    @capability("cfg_tick")
    async def tick(self, i: int = 0) -> int:
        return i


class Caller(Agent):
    @capability("cfg_breaker")
    async def breaker(self) -> dict[str, Any]:
        """The breaker policy of this node's pool for a service (no policy given)."""
        pool = self.ctx.services("cfg-svc")
        await pool.start()
        assert pool.breaker is not None
        return dataclasses.asdict(pool.breaker)


class Mixed(Agent):
    """A rate-limited capability beside a busy unlimited one and a spare one."""

    @capability("cfg_rated")
    async def rated(self, i: int = 0) -> int:
        return i

    @capability("cfg_busy")
    async def busy(self, i: int = 0) -> int:
        await asyncio.sleep(0.004)  # keeps the node's one slot taken most of the time
        return i

    @capability("cfg_spare")
    async def spare(self) -> str:
        return "spare"
