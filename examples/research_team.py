"""A research team of stateful agents that talk to each other.

    shoal node --app examples.research_team          # one or more nodes, any terminal
    python examples/research_team.py                   # the driver: runs a project
    python examples/research_team.py --nodes 2         # or let the driver start 2 nodes

Who is who (an agent is addressed as ``type/key``; each has its own durable state):

- ``lead/<project>`` runs a project: it sends one addressed task per question to
  ``researcher/<topic>``, then asks ``editor/<topic>`` for the report.
- ``researcher/<topic>`` answers a question: it looks for sources (a capability
  task, any node), asks ``critic/strict`` for a review (a request), keeps a note in
  its state and publishes it on the ``findings`` topic.
- ``editor/<topic>`` is subscribed to ``findings``: the findings of
  ``researcher/<topic>`` reach it (same key), and it compiles them into a report.
- ``critic/strict`` reviews drafts sent to it with ``request`` and counts them.
- ``Librarian`` is a plain capability (``find_sources``): stateless, load-balanced.

Run the driver twice: the researchers' notes and the lead's run count carry over,
because agent state lives in the engine, not in the node.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from shoal import Agent, Client, RequestTimeout, Settings, capability, handler, subscribe
from shoal.engine import EmbeddedEngine

HERE = Path(__file__).resolve().parent

CORPUS = [
    "Tides follow the pull of the Moon and the Sun",
    "Spring tides come with the full and the new Moon",
    "Tidal currents are strongest in narrow straits",
    "Coral reefs grow where the water is warm and clear",
    "Reefs bleach when the water warms for weeks",
    "Kelp forests shelter fish along cold coasts",
]

TOPICS = {
    "tides": ["Why does the Moon cause tides?", "When are spring tides?"],
    "reefs": ["Why do reefs bleach?", "What shelters fish along cold coasts?"],
}


def _words(text: str) -> set[str]:
    return {w.strip("?.,").lower() for w in text.split() if len(w.strip("?.,")) > 3}


class Librarian(Agent):
    """A stateless capability: any node hosting it may run the task."""

    @capability("find_sources")
    async def find_sources(self, question: str) -> list[str]:
        wanted = _words(question)
        scored = [(len(wanted & _words(doc)), doc) for doc in CORPUS]
        return [doc for score, doc in sorted(scored, reverse=True) if score][:3]


class Critic(Agent):
    """``critic/<name>``: reviews drafts sent with ``request``; the reply is the
    handler's return value."""

    @handler
    async def review(self, draft: dict[str, Any]) -> dict[str, Any]:
        self.state["reviews"] = self.state.get("reviews", 0) + 1
        enough = len(draft["sources"]) >= 2
        return {
            "verdict": "accepted" if enough else "needs more sources",
            "by": self.id,
            "reviews_so_far": self.state["reviews"],
        }


class Researcher(Agent):
    """``researcher/<topic>``: one question at a time, notes kept in its state."""

    @capability("investigate")
    async def investigate(self, question: str) -> dict[str, Any]:
        sources = await self.ctx.call("find_sources", question=question, result_timeout=30)
        try:
            review = await self.ctx.request(
                "critic/strict", {"question": question, "sources": sources}, timeout=30
            )
        except RequestTimeout:
            review = {"verdict": "unreviewed"}
        note = {
            "question": question,
            "answer": sources[0] if sources else "nothing found",
            "sources": len(sources),
            "verdict": review["verdict"],
        }
        self.state.setdefault("notes", []).append(note)
        # To every agent type subscribed to 'findings', keyed like this agent: editor/<topic>.
        await self.ctx.publish("findings", note)
        return {**note, "notes_so_far": len(self.state["notes"])}

    @handler
    async def tell(self, message: Any) -> dict[str, Any]:
        """Direct messages: anything asks for what this researcher knows."""
        notes = self.state.get("notes", [])
        return {"topic": self.key, "notes": len(notes), "questions": [n["question"] for n in notes]}


class Editor(Agent):
    """``editor/<topic>``: collects the findings of ``researcher/<topic>``."""

    @subscribe("findings")
    async def collect(self, finding: dict[str, Any]) -> None:
        # Keyed by question: a finding delivered twice (at-least-once) is stored once.
        self.state.setdefault("findings", {})[finding["question"]] = finding

    @capability("compile_report")
    async def compile_report(self) -> dict[str, Any]:
        findings = list(self.state.get("findings", {}).values())
        return {
            "topic": self.key,
            "findings": [f"{f['question']} {f['answer']} ({f['verdict']})" for f in findings],
            "accepted": sum(f["verdict"] == "accepted" for f in findings),
        }


class Lead(Agent):
    """``lead/<project>``: fans questions out to researchers, gathers the reports."""

    @capability("run_project")
    async def run_project(self, topics: dict[str, list[str]]) -> dict[str, Any]:
        handles = [
            await self.ctx.submit("investigate", agent=f"researcher/{topic}", question=question)
            for topic, questions in topics.items()
            for question in questions
        ]  # one researcher handles its questions in order; different ones run at once
        answers = await asyncio.gather(*(h.result(timeout=60) for h in handles))
        reports = [
            await self.ctx.call("compile_report", agent=f"editor/{topic}", result_timeout=60)
            for topic in topics
        ]
        self.state["runs"] = self.state.get("runs", 0) + 1
        return {"project": self.key, "run": self.state["runs"], "answers": answers,
                "reports": reports}  # fmt: skip


agents = [Librarian, Critic, Researcher, Editor, Lead]  # what `shoal node --app` hosts


async def run_team(
    client: Client, project: str = "ocean", topics: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """Run one project through the team; what the agents answered and remember."""
    topics = topics or TOPICS
    outcome = await client.call(
        "run_project", agent=f"lead/{project}", topics=topics, result_timeout=120
    )
    known = {t: await client.request(f"researcher/{t}", "what do you know?") for t in topics}
    critic = await client.agent_state("critic/strict") or {}
    return {**outcome, "researchers": known, "critic_reviews": critic.get("reviews", 0)}


def show(result: dict[str, Any]) -> None:
    print(f"project {result['project']}, run {result['run']}")
    for answer in result["answers"]:
        print(f"  {answer['question']:<38} -> {answer['answer']} [{answer['verdict']}]")
    for report in result["reports"]:
        print(f"report on {report['topic']}: {report['accepted']} accepted")
        for line in report["findings"]:
            print(f"  - {line}")
    for topic, known in result["researchers"].items():
        print(f"researcher/{topic} remembers {known['notes']} note(s)")
    print(f"critic/strict has reviewed {result['critic_reviews']} draft(s) in all")


def start_nodes(count: int, data_dir: Path) -> list[subprocess.Popen[bytes]]:
    """`shoal node --app examples.research_team`, as separate processes."""
    env = {**os.environ, "SHOAL_DATA_DIR": str(data_dir.resolve())}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "node", "--app", "examples.research_team",
             "--name", f"team-{i + 1}", "--log-level", "warning"],
            cwd=HERE.parent, env=env,
        )
        for i in range(count)
    ]  # fmt: skip


async def main(project: str, nodes: int) -> None:
    async with Client() as client:
        print("waiting for a node hosting the team (shoal node --app examples.research_team)")
        await client.wait_for_hosts("run_project", count=max(nodes, 1), timeout=60)
        result = await run_team(client, project)
        show(result)
        for topic in TOPICS:
            info = await client.agent(f"researcher/{topic}")
            for _ in range(20):  # nodes publish their active agents about once a second
                if info.node:
                    break
                await asyncio.sleep(0.1)
                info = await client.agent(f"researcher/{topic}")
            print(f"{info.id}: partition {info.partition}, node {info.node or '-'}, "
                  f"state {info.state_size} B")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", default="ocean", help="key of the lead agent")
    parser.add_argument("--nodes", type=int, default=0, help="node processes to start (0: none)")
    args = parser.parse_args()
    settings = Settings.from_env()
    embedded = None if settings.url else EmbeddedEngine(settings.data_dir)
    ours = args.nodes > 0 and embedded is not None and embedded.running() is None
    started = start_nodes(args.nodes, settings.data_dir) if args.nodes else []
    try:
        asyncio.run(main(args.project, args.nodes))
    finally:
        for node in started:
            node.send_signal(signal.SIGTERM)
        for node in started:
            node.wait(timeout=30)
        if ours and embedded is not None:
            embedded.stop()  # started for this run: stop it again
