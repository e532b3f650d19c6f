"""Shoal in five minutes: define agents, start nodes, submit tasks, read results.

    python examples/quickstart.py            # starts the embedded engine and 2 nodes
    python examples/quickstart.py --no-nodes   # with nodes you started yourself:
    shoal node --app examples.quickstart

The agents below are ordinary classes; ``@capability`` marks what they can do.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shoal import Agent, Client, capability
from shoal.engine import EmbeddedEngine, mask_url

HERE = Path(__file__).resolve().parent


class Summarizer(Agent):
    @capability("summarize")
    async def summarize(self, text: str, max_words: int = 8) -> str:
        await self.ctx.progress(0.5, "half way")
        return " ".join(text.split()[:max_words])


class Counter(Agent):
    @capability("count_words")
    def count_words(self, text: str) -> dict[str, object]:
        """A plain (sync) function: Shoal runs it in a thread pool."""
        return {"words": len(text.split()), "node": self.ctx.node_id}


def start_nodes(count: int) -> list[subprocess.Popen[bytes]]:
    """`shoal node --app examples.quickstart`, as separate processes."""
    return [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "node", "--app", "examples.quickstart",
             "--name", f"quickstart-{i + 1}", "--log-level", "warning"],
            cwd=HERE.parent,
        )
        for i in range(count)
    ]  # fmt: skip


async def main(tasks: int, nodes: int) -> None:
    async with Client() as client:  # SHOAL_REDIS_URL, or the embedded engine in ./.shoal
        await client.wait_for_hosts("count_words", count=nodes)

        summary = await client.call("summarize", text="Shoal runs agents on many machines at once")
        print("summarize ->", repr(summary))

        handle = await client.submit("summarize", text="follow my events as I work")
        async for event in handle.events():
            print(f"  event {event.kind}: {event.data}")

        start = time.perf_counter()
        handles = await client.submit_many(
            "count_words", [{"text": "word " * (i % 10)} for i in range(tasks)]
        )
        results = await asyncio.gather(*(h.result() for h in handles))
        elapsed = time.perf_counter() - start
        per_node = collections.Counter(r["node"] for r in results)
        print(f"{tasks} tasks done in {elapsed:.2f}s; by node: {dict(per_node)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--no-nodes", action="store_true", help="do not start node processes")
    parser.add_argument("--nodes", type=int, default=2, help="node processes to start/expect")
    args = parser.parse_args()
    os.chdir(HERE.parent)
    embedded = None if os.environ.get("SHOAL_REDIS_URL") else EmbeddedEngine(".shoal")
    ours = embedded is not None and embedded.running() is None  # we start it, we stop it
    if embedded is not None:
        print("engine:", mask_url(embedded.ensure().url), "(embedded, data in ./.shoal)")
    nodes = [] if args.no_nodes else start_nodes(args.nodes)
    try:
        asyncio.run(main(args.tasks, args.nodes))
    finally:
        for node in nodes:
            node.send_signal(signal.SIGTERM)
        for node in nodes:
            node.wait(timeout=30)
        if ours and embedded is not None:
            embedded.stop()
