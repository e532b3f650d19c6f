"""What docs/cli.md's examples talk to, on one node: the quickstart's summarize (with
a progress event) and count_words, the stateful counter and relay agents, and the
Toolbox (always_fails …). The quickstart's own ``Counter`` would take the agent type
name 'counter', so count_words is defined again here under another class name."""

from __future__ import annotations

from examples.quickstart import Summarizer

from shoal import Agent, capability
from tests.agents import Toolbox
from tests.stateful import Counter, Relay


class WordCounter(Agent):
    @capability("count_words")
    def count_words(self, text: str) -> dict[str, object]:
        return {"words": len(text.split()), "node": self.ctx.node_id}


agents = [Summarizer, WordCounter, Counter, Relay, Toolbox]
