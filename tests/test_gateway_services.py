"""/v1/services: the service registry over HTTP, against a real engine and a real
gateway on a real socket. Every JSON answer is checked against the OpenAPI document
on the way (``http`` from tests.test_gateway_api): a documented status and shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from shoal import Client, Settings
from shoal.apikeys import KeyStore
from shoal.balancing import Replica
from shoal.gateway.schemas import ServiceInstance
from shoal.registry import Health, InstanceState, Status, make_instance
from tests.gateways import bearer, serving
from tests.test_gateway_api import error_of, http

LLM = "/v1/services/llm"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway (open: on loopback, no keys) serving this test's namespace."""
    async with serving(settings) as url, http(url) as client:
        yield client


async def register(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post(f"{LLM}/instances", json=body)
    assert response.status_code == 201, response.text
    instance: dict[str, Any] = response.json()
    return instance


async def test_register_list_status_heartbeat_and_deregister(api: httpx.AsyncClient) -> None:
    first = await register(
        api, url="http://127.0.0.1:9001/", zone="eu", weight=2, metadata={"model": "qwen"}
    )
    assert first["id"] == "127.0.0.1:9001" and first["url"] == "http://127.0.0.1:9001"
    assert (first["zone"], first["weight"], first["metadata"]) == ("eu", 2.0, {"model": "qwen"})
    assert first["status"] == "up" and first["breaker"] == "closed" and first["probe"] is None
    await register(api, url="http://127.0.0.1:9002", id="b", zone="us", status="starting")

    listed = (await api.get("/v1/services")).json()
    assert [(s["name"], [i["id"] for i in s["instances"]]) for s in listed] == [
        ("llm", ["127.0.0.1:9001", "b"])
    ]
    only_eu = (await api.get(LLM, params={"zone": "eu"})).json()
    assert only_eu["name"] == "llm" and [i["id"] for i in only_eu["instances"]] == [first["id"]]
    starting = (await api.get(LLM, params={"status": "starting"})).json()["instances"]
    assert [i["id"] for i in starting] == ["b"]
    by_meta = (await api.get(LLM, params=[("meta", "model:qwen"), ("meta", "model:other")])).json()
    assert by_meta["instances"] == []  # every filter must match: none does

    draining = await api.put(f"{LLM}/instances/b/status", json={"status": "draining"})
    assert draining.status_code == 200 and draining.json()["status"] == "draining"
    assert (await api.put(f"{LLM}/instances/b/heartbeat")).status_code == 204
    assert (await api.delete(f"{LLM}/instances/b")).status_code == 204
    assert (await api.delete(f"{LLM}/instances/127.0.0.1:9001")).status_code == 204
    assert (await api.get("/v1/services")).json() == []
    error_of(await api.get(LLM), 404, "UnknownService")


async def test_instances_expire_after_their_ttl_unless_static(api: httpx.AsyncClient) -> None:
    default = await register(api, url="http://127.0.0.1:9001", id="default")
    assert default["ttl"] == 30.0 and default["static"] is False and default["expires_at_ms"]
    static = await register(api, url="http://127.0.0.1:9002", id="static", ttl=None)
    assert static["static"] is True and static["expires_at_ms"] is None
    await register(api, url="http://127.0.0.1:9003", id="brief", ttl=1)
    assert (await api.put(f"{LLM}/instances/brief/heartbeat")).status_code == 204
    await asyncio.sleep(1.1)
    gone = error_of(await api.put(f"{LLM}/instances/brief/heartbeat"), 404, "UnknownService")
    assert "expired or was deregistered" in gone["message"]
    assert "POST /v1/services/llm/instances" in gone["message"]
    ids = [i["id"] for i in (await api.get(LLM)).json()["instances"]]
    assert ids == ["default", "static"]


async def test_unknown_services_and_instances_are_404(api: httpx.AsyncClient) -> None:
    unknown = error_of(await api.get("/v1/services/nosuch"), 404, "UnknownService")
    assert unknown["message"] == "service 'nosuch' has no registered instance"
    await register(api, url="http://127.0.0.1:9001", id="a")
    for method, path, body in (
        ("PUT", f"{LLM}/instances/nope/heartbeat", None),
        ("PUT", f"{LLM}/instances/nope/status", {"status": "up"}),
        ("DELETE", f"{LLM}/instances/nope", None),
        ("DELETE", "/v1/services/other/instances/nope", None),
    ):
        error = error_of(await api.request(method, path, json=body), 404, "UnknownService")
        assert "has no instance 'nope'" in error["message"], (method, path)


BAD_REGISTRATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"url": "ftp://x:1"}, "ConfigurationError", "give http(s)://host[:port][/base-path]"),
    ({"url": "http://x:1", "weight": 0}, "ValidationError", "body.weight"),
    ({"url": "http://x:1", "ttl": 0.5}, "ValidationError", "body.ttl"),
    ({"url": "http://x:1", "status": "busy"}, "ValidationError", "body.status"),
    ({"url": "http://x:1", "zone": "eu west"}, "ValidationError", "body.zone"),
    ({"url": "http://x:1", "id": "-a"}, "ValidationError", "body.id"),
    ({"url": "http://x:1", "metadata": {"k": 1}}, "ValidationError", "body.metadata.k"),
    ({"url": "http://x:1", "colour": "red"}, "ValidationError", "body.colour"),
    ({}, "ValidationError", "body.url"),
]


async def test_a_bad_registration_is_422_naming_the_field(api: httpx.AsyncClient) -> None:
    for body, type_, said in BAD_REGISTRATIONS:
        response = await api.post(f"{LLM}/instances", json=body)
        assert said in error_of(response, 422, type_)["message"], body
    assert (await api.get("/v1/services")).json() == []  # nothing was registered


async def test_bad_filters_and_names_are_422(api: httpx.AsyncClient) -> None:
    await register(api, url="http://127.0.0.1:9001")
    bad_meta = await api.get(LLM, params={"meta": "model"})
    assert "not key:value" in error_of(bad_meta, 422, "ConfigurationError")["message"]
    error_of(await api.get(LLM, params={"status": "busy"}), 422, "ValidationError")
    error_of(await api.get("/v1/services/-bad"), 422, "ValidationError")
    status = await api.put(f"{LLM}/instances/127.0.0.1:9001/status", json={"status": "gone"})
    error_of(status, 422, "ValidationError")


async def test_reading_needs_read_and_changing_needs_admin(
    api: httpx.AsyncClient, client: Client
) -> None:
    await client.registry.register("llm", "http://127.0.0.1:9001", id="a", ttl=None)
    reader = bearer((await KeyStore(client).create("reader", ["read"])).secret)
    assert (await api.get(LLM, headers=reader)).status_code == 200
    for method, path, body in (
        ("POST", f"{LLM}/instances", {"url": "http://127.0.0.1:9002"}),
        ("PUT", f"{LLM}/instances/a/heartbeat", None),
        ("PUT", f"{LLM}/instances/a/status", {"status": "draining"}),
        ("DELETE", f"{LLM}/instances/a", None),
    ):
        response = await api.request(method, path, json=body, headers=reader)
        assert "lacks the 'admin' scope" in error_of(response, 403, "Forbidden")["message"]


def test_the_documented_instance_is_what_describe_gives() -> None:
    """ServiceInstance documents InstanceState.describe(): the same fields."""
    instance = make_instance("llm", "http://127.0.0.1:9001", status=Status.UP)
    state = InstanceState(instance, Health(), None, Replica(instance.id, 1.0, ""))
    described = state.describe()
    assert set(described) == set(ServiceInstance.__struct_fields__)
    msgspec.convert(described, ServiceInstance)  # the types agree too


async def test_an_ipv6_instance_keeps_its_default_id_usable(api: httpx.AsyncClient) -> None:
    """The default id of http://[::1]:8000 is [::1]:8000: every route takes it."""
    made = await api.post(f"{LLM}/instances", json={"url": "http://[::1]:8000"})
    assert made.status_code == 201 and made.json()["id"] == "[::1]:8000"
    assert (await api.put(f"{LLM}/instances/[::1]:8000/heartbeat")).status_code == 204
    assert (await api.delete(f"{LLM}/instances/[::1]:8000")).status_code == 204
