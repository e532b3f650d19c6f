"""docs/resilience.md's examples run as written: the Chat agent calls a real
Chat-Completions-speaking server through ``self.ctx.services`` on a node, and the
registry, probe, pick, breaker, retry and fallback snippets run against a real
engine."""

from __future__ import annotations

import asyncio
import contextlib
import re
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shoal import Agent, Client
from shoal.testing.replica import replicas
from tests.conftest import running_node

DOC = Path(__file__).parent.parent / "docs" / "resilience.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@contextlib.asynccontextmanager
async def chat_server(seen: list[dict[str, Any]]) -> AsyncIterator[str]:
    """A small real server speaking the Chat Completions protocol (the external
    model server the doc's agent calls)."""

    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(body)
        text = body["messages"][-1]["content"]
        return JSONResponse({"choices": [{"message": {"role": "assistant",
                                                      "content": f"echo: {text}"}}]})  # fmt: skip

    app = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def test_the_chat_agent_calls_the_model_through_ctx_services(client: Client) -> None:
    (code,) = [b for b in blocks() if "class Chat(Agent)" in b]
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    chat: type[Agent] = namespace["Chat"]
    seen: list[dict[str, Any]] = []
    async with chat_server(seen) as url:
        await client.registry.register("llm", url, id="model-1")
        async with running_node([chat], client.settings):
            answer = await client.call("chat", conversation="c1", text="hello")
            assert answer == "echo: hello"
            assert await client.call("chat", conversation="c1", text="again") == "echo: again"
    assert [body["messages"][-1]["content"] for body in seen] == ["hello", "again"]


async def run_snippet(code: str, namespace: dict[str, Any]) -> dict[str, Any]:
    """Run a snippet with top-level awaits as the body of a coroutine."""
    body = textwrap.indent(code.replace("    ...   #", "    pass   #"), "    ")
    source = f"async def _snippet():\n{body}\n    return locals()\n"
    exec(source, namespace)
    result: dict[str, Any] = await namespace["_snippet"]()
    return result


async def test_the_registry_probe_pick_and_policy_snippets_run(client: Client) -> None:
    registry_code = next(b for b in blocks() if "registry = client.registry" in b)
    found = await run_snippet(registry_code, {"client": client})
    assert found["view"].instances == []  # deregistered; the registration block ended
    assert {s.id for s in await client.registry.instances("llm-hosted")} == {"api.example.com:443"}

    probe_code = next(b for b in blocks() if "configure_probe(client" in b)
    await run_snippet(probe_code, {"client": client})

    class VectorClient:
        def __init__(self, url: str) -> None:
            self.url = url

        async def search(self, query: str) -> str:
            return f"{query} from {self.url}"

    with replicas(1, names=["v"]) as (replica,):
        await client.registry.register("vectors", replica.url, id="v")
        pick_code = next(b for b in blocks() if ".pick(key=user_id)" in b)
        found = await run_snippet(
            pick_code,
            {"client": client, "user_id": "u1", "query": "q", "my_vector_client": VectorClient},
        )
        assert found["rows"] == f"q from {replica.url}"

    for marker in ("BreakerPolicy(", "RetryPolicy(attempts"):
        code = next(b for b in blocks() if marker in b)
        await client.registry.register("llm", "http://127.0.0.1:9", id="x", ttl=None)
        await run_snippet(
            code.replace('await pool.request("POST", "/v1/x", retry=NO_RETRY)', ""),
            {"client": client, "my_predicate": lambda exc: False},
        )


async def test_the_fallback_snippet_answers_from_the_local_function(client: Client) -> None:
    code = next(b for b in blocks() if "services.fallback(" in b)
    found = await run_snippet(code, {"client": client, "body": {"messages": []}})
    answer = found["answer"]
    assert answer.source == "canned"
    assert answer.value.startswith("The assistant is busy")
    assert [name for name, _ in answer.failures] == ["llm", "llm-hosted"]
