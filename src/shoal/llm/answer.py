"""The answer of an LLMAgent's turn, as a client following its task sees it.

An LLMAgent writes its answer into the task's event stream as ``token`` events;
a turn re-run after its node died (or after a model replica died mid-answer)
writes one ``restart`` event and then only what the client has not seen yet —
or, when the new answer differs from the old one, says how much of the old text
to keep. ``Answer`` applies those events; ``follow_answer`` streams them as
``AnswerPiece``s a UI can print: delete ``rewind`` characters, then append
``text``. With a deterministic model (temperature 0) the rewind is always 0:
the client sees each character once.

Event data (kind ``event``, what ``ctx.emit`` writes), by ``type``:

- ``token``: ``{"call": c, "offset": o, "text": t}`` — text of the turn's model
  call ``c`` (0, then 1 after a round of tool calls...) starting at ``o``;
- ``tool_call`` / ``tool_result``: the tools the model called and how they ended;
- ``restart``: ``{"attempt": a, "call": c, "kept": k, "reason": ...}`` — keep the
  first ``k`` characters of call ``c``, drop anything after (later calls too);
- ``answer``: after each model call — who answered, cached or not, its usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shoal.client import Client
    from shoal.protocol import Event

__all__ = ["Answer", "AnswerPiece", "follow_answer"]


@dataclass(frozen=True)
class AnswerPiece:
    """What changed in the visible answer: remove the last ``rewind`` characters,
    then append ``text``. ``event`` is the event it came from (its ``id`` resumes
    the stream); ``restart`` is set on a restart marker."""

    text: str
    rewind: int
    event: Event
    restart: dict[str, Any] | None = None


@dataclass
class Answer:
    """The text of one turn so far, built from its events (see the module doc)."""

    calls: list[str] = field(default_factory=list)
    restarts: int = 0

    @property
    def text(self) -> str:
        return "".join(self.calls)

    def apply(self, data: Any) -> tuple[str, int]:
        """Take one event's data in; (text appended, characters removed before it)."""
        if not isinstance(data, dict):
            return "", 0
        kind = data.get("type")
        try:
            if kind == "token":
                return self._token(int(data["call"]), int(data["offset"]), str(data["text"]))
            if kind == "restart":
                call, kept = int(data["call"]), int(data["kept"])
                self.restarts += 1
                return "", self._truncate(call, kept)
        except (KeyError, TypeError, ValueError):
            pass  # another handler's event that only looks like ours
        return "", 0

    def _token(self, call: int, offset: int, text: str) -> tuple[str, int]:
        while len(self.calls) <= call:
            self.calls.append("")
        have = self.calls[call]
        rewind = 0
        if offset < len(have):  # never happens from an LLMAgent; be safe anyway
            rewind = self._truncate(call, offset)
        self.calls[call] += text
        return text, rewind

    def _truncate(self, call: int, kept: int) -> int:
        before = len(self.text)
        while len(self.calls) <= call:
            self.calls.append("")
        self.calls[call] = self.calls[call][:kept]
        del self.calls[call + 1 :]
        return before - len(self.text)


async def follow_answer(
    client: Client, task_id: str, *, after: str | None = None
) -> AsyncIterator[AnswerPiece]:
    """The answer of an LLMAgent turn as it is written, until the task ends.

    Resume a dropped stream with ``after=`` the last piece's ``event.id``: the
    events up to it are read again to rebuild the text (so a later rewind counts
    right) but not yielded — keep the text you had. Raises what ``client.events``
    raises (TaskNotFound...); the turn's own failure shows in
    ``client.result(task_id)`` afterwards."""
    answer = Answer()
    if after is not None:
        seen = _stream_id(after)
        for event in await client.event_history(task_id):
            if _stream_id(event.id) > seen:
                break
            if event.kind == "event":
                answer.apply(event.data)
    async for event in client.events(task_id, after=after):
        if event.kind != "event":
            continue
        text, rewind = answer.apply(event.data)
        is_restart = isinstance(event.data, dict) and event.data.get("type") == "restart"
        if text or rewind or is_restart:
            yield AnswerPiece(text, rewind, event, dict(event.data) if is_restart else None)


def _stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)
