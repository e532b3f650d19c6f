"""An app for tests/test_llm_providers.py's cluster-wide quota test, run by ``shoal
node`` processes: ``llm_quota_drive`` calls one quota-limited provider as fast as
the quota lets it, from several coroutines, from a common wall-clock instant."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from shoal import Agent, Client, capability
from shoal.llm import Provider, ProviderPool, QuotaExceeded

HELLO = [{"role": "user", "content": "hello there"}]


class QuotaDriver(Agent):
    @capability("llm_quota_drive")
    async def drive(
        self,
        url: str,
        provider: str,
        limits: dict[str, Any],
        start: float,
        seconds: float,
        concurrency: int = 8,
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        end = start + seconds
        async with Client() as client:
            chosen = Provider(provider, model="m", base_url=url, quota_wait=seconds, **limits)
            async with ProviderPool(client, [chosen]) as pool:

                async def worker() -> int:
                    calls = 0
                    while time.time() < end:
                        try:
                            await pool.complete(HELLO, max_tokens=max_tokens)
                        except QuotaExceeded:
                            break
                        calls += 1
                    return calls

                await asyncio.sleep(max(0.0, start - time.time()))  # the common start
                done = await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"node": self.ctx.node_id, "calls": sum(done)}
