"""A chat agent per user that remembers: rules instead of a language model.

    shoal node --app shoal.examples.chat               # hosts the chat and what it calls
    shoal call chat --agent chat/alice text="my name is Alice"
    shoal request chat/alice '{"text": "what is my name?"}'

``chat/<user>`` is one agent per user. Its state holds the user's turn count, a
bounded window of recent lines and the facts it was told ("my name is ...",
"remember that ..."), so a conversation continues on whichever node the agent is
active on, after restarts and node failures. It answers by rules, and hands some
turns to other agents:

- ``calculate: <expression>`` runs the ``calculate`` capability (any node);
- ``summarize: <text>`` runs the document pipeline's ``process_document``, which
  fans the text out to ``summarizer/<k>`` agents (see ``shoal.examples.pipeline``).

A turn that waits for ``process_document`` holds one of its node's agent slots
while the pipeline needs agent slots for its summarisers: keep the number of chat
turns waiting at once on a node below its ``--concurrency`` (64 by default), or
they could hold every slot the summarisers need.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Awaitable, Callable
from typing import Any

from shoal import Agent, TaskFailed, capability, handler
from shoal.examples import pipeline

RECENT_LINES = 8  # lines (the user's and the agent's) kept in memory
MAX_NOTES = 20  # "remember that ..." facts kept; the oldest are forgotten first


class ChatUsageError(ValueError):
    """The task or message cannot be answered as sent: retrying would not help."""


class CalculationError(ValueError):
    """The expression is not arithmetic Shoal's calculator can evaluate."""


# --- the calculator: a stateless capability ------------------------------------------

_OPERATORS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
MAX_EXPONENT = 100  # 10 ** 10 ** 10 would take a node down for good


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression (numbers, + - * / // % ** and brackets;
    ``^`` is taken as a power), without ``eval``: only these nodes are walked."""
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError:
        raise CalculationError(f"not an arithmetic expression: {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        if isinstance(node.value, bool):
            raise CalculationError(f"not a number: {node.value!r}")
        return node.value
    op = _OPERATORS.get(type(node.op)) if isinstance(node, ast.UnaryOp | ast.BinOp) else None
    if isinstance(node, ast.UnaryOp) and op is not None:
        return op(_evaluate(node.operand))  # type: ignore[no-any-return]
    if isinstance(node, ast.BinOp) and op is not None:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise CalculationError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return op(left, right)  # type: ignore[no-any-return]
        except ZeroDivisionError:
            raise CalculationError("division by zero") from None
    raise CalculationError(f"cannot calculate {ast.unparse(node)!r}")


class Calculator(Agent):
    """``calculate``: plain arithmetic, any node. A bad expression fails at once."""

    @capability("calculate", non_retryable=(CalculationError,))
    async def calculate(self, expression: str) -> int | float:
        return evaluate(expression)


# --- the chat agent ----------------------------------------------------------------

Rule = tuple[str, re.Pattern[str]]
_ARITHMETIC = r"[\d\s.+\-*/%^()]*\d[\d\s.+\-*/%^()]*"  # as in "what is 2 + 2?"

RULES: list[Rule] = [  # tried in order; the first that matches answers
    ("summarize", re.compile(r"^summari[sz]e\s*:\s*(?P<arg>.+)$", re.I | re.S)),
    ("calculate", re.compile(r"^(?:calculate|compute|calc)\s*:?\s*(?P<arg>.+)$", re.I)),
    ("calculate", re.compile(rf"^what(?:'s| is)\s+(?P<arg>{_ARITHMETIC})\??$", re.I)),
    ("set_name", re.compile(r"\bmy name is\s+(?P<arg>[A-Za-z][\w' -]{0,40}?)[.!]*$", re.I)),
    ("remember", re.compile(r"^remember(?:\s+that)?\s+(?P<arg>.+?)[.!]*$", re.I)),
    ("get_name", re.compile(r"\b(?:what(?:'s| is) my name|who am i)\b", re.I)),
    ("recall", re.compile(r"\bwhat do you (?:remember|know)\b", re.I)),
    ("forget", re.compile(r"^forget (?:everything|all|it all)\b", re.I)),
    ("history", re.compile(r"\bwhat did i (?:just )?say\b", re.I)),
    ("greet", re.compile(r"^(?:hi|hello|hey)\b", re.I)),
]


def match_rule(text: str) -> tuple[str, str]:
    """The intent of ``text`` and its argument (``"chat"`` and the text if no rule
    matches). Pure, so a caller can predict which way a turn goes."""
    for intent, pattern in RULES:
        found = pattern.search(text)
        if found:
            return intent, (found.groupdict().get("arg") or "").strip()
    return "chat", text


class Chat(Agent):
    """``chat/<user>``: one user's conversation, with memory in ``self.state``."""

    @capability("chat", non_retryable=(ChatUsageError,))
    async def chat(self, text: str) -> dict[str, Any]:
        """A turn addressed as a task: ``submit("chat", agent="chat/alice", text=...)``."""
        if self.id is None:
            raise ChatUsageError(
                "chat talks to one user: address it, e.g. submit('chat', agent='chat/alice', "
                "text='hi')"
            )
        return await self.turn(text)

    @handler
    async def on_message(self, message: Any) -> dict[str, Any]:
        """A turn as a message: ``request("chat/alice", {"text": "hi"})`` or a plain string."""
        text = message.get("text") if isinstance(message, dict) else message
        if not isinstance(text, str):
            raise ChatUsageError('send {"text": "..."} or a string')
        return await self.turn(text)

    async def turn(self, text: str) -> dict[str, Any]:
        """Count the turn, answer it by the first matching rule, remember both lines."""
        text = text.strip()
        turn = self.state.get("turns", 0) + 1
        self.state["turns"] = turn
        intent, argument = match_rule(text)
        reply = await self._answers[intent](self, argument)
        recent = [*self.state.get("recent", []), ["user", text], ["agent", reply]]
        self.state["recent"] = recent[-RECENT_LINES:]
        return {
            "user": self.key,
            "turn": turn,
            "intent": intent,
            "reply": reply,
            "node": self.ctx.node_id,
        }

    # Each answer takes the rule's argument and returns the reply.

    async def _greet(self, _: str) -> str:
        name = self._facts().get("name")
        return f"Hello, {name}!" if name else "Hello! What is your name?"

    async def _set_name(self, name: str) -> str:
        self._facts()["name"] = name
        return f"Nice to meet you, {name}."

    async def _get_name(self, _: str) -> str:
        name = self._facts().get("name")
        return f"Your name is {name}." if name else "I don't know your name yet."

    async def _remember(self, fact: str) -> str:
        notes: list[str] = self._facts().setdefault("notes", [])
        if fact not in notes:
            notes.append(fact)
            del notes[:-MAX_NOTES]
        return f"I'll remember that {fact}."

    async def _recall(self, _: str) -> str:
        facts = self._facts()
        known = ([f"your name is {facts['name']}"] if "name" in facts else []) + facts.get(
            "notes", []
        )
        return "I remember: " + "; ".join(known) + "." if known else "Nothing yet."

    async def _forget(self, _: str) -> str:
        self.state["facts"] = {}
        return "Forgotten."

    async def _history(self, _: str) -> str:
        said = [line for who, line in self.state.get("recent", []) if who == "user"]
        return f"You said: {said[-1]!r}." if said else "This is the first thing you said."

    async def _calculate(self, expression: str) -> str:
        try:
            value = await self.ctx.call(
                "calculate", expression=expression, idempotency_key=self._subtask_key("calc")
            )
        except TaskFailed as exc:
            return f"I can't calculate that: {exc.message}"
        return f"{expression} = {value}"

    async def _summarize(self, text: str) -> str:
        result = await self.ctx.call(
            "process_document",
            doc_id=f"chat-{self.key}-{self.state['turns']}",
            text=text,
            idempotency_key=self._subtask_key("summary"),
        )
        return f"Summary ({result['chunks']} chunk(s)): {result['summary']}"

    async def _chat(self, text: str) -> str:
        notes = len(self._facts().get("notes", []))
        return (
            f"I heard {len(text.split())} word(s). I know {notes} fact(s) about you; "
            "try 'remember that ...', 'calculate: 2 + 2' or 'summarize: <text>'."
        )

    _answers: dict[str, Callable[[Chat, str], Awaitable[str]]] = {
        "greet": _greet,
        "set_name": _set_name,
        "get_name": _get_name,
        "remember": _remember,
        "recall": _recall,
        "forget": _forget,
        "history": _history,
        "calculate": _calculate,
        "summarize": _summarize,
        "chat": _chat,
    }

    def _facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = self.state.setdefault("facts", {})
        return facts

    def _subtask_key(self, what: str) -> str | None:
        """A task turn replayed after its node died asks for the same sub-task again
        (same task id): the key returns the first one instead of running it twice.
        A message turn has no task id, so its sub-tasks get no key."""
        return f"{self.ctx.task_id}:{what}" if self.ctx.task_id else None


# Hosting the chat hosts what it calls, so `--app shoal.examples.chat` works alone.
agents: list[type[Agent]] = [Chat, Calculator, *pipeline.agents]
