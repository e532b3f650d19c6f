"""The addressed agents bench.agents runs, and a node launcher for them.

    python -m bench.agents_app --types bench_counter [--concurrency 256]
        [--max-active-agents 10000] [--idle-after 300] [--name N]

The launcher is ``shoal node --app bench.agents_app`` (the same ``run_node`` and
NodeConfig) except that it hosts only the agent types named by ``--types``: the
request benchmark puts the pinger and the ponger on different node processes.

Every type has a ``@capability`` although the benchmarks only send it messages: a
node whose types have none crashes at start (ZeroDivisionError in
Node._queue_order, which rotates over an empty capability list), so each
handler-only type carries a no-op one, ``<type>_noop``, that nothing calls.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from shoal import Agent, capability, handler
from shoal.node import NodeConfig, run_node
from shoal.settings import Settings


class BenchCounter(Agent):
    """One message, one small state write: what the million-agent run sends."""

    @capability("bench_counter_noop")
    async def noop(self) -> None:
        """Never called (see the module docstring)."""

    @handler
    async def receive(self, message: Any) -> None:
        self.state["n"] = self.state.get("n", 0) + 1


class Ponger(Agent):
    """Replies with what it got."""

    @capability("ponger_noop")
    async def noop(self) -> None:
        """Never called (see the module docstring)."""

    @handler
    async def receive(self, message: Any) -> Any:
        return message


class Pinger(Agent):
    """Asks another agent ``k`` times in a row and times each round trip."""

    @capability("ping_many")
    async def ping_many(self, target: str, k: int) -> list[float]:
        samples = []
        for i in range(k):
            start = time.perf_counter()
            reply = await self.ctx.request(target, i, timeout=10)
            samples.append(time.perf_counter() - start)
            if reply != i:
                raise ValueError(f"ponger answered {reply!r} to {i}")
        return samples


class Conversation(Agent):
    """A long conversation: each turn waits on (simulated) I/O, then sends the
    next turn's message to itself, until ``turns`` turns are done."""

    @capability("conversation_noop")
    async def noop(self) -> None:
        """Never called (see the module docstring)."""

    @handler
    async def receive(self, message: dict[str, Any]) -> None:
        turn, turns, io_s = message["turn"], message["turns"], message["io_s"]
        await asyncio.sleep(io_s)  # simulated I/O: a model or tool call of known duration
        self.state["turn"] = turn
        if turn < turns:
            assert self.id is not None
            await self.ctx.send(self.id, {**message, "turn": turn + 1})


agents = [BenchCounter, Ponger, Pinger, Conversation]
BY_TYPE = {a.agent_type: a for a in agents}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--types", required=True, help="comma-separated agent types to host")
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--max-active-agents", type=int, default=10_000)
    parser.add_argument("--idle-after", type=float, default=300.0)
    parser.add_argument("--name", default=None)
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args()
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    hosted = [BY_TYPE[name] for name in args.types.split(",")]
    config = NodeConfig(
        concurrency=args.concurrency,
        name=args.name,
        max_active_agents=args.max_active_agents,
        idle_after=args.idle_after,
    )
    run_node(hosted, Settings.from_env(), config)


if __name__ == "__main__":
    main()
