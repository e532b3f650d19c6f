"""/v1/config: the live configuration over HTTP, against a real engine and a real
gateway on a real socket; every JSON answer is checked against the OpenAPI document
on the way (``http`` from tests.test_gateway_api)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.apikeys import KeyStore
from tests.gateways import bearer, serving
from tests.test_gateway_api import error_of, http

CONCURRENCY = "/v1/config/capability.summarize.concurrency"


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway (open: on loopback, no keys) serving this test's namespace."""
    async with serving(settings) as url, http(url) as client:
        yield client


async def test_set_read_list_history_and_delete(api: httpx.AsyncClient, client: Client) -> None:
    put = await api.put(CONCURRENCY, json={"value": 4})
    assert put.status_code == 200, put.text
    entry = put.json()
    assert (entry["key"], entry["value"], entry["version"], entry["by"]) == (
        "capability.summarize.concurrency", 4, 1, "gateway",
    )  # fmt: skip
    assert await client.config.get("capability.summarize.concurrency") == 4
    assert (await api.get(CONCURRENCY)).json() == entry
    await api.put("/v1/config/app.flags", json={"value": {"beta": True}})
    listed = (await api.get("/v1/config", params={"prefix": "app."})).json()
    assert listed["version"] == 2
    assert [(e["key"], e["value"]) for e in listed["entries"]] == [("app.flags", {"beta": True})]
    deleted = await api.delete(CONCURRENCY)
    assert deleted.json() == {"key": "capability.summarize.concurrency", "version": 3}
    error_of(await api.get(CONCURRENCY), 404, "ConfigNotSet")
    error_of(await api.delete(CONCURRENCY), 404, "ConfigNotSet")
    history = (await api.get("/v1/config/history", params={"limit": 10})).json()
    assert [(c["version"], c["op"]) for c in history] == [(3, "delete"), (2, "set"), (1, "set")]
    only = (await api.get("/v1/config/history", params={"key": "app.flags"})).json()
    assert [c["key"] for c in only] == ["app.flags"]


async def test_a_bad_key_or_value_is_422_and_a_stale_version_409(api: httpx.AsyncClient) -> None:
    typo = await api.put("/v1/config/capability.summarize.concurency", json={"value": 4})
    assert "unknown config key" in error_of(typo, 422, "ConfigurationError")["message"]
    wrong = await api.put(CONCURRENCY, json={"value": "four"})
    assert "whole number" in error_of(wrong, 422, "ConfigurationError")["message"]
    error_of(await api.put(CONCURRENCY, json={"valu": 4}), 422, "ValidationError")
    await api.put(CONCURRENCY, json={"value": 2, "expect_version": 0})
    stale = await api.put(CONCURRENCY, json={"value": 3, "expect_version": 0})
    assert "at version 1" in error_of(stale, 409, "ConfigConflict")["message"]
    stale = await api.delete(CONCURRENCY, params={"expect_version": 7})
    error_of(stale, 409, "ConfigConflict")


async def test_reading_needs_read_and_changing_needs_admin(
    api: httpx.AsyncClient, client: Client
) -> None:
    await client.config.set("app.x", 1)
    reader = bearer((await KeyStore(client).create("reader", ["read"])).secret)
    assert (await api.get("/v1/config/app.x", headers=reader)).status_code == 200
    assert (await api.get("/v1/config", headers=reader)).status_code == 200
    for method, body in (("PUT", {"value": 2}), ("DELETE", None)):
        response = await api.request(method, "/v1/config/app.x", json=body, headers=reader)
        assert "lacks the 'admin' scope" in error_of(response, 403, "Forbidden")["message"]
    admin = await KeyStore(client).create("ops", ["read", "admin"])
    changed = await api.put("/v1/config/app.x", json={"value": 3}, headers=bearer(admin.secret))
    assert changed.json()["by"] == f"apikey:{admin.key.id}"


async def test_a_huge_number_or_deeply_nested_value_is_422_not_a_crash(
    api: httpx.AsyncClient,
) -> None:
    json_body = {"content-type": "application/json"}
    huge = await api.put(CONCURRENCY, content=b'{"value": ' + b"9" * 400 + b"}", headers=json_body)
    assert "within 0..1000000" in error_of(huge, 422, "ConfigurationError")["message"]
    for depth in (33, 900):  # deeper than MAX_DEPTH, within what the JSON parser takes
        nested = b"[" * depth + b"]" * depth
        deep = await api.put(
            "/v1/config/app.deep", content=b'{"value": ' + nested + b"}", headers=json_body
        )
        assert "nested more than" in error_of(deep, 422, "ConfigurationError")["message"]
    # beyond the parser's own limit, the body is refused before it reaches Shoal
    nested = b"[" * 50_000 + b"]" * 50_000
    deep = await api.put(
        "/v1/config/app.deep", content=b'{"value": ' + nested + b"}", headers=json_body
    )
    assert deep.status_code in (400, 413), deep.text[:200]
    assert (await api.get("/v1/config/app.deep")).status_code == 404


async def test_a_key_with_a_slash_is_refused_everywhere(
    api: httpx.AsyncClient, client: Client
) -> None:
    """A key is one path segment; one with a '/' could be written but not reached."""
    with pytest.raises(ConfigurationError, match="invalid"):
        await client.config.set("app.models/default", "small")
    response = await api.put("/v1/config/app.models%2Fdefault", json={"value": "small"})
    assert 400 <= response.status_code < 500, response.text  # never stored
