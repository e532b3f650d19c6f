"""A research assistant: a planner model asks researcher models in parallel, then a writer.

Run it against any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server,
OpenAI...); the model must support tool calls:

    SHOAL_LLM_BASE_URL=http://127.0.0.1:11434/v1 SHOAL_LLM_MODEL=qwen2.5:7b \\
        shoal up --app shoal.examples.research
    # (SHOAL_LLM_API_KEY=... too for a hosted API)

then, in another terminal, ask a question and wait for the answer:

    shoal call planner.chat --agent planner/q1 \\
        message="How does Shoal keep working when a node dies?"

or submit it and watch the answer as the model writes it (token events), and
the planner's tool calls to the researchers and the writer as they happen:

    shoal submit planner.chat --agent planner/q2 message="What limits the load on a model?"
    shoal task <task id> --follow

Who is who (each ``LLMAgent`` conversation is an addressed agent, so its memory
survives a node's death and a follow-up question to ``planner/q1`` continues it):

- ``planner/<question>`` splits the question into sub-questions and asks one
  ``researcher`` each — all of one answer's tool calls run at once, as Shoal
  sub-tasks, on whichever nodes host researchers — then hands the findings to
  the ``writer`` and returns the writer's text.
- ``researcher/<question>.<n>`` answers one sub-question from the notes: its tools
  are the capabilities ``search_notes``, ``fetch_note`` and ``word_count``.
- ``writer/<question>.0`` turns the findings into the final answer, citing note ids.
- ``search_notes`` / ``fetch_note`` / ``word_count`` are plain capabilities over
  ``NOTES``, a small knowledge base bundled here: no internet is needed, and the
  tools are deterministic (the models are not).

Without ``SHOAL_LLM_BASE_URL`` the nodes still start and host every agent (a
warning says so), but each turn fails with "no model endpoint configured".
"""

from __future__ import annotations

import logging
import os
import re

from shoal import Agent, capability
from shoal.llm import ENV_BASE_URL, ENV_MODEL, LLMAgent, agent_tool, capability_tool

__all__ = ["NOTES", "Notes", "Planner", "Researcher", "Writer", "agents", "search"]

log = logging.getLogger("shoal.examples.research")

SEARCH_RESULTS = 3  # notes a search returns at most: enough to choose from, short prompts
_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "by", "can", "do", "does", "for", "from",
     "how", "in", "is", "it", "its", "of", "on", "or", "the", "to", "what", "when", "where",
     "which", "who", "why", "with"}
)  # fmt: skip

NOTES: dict[str, tuple[str, str]] = {
    "leases": (
        "Leases and node death",
        "A node holds a lease on each running task and renews it with its heartbeat. "
        "When a node dies its heartbeat stops, the lease expires, and another node "
        "claims the task and runs it again. Idempotency keys make the re-run find the "
        "sub-tasks the first run already submitted.",
    ),
    "partitions": (
        "Virtual agents and partitions",
        "Agents are virtual: an agent id hashes to a partition, and each partition is "
        "owned by one live node. When the owner dies its partitions are re-owned by "
        "the survivors, which re-activate the agents from the state kept in the engine.",
    ),
    "hashing": (
        "Consistent hashing",
        "Consistent hashing maps keys to replicas so that adding or removing a replica "
        "moves only a small share of the keys. Model calls of one conversation go to "
        "the same replica, whose KV cache is then warm.",
    ),
    "breakers": (
        "Circuit breakers",
        "A circuit breaker stops calling a failing service for a while after repeated "
        "errors, then lets a trial call through. Callers fail fast or fall back to "
        "another provider instead of waiting on timeouts.",
    ),
    "ratelimits": (
        "Cluster-wide rate limits",
        "A token bucket kept in the engine limits requests and tokens per minute for "
        "the whole cluster, not per process, so a thousand agents on ten nodes stay "
        "within one provider quota. Callers wait a bounded time or get QuotaExceeded.",
    ),
    "streams": (
        "Event streams and resuming",
        "Task events are kept in an engine stream with ordered ids. A client that "
        "loses its connection resumes after the last id it saw (Last-Event-ID over "
        "HTTP), so no token of a streamed answer is lost or shown twice.",
    ),
    "backpressure": (
        "Backpressure",
        "Queues and buffers are bounded: when they are full, submitters wait or get "
        "QueueFull, instead of memory growing until a process dies.",
    ),
    "caching": (
        "Response caching",
        "Deterministic model requests, at temperature 0, can be answered from a "
        "two-level cache keyed by a hash of the request: a local memory level in front "
        "of a shared engine level.",
    ),
}


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def search(query: str, limit: int = SEARCH_RESULTS) -> list[dict[str, str]]:
    """The notes sharing the most words with ``query``, best first (ties by id)."""
    wanted = _words(query)
    scored = []
    for note_id, (title, text) in NOTES.items():
        score = len(wanted & _words(f"{note_id} {title} {text}"))
        if score:
            scored.append((-score, note_id))
    return [
        {"id": note_id, "title": NOTES[note_id][0], "snippet": NOTES[note_id][1].split(". ")[0]}
        for _, note_id in sorted(scored)[: max(1, limit)]
    ]


class Notes(Agent):
    """The researchers' tools: stateless capabilities over the bundled notes."""

    @capability("search_notes")
    async def search_notes(self, query: str) -> list[dict[str, str]]:
        """Search the research notes.

        Returns up to three notes (id, title, first sentence) sharing the most words
        with the query; an empty list when none does."""
        return search(query)

    @capability("fetch_note")
    async def fetch_note(self, note_id: str) -> str:
        """Read one research note in full, by its id (from search_notes)."""
        note = NOTES.get(note_id)
        if note is None:
            return f"no note {note_id!r}; the notes are: {', '.join(sorted(NOTES))}"
        return f"[{note_id}] {note[0]}: {note[1]}"

    @capability("word_count")
    async def word_count(self, text: str) -> int:
        """Count the words of a text (to keep an answer within a length)."""
        return len(text.split())


class Researcher(LLMAgent):
    system_prompt = (
        "You are a researcher. Answer the one question you are given using only the "
        "research notes: call search_notes with a few keywords, then fetch_note for the "
        "notes that look relevant. Reply with the facts you found, each followed by the "
        "id of its note in brackets, e.g. [leases]. If the notes do not say, reply that "
        "the notes do not cover it. Be brief: at most five sentences."
    )
    temperature = 0
    tools = [
        capability_tool(Notes.search_notes),
        capability_tool(Notes.fetch_note),
        capability_tool(Notes.word_count),
    ]


class Writer(LLMAgent):
    system_prompt = (
        "You are a technical writer. You are given a question and the findings of "
        "researchers, with note ids in brackets. Write the final answer to the "
        "question: clear, at most two short paragraphs, keeping the note ids as "
        "citations. Use only the findings; say plainly what they do not cover."
    )
    temperature = 0.3


class Planner(LLMAgent):
    system_prompt = (
        "You are the planner of a research assistant. For the user's question: "
        "1) split it into two or three focused sub-questions and ask each one to the "
        "researcher tool — call the researcher once per sub-question, all in the same "
        "reply, so they run in parallel; "
        "2) when their findings are back, call the writer tool once with the original "
        "question and all the findings; "
        "3) reply with the writer's text, unchanged. Do not answer from your own "
        "knowledge."
    )
    temperature = 0
    tools = [
        agent_tool(
            "researcher",
            description="Ask a researcher one focused sub-question; it searches the "
            "research notes and replies with facts and note ids.",
        ),
        agent_tool(
            "writer",
            description="Give the writer the question and all the findings; it replies "
            "with the final answer text.",
        ),
    ]


agents: list[type[Agent]] = [Notes, Researcher, Writer, Planner]

if not os.environ.get(ENV_BASE_URL):
    log.warning(
        "no model endpoint configured (%s is not set): the research agents are hosted, "
        "but every planner/researcher/writer turn will fail until it is; set %s (e.g. "
        "http://127.0.0.1:11434/v1) and %s, then start again",
        ENV_BASE_URL,
        ENV_BASE_URL,
        ENV_MODEL,
    )
