"""Gateways for tests: in this process (uvicorn on the test's event loop, a real
socket) or as a separate ``shoal gateway`` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from shoal import Settings
from shoal.gateway import GatewayConfig, create_app

from .conftest import REPO, node_env


@contextlib.asynccontextmanager
async def serving(settings: Settings, config: GatewayConfig | None = None) -> AsyncIterator[str]:
    """A gateway on a free loopback port of this process; yields its base URL."""
    config = config or GatewayConfig(port=0)
    app = create_app(settings, config)
    # Long-polls a test left open are cut at shutdown, as `shoal gateway` does.
    options = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 2}
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=0, **options))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:  # uvicorn has no started event: look again
            if task.done():
                task.result()  # startup failed: raise its error
            await asyncio.sleep(0.005)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def gateway_process(
    settings: Settings, *args: str, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``shoal gateway`` as a separate process, ready when this yields (base URL, process);
    its log (stderr) goes to ``log`` if given. It is reached on 127.0.0.1 whatever
    ``--host`` says (0.0.0.0 covers loopback too)."""
    port = free_port()
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log else None
        proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "gateway", "--port", str(port),
             "--log-level", "warning", *args],
            cwd=REPO, env=node_env(settings), stderr=stderr,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            yield url, proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (uvicorn finishes what is in flight), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited with {proc.returncode} before serving")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # the process is starting: look again
    raise AssertionError(f"gateway at {url} not ready within {timeout}s")


def api_routes(app: FastAPI) -> dict[tuple[str, str], APIRoute]:
    """Every API route the app serves, by (method, path template). FastAPI nests
    included routers; iter_route_contexts is how its own OpenAPI builder walks them."""
    return {
        (method, context.route.path): context.route
        for context in iter_route_contexts(app.routes)
        if isinstance(context.route, APIRoute)
        for method in context.route.methods
    }


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def read_sse(response: httpx.Response) -> list[dict[str, Any]]:
    """The events of a Server-Sent Events body, read to its end: each a dict of its
    fields (``id``, ``event``, ``data`` parsed as JSON); comments and ``retry`` skipped."""
    events: list[dict[str, Any]] = []
    fields: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                events.append({**fields, "data": json.loads(fields["data"])})
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    return events
