"""The node's recorder across an engine outage, on a private engine that is really
stopped: what waits on a flush (``await ctx.emit(...)``, an agent turn's commit)
is released once the events are written after all."""

from __future__ import annotations

import asyncio

from shoal import Client, Settings
from shoal.engine import EmbeddedEngine
from shoal.recorder import Recorder


async def test_a_flush_waited_for_is_released_after_a_failed_write_and_a_later_emit(
    own_engine: EmbeddedEngine,
) -> None:
    settings = Settings(url=own_engine.ensure().url, namespace="rec", engine_timeout=2)
    async with Client(settings=settings) as client:
        recorder = Recorder(client, asyncio.get_running_loop())
        await asyncio.to_thread(own_engine.stop)
        recorder.emit_event("t1", 1, "log", b"first")
        first = recorder.flushed()
        assert first is not None
        failing = asyncio.create_task(recorder.flush())
        await asyncio.sleep(0)  # the write has begun (and will fail)
        recorder.emit_event("t1", 1, "log", b"second")
        second = recorder.flushed()  # a newer waiter, made while the write is out
        assert second is not None and second is not first
        assert await failing is False  # kept for the next try
        await asyncio.to_thread(own_engine.ensure)
        async with asyncio.timeout(10):
            while not await recorder.flush():
                pass
        assert first.done()
        await asyncio.wait_for(second, 1)  # released with it (its callback runs next)
