"""A node app for the event-stream tests: a task that reports progress as it goes."""

from __future__ import annotations

import asyncio

from shoal import Agent, capability


class Ticker(Agent):
    @capability("tick", max_attempts=3)
    async def tick(self, steps: int = 20, interval: float = 0.05) -> str:
        """One progress event per step, ``interval`` seconds apart (the work itself)."""
        for step in range(steps):
            await self.ctx.progress((step + 1) / steps, f"attempt {self.ctx.attempt} step {step}")
            await asyncio.sleep(interval)
        return "ticked"
