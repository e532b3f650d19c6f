"""The agent the benchmarks run: a no-op capability, so what is measured is Shoal."""

from shoal import Agent, capability


class Noop(Agent):
    @capability("noop")
    async def noop(self, i: int = 0) -> int:
        return i
