"""The agents the benchmarks run: a no-op capability, so what is measured is Shoal,
and a 'nap' for the failover benchmark (tasks that take a known time)."""

import asyncio

from shoal import Agent, capability


class Noop(Agent):
    @capability("noop")
    async def noop(self, i: int = 0) -> int:
        return i

    @capability("nap")
    async def nap(self, seconds: float = 0.2, i: int = 0) -> int:
        await asyncio.sleep(seconds)  # the work itself: a task of known duration
        return i
