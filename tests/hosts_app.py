"""The app of the nodes in tests/test_hosts.py (``--app tests.hosts_app``): a
capability that records every run it starts, and the stateful Counter agent."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis.asyncio

from shoal import Agent, capability
from tests.stateful import Counter

_probe: redis.asyncio.Redis | None = None


def probe() -> redis.asyncio.Redis:
    """This process's own engine connection, outside Shoal's commits: a run is
    recorded there even if its outcome is later refused. (Nodes run one event loop.)"""
    global _probe
    if _probe is None:
        url = os.environ.get("SHOAL_REDIS_URL")
        if not url:
            raise RuntimeError("the hosts app needs SHOAL_REDIS_URL (the test sets it)")
        _probe = redis.asyncio.Redis.from_url(url)
    return _probe


class Worker(Agent):
    """Capability tasks whose every run leaves a trace, refused outcome or not."""

    @capability("work")
    async def work(self, runs: str, i: int, seconds: float) -> dict[str, Any]:
        """Appends ``'<i> <node> <token> <start time>'`` to the list ``runs``, then
        takes ``seconds``: a test sees every run of a task, and when it started,
        also the runs whose outcome was refused."""
        node, token = self.ctx.node_id, self.ctx.fencing_token
        await probe().rpush(runs, f"{i} {node} {token} {time.time()!r}")
        await asyncio.sleep(seconds)  # the work itself: long enough to be cut mid-run
        return {"i": i, "node": node, "token": token}


agents = [Worker, Counter]
