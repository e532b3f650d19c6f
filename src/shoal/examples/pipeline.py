"""A document pipeline: a splitter fans chunks out to summariser agents, a reducer joins them.

    shoal node --app shoal.examples.pipeline           # one or more nodes
    shoal submit process_document doc_id=d1 text="..." --wait

Who is who:

- ``process_document`` is a plain capability (stateless, load-balanced over the
  nodes). It splits the text into chunks, sends every chunk at once to a
  ``summarizer/<k>`` agent as an addressed sub-task, then asks ``reducer/<k>`` to
  join the chunk summaries (an addressed sub-task of capability
  ``reduce_summaries``).
- ``summarizer/<k>`` (``SUMMARIZERS`` of them) writes an extractive summary of a
  chunk — the sentence whose words are most frequent in the chunk — and keeps a
  running count of chunks and words and a bounded vocabulary in its state.
- ``reducer/<k>`` (``REDUCERS`` of them) joins summaries in chunk order and counts
  the documents it reduced.

Why addressed sub-tasks, not requests: a sub-task is recorded in the engine with
its result, so when a node is killed mid-run nothing depends on that node's
memory. The dead node's ``process_document`` runs again on a survivor, and its
sub-tasks carry idempotency keys made of the parent task's id, so the re-run picks
up the sub-tasks already submitted (done or not) instead of summarising twice. A
request's reply, by contrast, goes to the inbox of the process that asked: if
that node dies, the reply is lost and the re-run must ask again.

Why the reduction goes to an agent: ``process_document`` holds a capability slot
while it waits. Had ``reduce_summaries`` been queued as a capability task, a burst
of documents could fill every slot of every node with parents waiting for
reductions that can then never start. Agent turns have slots of their own, so
capability tasks that wait only for agents cannot starve each other.

``expected_summary(text)`` computes the same summary without Shoal, so any result
can be checked.
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import Counter
from typing import Any

from shoal import Agent, TaskHandle, capability, handler

SUMMARIZERS = 4  # summarizer/0 .. summarizer/3
REDUCERS = 2  # reducer/0, reducer/1
MAX_SENTENCES = 4  # a paragraph longer than this is cut into chunks of this many sentences
VOCABULARY_SIZE = 200  # words a summariser keeps counts of (the most frequent ones)

STOPWORDS = frozenset(
    {"a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have",
     "in", "into", "is", "it", "its", "of", "on", "or", "so", "that", "the", "their", "there",
     "they", "this", "to", "was", "were", "when", "where", "which", "while", "with"}
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_WORD = re.compile(r"[a-z][a-z'-]*")


# --- the text work: pure functions, usable without Shoal ----------------------------


def sentences(text: str) -> list[str]:
    """Sentences of ``text``, split after ``.``, ``!`` or ``?``; whitespace collapsed."""
    return [" ".join(s.split()) for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def content_words(text: str) -> list[str]:
    """Lower-case words of ``text`` without stopwords: what a summary is scored on."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def split_chunks(text: str) -> list[str]:
    """One chunk per paragraph (blank-line separated); a paragraph of more than
    ``MAX_SENTENCES`` sentences becomes several chunks, so chunks stay small."""
    chunks: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        parts = sentences(paragraph)
        for i in range(0, len(parts), MAX_SENTENCES):
            chunks.append(" ".join(parts[i : i + MAX_SENTENCES]))
    return chunks


def summarize_text(chunk: str) -> str:
    """The chunk's most representative sentence: the one whose content words are
    most frequent in the chunk on average (the first one wins a tie)."""
    candidates = sentences(chunk)
    if not candidates:
        return ""
    frequency = Counter(content_words(chunk))

    def score(sentence: str) -> float:
        words = content_words(sentence)
        return sum(frequency[w] for w in words) / len(words) if words else 0.0

    return max(candidates, key=score)  # max keeps the first of equal scores


def join_summaries(summaries: list[str]) -> str:
    """The document's summary: its chunk summaries in chunk order."""
    return " ".join(s for s in summaries if s)


def expected_summary(text: str) -> str:
    """What ``process_document`` returns as ``summary`` for ``text``, computed here
    without Shoal: a caller can check any result against it."""
    return join_summaries([summarize_text(chunk) for chunk in split_chunks(text)])


def stable_hash(value: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` of a str is not)."""
    return zlib.crc32(value.encode())


def summarizer_for(doc_id: str, index: int) -> str:
    """The summariser of chunk ``index``: consecutive chunks go to different agents,
    and each document starts at its own offset so that the first chunks of many
    documents do not all queue at ``summarizer/0``."""
    return f"summarizer/{(stable_hash(doc_id) + index) % SUMMARIZERS}"


def reducer_for(doc_id: str) -> str:
    return f"reducer/{stable_hash(doc_id) % REDUCERS}"


# --- the agents -------------------------------------------------------------------


class Summarizer(Agent):
    """``summarizer/<k>``: summarises chunks, one at a time, and remembers what it read."""

    @capability("summarize_chunk")
    async def summarize_chunk(self, doc_id: str, index: int, text: str) -> dict[str, Any]:
        words = content_words(text)
        self.state["chunks"] = self.state.get("chunks", 0) + 1
        self.state["words"] = self.state.get("words", 0) + len(words)
        self.state["vocabulary"] = _merge_vocabulary(self.state.get("vocabulary", {}), words)
        return {"doc_id": doc_id, "index": index, "summary": summarize_text(text), "by": self.id}

    @handler
    async def stats(self, message: Any) -> dict[str, Any]:
        """Any message (``shoal request summarizer/0 '"stats"'``) asks what it has read."""
        vocabulary: dict[str, int] = self.state.get("vocabulary", {})
        top = sorted(vocabulary.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return {
            "agent": self.id,
            "chunks": self.state.get("chunks", 0),
            "words": self.state.get("words", 0),
            "top_words": [word for word, _ in top],
        }


def _merge_vocabulary(vocabulary: dict[str, int], words: list[str]) -> dict[str, int]:
    """Add ``words`` to the counts and keep the ``VOCABULARY_SIZE`` most frequent, so
    the state stays small however much the agent reads."""
    counts = Counter(vocabulary)
    counts.update(words)
    kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:VOCABULARY_SIZE]
    return dict(kept)


class Reducer(Agent):
    """``reducer/<k>``: joins chunk summaries into the document's summary."""

    @capability("reduce_summaries")
    async def reduce_summaries(self, doc_id: str, summaries: list[str]) -> str:
        if self.id is not None:  # addressed: count; as a plain capability it is stateless
            self.state["documents"] = self.state.get("documents", 0) + 1
        return join_summaries(summaries)


class Splitter(Agent):
    """The entry point: stateless, so any node runs it, and a survivor re-runs it
    if its node dies."""

    @capability("process_document")
    async def process_document(self, doc_id: str, text: str) -> dict[str, Any]:
        chunks = split_chunks(text)
        handles = await asyncio.gather(
            *(self._summarize(doc_id, i, chunk) for i, chunk in enumerate(chunks))
        )
        parts = await asyncio.gather(*(h.result() for h in handles))
        await self.ctx.progress(0.9, f"{len(parts)} chunk(s) summarised")
        summary = await self.ctx.call(
            "reduce_summaries",
            agent=reducer_for(doc_id),
            idempotency_key=f"{self.ctx.task_id}:reduce",
            doc_id=doc_id,
            summaries=[p["summary"] for p in parts],
        )
        return {
            "doc_id": doc_id,
            "chunks": len(chunks),
            "summary": summary,
            "summarized_by": sorted({p["by"] for p in parts}),
            "node": self.ctx.node_id,
        }

    async def _summarize(self, doc_id: str, index: int, chunk: str) -> TaskHandle:
        """Submit one chunk to its summariser. The key is this task's id (the same in
        a re-run after a node died) and the chunk's index: a re-run gets the same
        sub-task back instead of summarising the chunk a second time."""
        return await self.ctx.submit(
            "summarize_chunk",
            agent=summarizer_for(doc_id, index),
            idempotency_key=f"{self.ctx.task_id}:chunk:{index}",
            doc_id=doc_id,
            index=index,
            text=chunk,
        )


agents: list[type[Agent]] = [Splitter, Summarizer, Reducer]  # what `shoal node --app` hosts
