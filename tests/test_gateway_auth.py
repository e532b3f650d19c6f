"""Who may call the gateway: API keys and their scopes on every route, revocation on
every gateway at once, open mode on loopback only, and what needs no key at all."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal import Client, Saga, Settings
from shoal.apikeys import SCOPES, KeyStore
from shoal.coordination.config import ConfigStore
from shoal.gateway import create_app
from shoal.gateway.app import DASHBOARD
from shoal.registry import Registry
from tests.agents import Toolbox
from tests.conftest import REPO, eventually, node_env, running_node
from tests.gateways import api_routes, bearer, free_port, gateway_process, serving
from tests.stateful import Counter

PUBLIC = {("GET", "/healthz"), ("GET", "/readyz")}
UNKNOWN = "shoal_000000000000_" + "A" * 43  # well formed, no such key


@dataclass
class World:
    """A gateway with keys of every kind, a node, and things for routes to act on."""

    url: str
    store: KeyStore
    registry: Registry
    only: dict[str, str]  # scope -> a key holding only that scope
    all_but: dict[str, str]  # scope -> a key holding every other scope
    revoked: str
    task_id: str
    config: ConfigStore


@pytest.fixture(scope="module")
async def world(engine_url: str) -> AsyncIterator[World]:
    settings = Settings(url=engine_url, namespace=f"t-auth-{uuid.uuid4().hex[:8]}")
    async with (
        running_node([Toolbox, Counter], settings),
        Client(settings=settings) as client,
        serving(settings) as url,
    ):
        store = KeyStore(client)
        only = {s: (await store.create(f"only-{s}", [s])).secret for s in SCOPES}
        all_but = {
            s: (await store.create(f"all-but-{s}", [o for o in SCOPES if o != s])).secret
            for s in SCOPES
        }
        revoked = await store.create("revoked", SCOPES)
        await store.revoke(revoked.key.id)
        handle = await client.submit("echo", value=1)
        await handle.result(timeout=10)
        await client.registry.register("llm", "http://127.0.0.1:9001", id="a", ttl=None)
        await client.sagas.start(Saga("auth").step("echo"), saga_id="s1")
        await client.config.set("app.auth", 1)
        yield World(
            url, store, client.registry, only, all_but, revoked.secret, handle.id, client.config
        )


Call = tuple[str, str, dict[str, Any]]


async def victim_key(world: World) -> Call:
    victim = await world.store.create("victim", ["read"])
    return "DELETE", f"/v1/keys/{victim.key.id}", {}


async def victim_instance(world: World) -> Call:
    victim = await world.registry.register("llm", "http://127.0.0.1:9002", ttl=None)
    return "DELETE", f"/v1/services/llm/instances/{victim.id}", {}


async def stuck_saga(world: World) -> Call:
    """A saga stuck in compensation_failed (echo's compensation always fails)."""
    client: Client = world.registry._client
    saga = Saga("stuck").step("echo", compensate="permanent").step("always_fails")
    handle = await client.sagas.start(saga)
    assert (await handle.wait(timeout=10)).status == "compensation_failed"
    return "POST", f"/v1/sagas/{handle.id}/retry-compensation", {}


async def victim_setting(world: World) -> Call:
    await world.config.set("app.victim", 1)
    return "DELETE", "/v1/config/app.victim", {}


def fixed(method: str, path: str, **kwargs: Any) -> Callable[[World], Awaitable[Call]]:
    async def build(world: World) -> Call:
        return method, path.format(task=world.task_id), kwargs

    return build


# Each route: the scope it needs and a request it answers with a 2xx given that scope.
MATRIX: dict[tuple[str, str], tuple[str, Callable[[World], Awaitable[Call]]]] = {
    ("POST", "/v1/tasks"): ("submit", fixed("POST", "/v1/tasks", json={"capability": "echo"})),
    ("GET", "/v1/tasks"): ("read", fixed("GET", "/v1/tasks")),
    ("GET", "/v1/tasks/{task_id}"): ("read", fixed("GET", "/v1/tasks/{task}")),
    ("POST", "/v1/tasks/{task_id}/cancel"): ("submit", fixed("POST", "/v1/tasks/{task}/cancel")),
    ("GET", "/v1/tasks/{task_id}/events"): ("read", fixed("GET", "/v1/tasks/{task}/events")),
    ("GET", "/v1/agents"): ("read", fixed("GET", "/v1/agents")),
    ("GET", "/v1/agent-types"): ("read", fixed("GET", "/v1/agent-types")),
    ("GET", "/v1/agents/{agent_type}/{key}"): ("read", fixed("GET", "/v1/agents/counter/a")),
    ("GET", "/v1/agents/{agent_type}/{key}/state"): (
        "read", fixed("GET", "/v1/agents/counter/a/state")
    ),
    ("POST", "/v1/agents/{agent_type}/{key}/messages"): (
        "message", fixed("POST", "/v1/agents/counter/a/messages", json={"message": 1})
    ),
    ("POST", "/v1/agents/{agent_type}/{key}/requests"): (
        "message", fixed("POST", "/v1/agents/counter/a/requests", json={"message": 1})
    ),
    ("POST", "/v1/topics/{topic}/messages"): (
        "message", fixed("POST", "/v1/topics/findings/messages", json={"message": 1, "source": "a"})
    ),
    ("GET", "/v1/cluster"): ("read", fixed("GET", "/v1/cluster")),
    ("GET", "/metrics"): ("read", fixed("GET", "/metrics")),
    ("GET", "/v1/dead-letters/{capability}"): ("read", fixed("GET", "/v1/dead-letters/echo")),
    ("POST", "/v1/dead-letters/{capability}/redrive"): (
        "admin", fixed("POST", "/v1/dead-letters/echo/redrive", json={})
    ),
    ("GET", "/v1/keys"): ("admin", fixed("GET", "/v1/keys")),
    ("POST", "/v1/keys"): (
        "admin", fixed("POST", "/v1/keys", json={"name": "made", "scopes": ["read"]})
    ),
    ("DELETE", "/v1/keys/{key}"): ("admin", victim_key),
    ("GET", "/v1/services"): ("read", fixed("GET", "/v1/services")),
    ("GET", "/v1/services/{name}"): ("read", fixed("GET", "/v1/services/llm")),
    ("POST", "/v1/services/{name}/instances"): (
        "admin", fixed("POST", "/v1/services/llm/instances", json={"url": "http://10.0.0.1:80"})
    ),
    ("PUT", "/v1/services/{name}/instances/{instance_id}/heartbeat"): (
        "admin", fixed("PUT", "/v1/services/llm/instances/a/heartbeat")
    ),
    ("PUT", "/v1/services/{name}/instances/{instance_id}/status"): (
        "admin", fixed("PUT", "/v1/services/llm/instances/a/status", json={"status": "up"})
    ),
    ("DELETE", "/v1/services/{name}/instances/{instance_id}"): ("admin", victim_instance),
    ("GET", "/v1/config"): ("read", fixed("GET", "/v1/config")),
    ("GET", "/v1/config/history"): ("read", fixed("GET", "/v1/config/history")),
    ("GET", "/v1/config/{key}"): ("read", fixed("GET", "/v1/config/app.auth")),
    ("PUT", "/v1/config/{key}"): ("admin", fixed("PUT", "/v1/config/app.auth", json={"value": 2})),
    ("DELETE", "/v1/config/{key}"): ("admin", victim_setting),
    ("GET", "/v1/sagas"): ("read", fixed("GET", "/v1/sagas")),
    ("GET", "/v1/sagas/{saga_id}"): ("read", fixed("GET", "/v1/sagas/s1")),
    ("POST", "/v1/sagas/{saga_id}/cancel"): ("submit", fixed("POST", "/v1/sagas/s1/cancel")),
    ("POST", "/v1/sagas/{saga_id}/retry-compensation"): ("admin", stuck_saga),
}  # fmt: skip

ROUTES = sorted(api_routes(create_app(Settings())))


def test_every_route_is_public_or_in_the_matrix() -> None:
    assert set(ROUTES) == MATRIX.keys() | PUBLIC


@pytest.mark.parametrize("route", [r for r in ROUTES if r not in PUBLIC], ids=" ".join)
async def test_a_route_answers_only_a_live_key_with_its_scope(
    world: World, route: tuple[str, str]
) -> None:
    scope, build = MATRIX[route]

    async def call(headers: dict[str, str]) -> httpx.Response:
        method, path, kwargs = await build(world)
        async with httpx.AsyncClient(base_url=world.url, timeout=30) as http:
            return await http.request(method, path, headers=headers, **kwargs)

    for headers in ({}, bearer(UNKNOWN), bearer("not-a-key"), bearer(world.revoked)):
        response = await call(headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"]["type"] == "Unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert "shoal keys create" in (await call({})).json()["error"]["message"]

    forbidden = await call(bearer(world.all_but[scope]))
    assert forbidden.status_code == 403, forbidden.text
    assert f"lacks the {scope!r} scope" in forbidden.json()["error"]["message"]

    allowed = await call(bearer(world.only[scope]))
    assert 200 <= allowed.status_code < 300, allowed.text
    by_header = await call({"X-API-Key": world.only[scope]})
    assert 200 <= by_header.status_code < 300, by_header.text
    assert (await call({"X-API-Key": world.revoked})).status_code == 401


async def test_health_openapi_and_docs_need_no_key(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url) as http:
        for path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
            assert (await http.get(path)).status_code == 200, path


@pytest.mark.skipif(not DASHBOARD.is_dir(), reason="the dashboard is not in this tree yet")
async def test_the_dashboard_page_needs_no_key(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url) as http:
        page = await http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_revoking_stops_a_key_at_once_on_two_gateway_processes(
    settings: Settings, client: Client
) -> None:
    store = KeyStore(client)
    admin = await store.create("admin", ["admin"])
    by_api, by_store = [await store.create(name, ["read"]) for name in ("by-api", "by-store")]
    with gateway_process(settings) as (one, _), gateway_process(settings) as (two, _):
        async with httpx.AsyncClient(timeout=30) as http:

            async def status(url: str, secret: str) -> int:
                return (await http.get(f"{url}/v1/tasks", headers=bearer(secret))).status_code

            for secret in (by_api.secret, by_store.secret):
                assert [await status(one, secret), await status(two, secret)] == [200, 200]

            revoked = await http.delete(
                f"{one}/v1/keys/{by_api.key.id}", headers=bearer(admin.secret)
            )
            assert revoked.status_code == 200 and revoked.json()["id"] == by_api.key.id
            assert await status(two, by_api.secret) == 401, "the other gateway, at once"
            assert await status(one, by_api.secret) == 401

            await store.revoke("by-store")
            assert await status(two, by_store.secret) == 401
            assert await status(one, by_store.secret) == 401
            assert await status(one, admin.secret) == 403, "the admin key still works"


async def test_open_on_loopback_until_a_key_exists(settings: Settings) -> None:
    async with serving(settings) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/v1/tasks")).status_code == 200
        created = await http.post("/v1/keys", json={"name": "first", "scopes": ["read"]})
        assert created.status_code == 201
        secret = created.json()["secret"]

        async def closed() -> bool:
            return (await http.get("/v1/tasks")).status_code == 401

        await eventually(closed, "a key is required once one exists", timeout=5)
        assert (await http.get("/v1/tasks", headers=bearer(secret))).status_code == 200


async def shoal_gateway(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``shoal gateway ARGS`` expected to exit by itself (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "gateway", "--port", str(free_port()), *args,
        cwd=REPO, env=node_env(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_off_loopback_without_keys_refuses_to_start_and_says_how_to_make_one(
    settings: Settings,
) -> None:
    code, out, err = await shoal_gateway(settings, "--host", "0.0.0.0")
    assert code != 0 and out == ""
    assert "refusing to serve 0.0.0.0 without API keys" in err
    assert "shoal keys create --name NAME --scopes read,submit" in err
    assert "--insecure" in err and "Traceback" not in err


# Off loopback means 0.0.0.0 here: the gateway is reached on 127.0.0.1 only (no traffic
# leaves loopback), and it runs just for the test.


async def test_off_loopback_with_insecure_starts_open(settings: Settings, tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    with gateway_process(settings, "--host", "0.0.0.0", "--insecure", log=log) as (url, _):
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/v1/tasks")).status_code == 200
    assert "--insecure: serving 0.0.0.0 without requiring API keys" in log.read_text()


async def test_off_loopback_with_a_key_requires_it(settings: Settings, client: Client) -> None:
    created = await KeyStore(client).create("remote", ["read"])
    with gateway_process(settings, "--host", "0.0.0.0") as (url, _):
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/v1/tasks")).status_code == 401
            ok = await http.get("/v1/tasks", headers=bearer(created.secret))
            assert ok.status_code == 200
            assert (await http.get("/healthz")).status_code == 200
