"""What a review of the gateway asked for: arguments that share a name with task
options, idempotency keys per API key, an open gateway refusing other hosts (DNS
rebinding), keys staying required after the last is revoked, bounds on waiting
requests, and the end of an event stream that a browser would reconnect to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from shoal import Client, Settings
from shoal.apikeys import KeyStore
from shoal.engine import EmbeddedEngine
from shoal.gateway import GatewayConfig

from .conftest import eventually, running_node
from .gateways import bearer, serving
from .sse_app import Ticker


async def test_arguments_named_like_task_options_or_internal_ones_are_refused(
    client: Client, settings: Settings
) -> None:
    async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
        for name in ("timeout", "priority", "agent", "_parent", "_traceparent"):
            reply = await http.post(
                "/v1/tasks", json={"capability": "echo", "args": {name: 1, "value": 2}}
            )
            assert reply.status_code == 422, reply.text
            error = reply.json()["error"]
            assert error["field"] == "body.args" and name in error["message"]
    assert (await client.list_tasks()).tasks == (), "nothing was queued"


async def test_idempotency_keys_are_per_api_key(client: Client, settings: Settings) -> None:
    store = KeyStore(client)
    alice = (await store.create("alice", ["submit", "read"])).secret
    mallory = (await store.create("mallory", ["submit"])).secret
    body = {"capability": "echo", "args": {"value": "secret"}, "idempotency_key": "invoice-42"}
    async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
        first = await http.post("/v1/tasks", json=body, headers=bearer(alice))
        again = await http.post("/v1/tasks", json=body, headers=bearer(alice))
        other = await http.post("/v1/tasks?wait=0", json=body, headers=bearer(mallory))
    assert first.status_code == again.status_code == other.status_code == 201
    assert again.json() == {**first.json(), "existing": True}
    assert other.json()["id"] != first.json()["id"], "mallory did not reach alice's task"
    assert other.json()["existing"] is False


async def test_an_open_gateway_answers_only_requests_addressed_to_localhost(
    client: Client, settings: Settings
) -> None:
    async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/v1/cluster")).status_code == 200
        local = await http.get("/v1/cluster", headers={"host": "localhost:8000"})
        rebound = await http.get("/v1/cluster", headers={"host": "attacker.example:8000"})
        cross = await http.post(
            "/v1/keys", json={"name": "x", "scopes": ["admin"]},
            headers={"origin": "http://attacker.example"},
        )  # fmt: skip
    assert local.status_code == 200
    assert rebound.status_code == 403
    assert "addressed to localhost" in rebound.json()["error"]["message"]
    assert cross.status_code == 403
    assert not await KeyStore(client).any_keys(), "no key was created"


async def test_keys_stay_required_after_the_last_one_is_revoked(
    client: Client, settings: Settings
) -> None:
    store = KeyStore(client)
    await store.create("only", ["read"])
    await store.revoke("only")
    assert not await store.any_keys()
    async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
        refused = await http.get("/v1/cluster")
    assert refused.status_code == 401, "revoking the last key did not open the gateway"


async def _refused_while_held(base: str, held_ids: list[str], probe_id: str) -> httpx.Response:
    """Hold a ?wait= per id in ``held_ids`` — until the gateway's metrics show them
    all waiting — then ask for one more."""
    async with (
        httpx.AsyncClient(base_url=base, timeout=30) as holder,
        httpx.AsyncClient(base_url=base, timeout=30) as http,
    ):
        held = [asyncio.create_task(holder.get(f"/v1/tasks/{t}?wait=20")) for t in held_ids]
        wanted = f"shoal_gateway_waiting_requests {float(len(held_ids))}"
        try:
            async with asyncio.timeout(10):
                while wanted not in (await http.get("/metrics")).text:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the held requests start in their own time
            probe = await http.get(f"/v1/tasks/{probe_id}?wait=0.05")
            plain = await http.get(f"/v1/tasks/{probe_id}")
            assert plain.status_code == 200, "a plain read is not bounded"
            return probe
        finally:
            for task in held:
                task.cancel()


async def test_waiting_requests_are_bounded_per_key_and_per_gateway(
    client: Client, settings: Settings
) -> None:
    ids = [(await client.submit("nobody_hosts_this")).id for _ in range(3)]
    per_key = GatewayConfig(port=0, max_waits=10, max_waits_per_key=2)
    async with serving(settings, per_key) as base:
        over_share = await _refused_while_held(base, ids[:2], ids[2])
    per_gateway = GatewayConfig(port=0, max_waits=2, max_waits_per_key=10)
    async with serving(settings, per_gateway) as base:
        full = await _refused_while_held(base, ids[:2], ids[2])
    assert over_share.status_code == 429 and full.status_code == 503
    for refused in (over_share, full):
        assert refused.json()["error"]["type"] == "TooManyWaits"
        assert refused.headers["retry-after"] == "1"


async def test_resuming_after_the_end_of_a_finished_stream_is_a_204(
    client: Client, settings: Settings
) -> None:
    async with running_node([Ticker], settings):
        handle = await client.submit("tick", steps=2, interval=0.0)
        await handle.result(timeout=10)
    events = await client.event_history(handle.id)
    async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
        before_end = await http.get(
            f"/v1/tasks/{handle.id}/events", headers={"Last-Event-ID": events[0].id}
        )
        after_end = await http.get(
            f"/v1/tasks/{handle.id}/events", headers={"Last-Event-ID": events[-1].id}
        )
    assert before_end.status_code == 200 and "event: done" in before_end.text
    assert after_end.status_code == 204 and after_end.text == ""


async def test_a_submit_whose_wait_is_cut_by_an_engine_failure_still_gives_the_id(
    tmp_path: Path,
) -> None:
    engine = EmbeddedEngine(tmp_path / "engine")
    settings = Settings(url=engine.ensure().url, namespace="cut", engine_timeout=1)
    try:
        async with serving(settings) as base, httpx.AsyncClient(base_url=base) as http:
            pending = asyncio.create_task(
                http.post("/v1/tasks?wait=20", json={"capability": "nobody_hosts_this"})
            )
            async with Client(settings=settings) as probe:
                await eventually(
                    lambda: _one_task_queued(probe), "the task queued before the outage"
                )
            await asyncio.to_thread(engine.stop)
            reply = await asyncio.wait_for(pending, 30)
        assert reply.status_code == 201, reply.text
        assert reply.json()["outcome"] is None and len(reply.json()["id"]) == 28
    finally:
        engine.stop()


async def _one_task_queued(client: Client) -> bool:
    return len((await client.list_tasks()).tasks) == 1
