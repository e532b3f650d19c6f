"""The service registry on a real engine: registration, TTL expiry, static entries,
filters, status, the watched view and its change notifications."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

from shoal import Client, ConfigurationError
from shoal.registry import Registry, Status, UnknownService
from tests.conftest import eventually


async def test_register_list_and_deregister(client: Client) -> None:
    registry = client.registry
    await registry.register("llm", "http://127.0.0.1:9001", zone="eu", weight=2,
                            metadata={"model": "qwen"})  # fmt: skip
    await registry.register("llm", "http://127.0.0.1:9002/v1/", id="b", zone="us")
    assert await registry.services() == ["llm"]
    states = await registry.instances("llm")
    assert [s.id for s in states] == ["127.0.0.1:9001", "b"]
    first, second = states
    assert (first.url, first.instance.zone, first.instance.weight) == (
        "http://127.0.0.1:9001", "eu", 2.0,
    )  # fmt: skip
    assert second.url == "http://127.0.0.1:9002/v1"  # the trailing slash is dropped
    assert first.status == Status.UP and first.breaker == "closed"
    assert [s.id for s in await registry.instances("llm", zone="us")] == ["b"]
    assert [s.id for s in await registry.instances("llm", metadata={"model": "qwen"})] == [
        "127.0.0.1:9001"
    ]
    assert await registry.instances("llm", metadata={"model": "other"}) == []
    assert await registry.deregister("llm", "b") is True
    assert await registry.deregister("llm", "b") is False
    assert await registry.deregister("llm", "127.0.0.1:9001") is True
    assert await registry.services() == []
    assert await registry.instances("llm") == []


async def test_status_changes_and_filters(client: Client) -> None:
    registry = client.registry
    await registry.register("tools", "http://127.0.0.1:9100", id="t1")
    await registry.register("tools", "http://127.0.0.1:9101", id="t2", status="starting")
    assert [s.id for s in await registry.instances("tools", status="starting")] == ["t2"]
    await registry.set_status("tools", "t2", "up")
    await registry.set_status("tools", "t1", "draining")
    states = {s.id: s for s in await registry.instances("tools")}
    assert states["t1"].status == "draining" and not states["t1"].in_rotation
    assert states["t2"].status == "up" and states["t2"].in_rotation
    with pytest.raises(UnknownService, match="no instance 'nope'"):
        await registry.set_status("tools", "nope", "up")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"service": "bad name", "url": "http://x:1"}, "service name"),
        ({"service": "s", "url": "ftp://x:1"}, "http"),
        ({"service": "s", "url": "http://x:99999"}, "Port"),
        ({"service": "s", "url": "http://x:1", "weight": 0}, "weight"),
        ({"service": "s", "url": "http://x:1", "ttl": 0.1}, "ttl"),
        ({"service": "s", "url": "http://x:1", "status": "sleepy"}, "status"),
        ({"service": "s", "url": "http://x:1", "zone": "eu west"}, "zone"),
        ({"service": "s", "url": "http://x:1", "id": "-x"}, "instance id"),
        ({"service": "s", "url": "http://x:1", "metadata": {"k": 1}}, "metadata"),
        ({"service": "s", "url": "http://u:pw@x:1"}, "credentials"),
        ({"service": "s", "url": "http://x:1/v1?k=1"}, "no query"),
    ],
)
async def test_bad_registrations_are_refused_clearly(
    client: Client, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await client.registry.register(**kwargs)  # type: ignore[arg-type]
    assert await client.registry.services() == []


async def test_an_instance_that_stops_heartbeating_expires(client: Client) -> None:
    """TTL 1 s: heartbeats keep it; without them it is gone after the TTL, and a
    late heartbeat does not bring it back (the registration re-registers)."""
    registry = client.registry
    instance = await registry.register("embed", "http://127.0.0.1:9200", ttl=1)
    static = await registry.register("embed", "http://api.example.com", id="hosted", ttl=None)
    assert static.ttl is None
    started = time.monotonic()
    while time.monotonic() - started < 1.6:  # heartbeats past the TTL keep it alive
        assert await registry.heartbeat(instance)
        await asyncio.sleep(0.3)  # the heartbeat period under test
    assert {s.id for s in await registry.instances("embed")} == {instance.id, "hosted"}
    view = await registry.watch("embed")
    silent_since = time.monotonic()
    while instance.id in view.by_id:
        assert await view.changed(timeout=3), "the expiry was not announced"
    gone_after = time.monotonic() - silent_since
    assert 0.5 < gone_after < 2.5, gone_after  # TTL 1 s + at most one 0.5 s re-read
    assert [s.id for s in view.instances] == ["hosted"]  # static: never expires
    assert not await registry.heartbeat(instance)


async def test_registration_heartbeats_and_deregisters(client: Client) -> None:
    registry = client.registry
    async with registry.registration("vec", "http://127.0.0.1:9300", ttl=1) as instance:
        view = await registry.watch("vec")
        assert instance.id in view.by_id
        # two TTLs later it is still there: the registration heartbeats
        assert not await view.changed(timeout=2.0)
        assert instance.id in view.by_id
    assert await registry.instances("vec") == []


@pytest.mark.topology
async def test_views_in_two_clients_see_changes_within_a_second(
    client: Client, settings: object
) -> None:
    async with Client(settings=settings) as other:  # type: ignore[arg-type]
        view = await other.registry.watch("llm")
        assert view.instances == []
        started = time.monotonic()
        await client.registry.register("llm", "http://127.0.0.1:9400", id="a")
        while "a" not in view.by_id:
            assert await view.changed(timeout=1.0), "registration not seen within 1 s"
        await client.registry.set_status("llm", "a", "draining")
        while view.by_id["a"].status != "draining":
            assert await view.changed(timeout=1.0), "status change not seen within 1 s"
        await client.registry.deregister("llm", "a")
        while "a" in view.by_id:
            assert await view.changed(timeout=1.0), "deregistration not seen within 1 s"
        assert time.monotonic() - started < 3.0
        filtered = await other.registry.watch("llm")
        assert filtered is view  # one view per service and client


async def test_registry_describe_is_plain_data(client: Client) -> None:
    await Registry(client).register("llm", "http://127.0.0.1:9500", id="x", ttl=None)
    (state,) = await client.registry.instances("llm")
    described = state.describe()
    assert described["id"] == "x" and described["static"] is True
    assert described["breaker"] == "closed" and described["probe"] is None


async def test_heartbeats_keep_a_status_set_meanwhile(client: Client) -> None:
    """An operator drains a self-heartbeating instance: its heartbeats restart the
    TTL without writing its record back, so it stays draining."""
    registry = client.registry
    async with registry.registration("llm", "http://127.0.0.1:9600", id="r", ttl=1):
        await registry.set_status("llm", "r", "draining")
        view = await registry.watch("llm")
        started = time.monotonic()
        while time.monotonic() - started < 1.5:  # several heartbeats (every ttl/3)
            await view.changed(timeout=0.3)
            assert view.by_id["r"].status == "draining"


async def test_set_status_never_brings_an_instance_back(client: Client) -> None:
    registry = client.registry
    instance = await registry.register("llm", "http://127.0.0.1:9700", id="gone")
    await registry.deregister("llm", "gone")
    assert not await registry.put(
        msgspec.structs.replace(instance, status="draining"), mode="update"
    )
    with pytest.raises(UnknownService):
        await registry.set_status("llm", "gone", "draining")
    assert await registry.instances("llm") == []


async def test_expired_services_are_not_listed_and_ids_of_ipv6_urls(client: Client) -> None:
    registry = client.registry
    await registry.register("short", "http://[::1]:8000", ttl=1)
    assert [s.id for s in await registry.instances("short")] == ["[::1]:8000"]
    assert await registry.services() == ["short"]
    await eventually(lambda: _no_services(registry), "the expired service is unlisted", 3)
    with pytest.raises(ConfigurationError, match="status 'bogus' is invalid"):
        await registry.instances("short", status="bogus")


async def _no_services(registry: Registry) -> bool:
    return await registry.services() == []


async def test_concurrent_first_watches_share_one_view(client: Client) -> None:
    await client.registry.register("llm", "http://127.0.0.1:9800", id="x")
    views = await asyncio.gather(*(client.registry.watch("llm") for _ in range(5)))
    assert all(v is views[0] for v in views) and "x" in views[0].by_id
    await client.registry.deregister("llm", "x")
    while "x" in views[0].by_id:  # the one view is the one kept current
        assert await views[0].changed(timeout=1.0)
