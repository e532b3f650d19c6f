"""``shoal chat``: one turn of an LLM agent's conversation, its answer printed as
the model writes it.

It submits ``<type>.chat`` to the agent and follows the turn's events with
``shoal.llm.follow_answer``. A restart (the turn re-run on another node, or a
model stream asked again) is shown as a dim note on stderr; text a sampling
model took back is shown struck out (a terminal cannot unprint). When stdout is
not a terminal, only the final answer is written to it, so a file gets clean
text. ``--timeout`` bounds the whole turn, stream included. Errors reach
``shoal.cli.main`` (one line, an exit code).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from shoal import protocol
from shoal.cli_options import DataDir, Namespace, Redis
from shoal.cli_support import client as _client
from shoal.cli_support import run as _run
from shoal.errors import ConfigurationError
from shoal.llm.answer import follow_answer

_notes = Console(stderr=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(chat)


def chat(
    agent_id: Annotated[str, typer.Argument(help="The conversation: <agent type>/<id>.")],
    message: Annotated[str, typer.Argument(help="What to say.")],
    capability: Annotated[
        str | None,
        typer.Option(help="The agent's turn capability (default <agent type>.chat)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the whole answer.", min=1)
    ] = 600.0,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Say MESSAGE to an LLM agent and print its answer as it is written."""
    agent_type = protocol.AgentId.parse(agent_id).type
    if not message.strip():
        raise ConfigurationError("the message is empty: say something")
    name = capability or f"{agent_type}.chat"

    async def go() -> None:
        async with asyncio.timeout(timeout):
            await turn()

    async def turn() -> None:
        live = sys.stdout.isatty()  # a pipe or a file gets the final answer only
        async with _client(redis, namespace, data_dir) as c:
            handle = await c.submit(name, agent=agent_id, message=message)
            printed = ""
            async for piece in follow_answer(c, handle.id):
                if not live:
                    continue
                if piece.restart is not None:
                    reason = str(piece.restart.get("reason", ""))
                    _notes.print(Text(f"\n[restart: {reason}]", style="dim"), end="")
                if piece.rewind:
                    taken = printed[len(printed) - piece.rewind :]
                    _notes.print(Text(taken, style="dim strike"), end="")
                    printed = printed[: len(printed) - piece.rewind]
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                printed += piece.text
            answer = await handle.result()
            if not live or not printed:  # not streamed here (or not by this handler)
                sys.stdout.write(str(answer or ""))
            sys.stdout.write("\n")

    _run(go())
