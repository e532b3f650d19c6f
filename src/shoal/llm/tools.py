"""Tools an LLMAgent offers its model: Shoal capabilities and other agents.

A tool call the model makes becomes a Shoal task (``ctx.call``), so the tool runs
wherever the cluster hosts it — on another node, in parallel with the other calls
of the same answer — with the task plane's retries, timeouts and events. Each call
is submitted with an idempotency key made of the turn's task id, the model call
and the tool call's position: when a turn is re-run after its node died, the same
tool call finds the task of the first run instead of doing the work again.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from shoal.errors import ConfigurationError
from shoal.keys import validate_capability
from shoal.options import TaskOptions
from shoal.protocol import validate_agent_type

if TYPE_CHECKING:
    from shoal.agent import TaskContext

__all__ = ["Tool", "agent_tool", "capability_tool"]

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what Chat Completions servers accept
_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
}
DEFAULT_TOOL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Tool:
    """One function the model may call. Make them with ``capability_tool`` or
    ``agent_tool``; ``parameters`` is the JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    capability: str
    agent_type: str | None = None  # set: the capability of an addressed agent
    timeout: float = DEFAULT_TOOL_TIMEOUT_S
    max_attempts: int | None = None
    _argument_names: frozenset[str] = field(default=frozenset(), repr=False)

    def schema(self) -> dict[str, Any]:
        """The tool as a Chat Completions request lists it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    async def run(
        self,
        ctx: TaskContext,
        arguments: Mapping[str, Any],
        *,
        idempotency_key: str,
        conversation: str,
        ordinal: int,
    ) -> Any:
        """Run the call as a sub-task of ``ctx``'s task and return its result.

        The model's arguments go to the handler as one mapping, never as options
        of the task: a model (or a prompt injected into it) cannot set a task's
        ``delay``, ``priority`` or ``agent``. Arguments the tool's schema does not
        name are refused.

        An agent tool talks to ``<agent_type>/<caller type>.<conversation>.<thread>``:
        the model may name the ``thread``; else it is the call's ordinal — the
        n-th call of this tool in one answer gets its own agent, so parallel calls
        run in parallel (one agent handles one turn at a time) and keep their
        memory across turns. The caller's type and conversation are always part
        of the key, so a model cannot reach another conversation's agents.
        """
        options = TaskOptions.build(
            idempotency_key=idempotency_key, timeout=self.timeout, max_attempts=self.max_attempts
        )
        wait = self.timeout * (self.max_attempts or 1) + 30
        unknown = set(arguments) - self._argument_names
        if self._argument_names and unknown:
            raise ConfigurationError(
                f"tool {self.name} takes {sorted(self._argument_names)}, not {sorted(unknown)}"
            )
        if self.agent_type is None:
            return await ctx.call_arguments(
                self.capability, dict(arguments), options, result_timeout=wait
            )
        message = arguments.get("message")
        if not isinstance(message, str) or not message:
            raise ConfigurationError(f"tool {self.name} needs a 'message' string")
        caller = (ctx.agent_id or "").partition("/")[0]
        thread = _safe_key(str(arguments.get("thread") or ordinal))
        agent = f"{self.agent_type}/{_safe_key(f'{caller}.{conversation}.{thread}')}"
        if agent == ctx.agent_id:
            raise ConfigurationError(f"tool {self.name} would ask the agent itself ({agent})")
        return await ctx.call_arguments(
            self.capability, {"message": message}, options, agent=agent, result_timeout=wait
        )


def capability_tool(
    target: str | Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TOOL_TIMEOUT_S,
    max_attempts: int | None = None,
) -> Tool:
    """A tool that runs a capability: ``target`` is its name (then give
    ``parameters``, a JSON schema) or the ``@capability`` method itself (its
    name, docstring and typed parameters make the tool)."""
    if isinstance(target, str):
        capability = validate_capability(target)
        if parameters is None:
            raise ConfigurationError(
                f"capability_tool({target!r}) needs parameters= (a JSON schema object) "
                "when given a name; pass the @capability method to infer them"
            )
        doc = description or ""
        names: frozenset[str] = frozenset(parameters.get("properties", {}))
    else:
        spec = getattr(target, "__shoal_capability__", None)
        if spec is None:
            raise ConfigurationError(
                f"capability_tool takes a capability name or an @capability method, got {target!r}"
            )
        capability = spec.name
        inferred, names = _schema_of(target)
        parameters = parameters or inferred
        doc = description or _first_paragraph(inspect.getdoc(target)) or capability
    return _tool(name or capability, doc or capability, parameters, capability, None,
                 timeout, max_attempts, names)  # fmt: skip


def agent_tool(
    agent_type: str,
    *,
    description: str,
    name: str | None = None,
    capability: str | None = None,
    timeout: float = DEFAULT_TOOL_TIMEOUT_S,
    max_attempts: int | None = None,
) -> Tool:
    """A tool that asks another agent: the model writes it a ``message`` (and may
    name a ``thread`` to continue a conversation with it); the agent's
    ``capability`` (default ``<agent_type>.chat``, an LLMAgent's turn) answers."""
    validate_agent_type(agent_type)
    capability = validate_capability(capability or f"{agent_type}.chat")
    parameters = {
        "type": "object",
        "properties": {
            "message": {"type": "string", "description": "What to ask or tell it."},
            "thread": {
                "type": "string",
                "description": "Optional: a name for the conversation with it, to continue "
                "one later.",
            },
        },
        "required": ["message"],
    }
    return _tool(name or agent_type, description, parameters, capability, agent_type,
                 timeout, max_attempts, frozenset({"message", "thread"}))  # fmt: skip


def _tool(
    name: str,
    description: str,
    parameters: dict[str, Any],
    capability: str,
    agent_type: str | None,
    timeout: float,
    max_attempts: int | None,
    names: frozenset[str],
) -> Tool:
    if not _TOOL_NAME.match(name):
        raise ConfigurationError(
            f"tool name {name!r} must be 1-64 letters, digits, _ or - (the API's rule)"
        )
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ConfigurationError(
            f"tool {name}: parameters must be a JSON schema object ({{'type': 'object', ...}})"
        )
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigurationError(f"tool {name}: timeout must be > 0 seconds, got {timeout!r}")
    if max_attempts is not None and (not isinstance(max_attempts, int) or max_attempts < 1):
        raise ConfigurationError(f"tool {name}: max_attempts must be >= 1")
    return Tool(name, description, parameters, capability, agent_type, float(timeout),
                max_attempts, names)  # fmt: skip


def _schema_of(func: Callable[..., Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """A JSON schema for a handler's parameters, from its annotations."""
    hints = typing.get_type_hints(func)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(func).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        properties[param.name] = _json_type(hints.get(param.name, Any))
        if param.default is param.empty:
            required.append(param.name)
    schema = {"type": "object", "properties": properties, "required": required}
    return schema, frozenset(properties)


def _json_type(hint: Any) -> dict[str, Any]:
    """The JSON schema of a parameter's annotation: the simple types, lists and
    tuples with their ``items`` (OpenAI refuses an array schema without them),
    ``Literal`` as an ``enum``; anything else is left open (``{}``)."""
    origin = typing.get_origin(hint) or hint
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _json_type(options[0]) if len(options) == 1 else {}
    if origin is typing.Literal:
        return {"enum": list(args)}
    kind = _JSON_TYPES.get(origin)
    if kind == "array":
        item = args[0] if args and (origin is list or (len(args) == 2 and args[1] is ...)) else Any
        return {"type": "array", "items": _json_type(item)}
    return {"type": kind} if kind else {}


def _first_paragraph(doc: str | None) -> str:
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip() if doc else ""


def _safe_key(text: str) -> str:
    """An agent key from a model-chosen thread name (models write anything)."""
    key = re.sub(r"[^A-Za-z0-9_.:@+=-]", "-", text)[:200]
    return key or "default"


def tool_result_text(result: Any) -> str:
    """A tool's result as the tool message's content: text as it is, data as JSON."""
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)
