"""One client follows many tasks at once: each follower holds a blocking read of
its own, and none is refused for want of a connection (redis-py's pools stop at
100 unless told otherwise — bench.llm follows 1,000 streamed answers at once)."""

from __future__ import annotations

import asyncio

from shoal import Agent, Client, Settings, capability
from tests.conftest import running_node

FOLLOWERS = 150  # past redis-py's default pool of 100
RELEASE: dict[str, asyncio.Event] = {}


class Waiter(Agent):
    @capability("wait_for_release")
    async def wait_for_release(self) -> str:
        self.ctx.emit({"started": True})
        await RELEASE["go"].wait()
        return "released"


async def test_a_client_follows_more_tasks_at_once_than_a_default_pool_holds(
    client: Client, settings: Settings
) -> None:
    RELEASE["go"] = asyncio.Event()
    async with running_node([Waiter], settings, concurrency=FOLLOWERS):
        handles = [await client.submit("wait_for_release") for _ in range(FOLLOWERS)]
        started = [asyncio.Event() for _ in handles]

        async def follow(i: int) -> list[str]:
            kinds = []
            async for event in client.events(handles[i].id):
                kinds.append(event.kind)
                started[i].set()
            return kinds

        followers = [asyncio.create_task(follow(i)) for i in range(FOLLOWERS)]
        async with asyncio.timeout(20):  # every follower reads while the others block
            await asyncio.gather(*(s.wait() for s in started))
        RELEASE["go"].set()
        kinds = await asyncio.wait_for(asyncio.gather(*followers), 20)
    assert all(k[0] == "event" and k[-1] == "done" for k in kinds)
