"""An agent's turn commits (its outcome, its task's 'done' event) apart from the
node's batched events: the commit must not overtake the events the turn emitted,
or a follower stops before the last ones. Async and sync (thread) handlers alike,
many turns at once on a real node and engine."""

from __future__ import annotations

import asyncio

import pytest

from shoal import Agent, Client, Settings, capability
from tests.conftest import running_node

EVENTS = 20


class Chatty(Agent):
    @capability("chatty_async")
    async def chatty_async(self) -> int:
        for i in range(EVENTS):
            self.ctx.emit({"i": i})  # not awaited: written in the background
        return EVENTS

    @capability("chatty_sync")
    def chatty_sync(self) -> int:
        for i in range(EVENTS):
            self.ctx.emit({"i": i})  # from the handler's thread
        return EVENTS


@pytest.mark.parametrize("capability_name", ["chatty_async", "chatty_sync"])
async def test_a_turns_events_all_come_before_its_end(
    client: Client, settings: Settings, capability_name: str
) -> None:
    async def kinds_of(task_id: str) -> list[str]:
        return [e.kind async for e in client.events(task_id)]

    async with running_node([Chatty], settings, concurrency=64):
        handles = await asyncio.gather(
            *(client.submit(capability_name, agent=f"chatty/a{i}") for i in range(50))
        )
        followed = await asyncio.gather(*(kinds_of(h.id) for h in handles))
    for kinds in followed:
        assert kinds == ["event"] * EVENTS + ["done"], kinds
