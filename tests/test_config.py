"""Live configuration: the store (typed, versioned, with history), its watch, and each
live setting applied by a running node without a restart."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.coordination import ConfigConflict
from shoal.coordination.config import HISTORY_LENGTH, parse

# --- the store ------------------------------------------------------------------------


async def test_a_setting_is_stored_typed_with_a_version_author_and_time(client: Client) -> None:
    assert await client.config.get("capability.summarize.concurrency") is None
    entry = await client.config.set("capability.summarize.concurrency", 4, by="ops@laptop")
    assert (entry.value, entry.by) == (4, "ops@laptop")
    assert entry.version == 1 and entry.at > 0
    read = await client.config.entry("capability.summarize.concurrency")
    assert read == entry
    await client.config.set("capability.summarize.backoff", 2)  # a float setting takes an int
    assert await client.config.get("capability.summarize.backoff") == 2.0
    assert isinstance(await client.config.get("capability.summarize.backoff"), float)
    await client.config.set("app.feature", {"on": True, "ratio": 0.5, "tags": ["a"]})
    assert await client.config.get("app.feature") == {"on": True, "ratio": 0.5, "tags": ["a"]}


async def test_every_change_gets_a_higher_version_and_lands_in_the_history(
    client: Client,
) -> None:
    first = await client.config.set("log.level", "INFO")
    second = await client.config.set("log.level", "debug")
    other = await client.config.set("app.x", "y")
    deleted = await client.config.delete("log.level", by="someone")
    assert first.version < second.version < other.version < (deleted or 0)
    assert await client.config.get("log.level") is None
    assert await client.config.delete("log.level") is None  # already unset
    assert await client.config.version() == deleted
    history = await client.config.history("log.level")
    assert [(c.op, c.value, c.version) for c in history] == [
        ("delete", None, deleted),
        ("set", "debug", second.version),  # levels are stored in lower case
        ("set", "info", first.version),
    ]
    assert history[0].by == "someone"
    assert [c.key for c in await client.config.history(limit=2)] == ["log.level", "app.x"]


async def test_the_history_is_bounded(client: Client) -> None:
    pipe_sets = [client.config.set("app.counter", n) for n in range(HISTORY_LENGTH + 5)]
    await asyncio.gather(*pipe_sets)
    assert await client.redis.xlen(client.keys.live_config[2]) == HISTORY_LENGTH
    assert len(await client.config.history(limit=HISTORY_LENGTH)) == HISTORY_LENGTH


async def test_expect_version_makes_a_compare_and_set(client: Client) -> None:
    created = await client.config.set("app.owner", "a", expect_version=0)
    with pytest.raises(ConfigConflict) as raised:
        await client.config.set("app.owner", "b", expect_version=0)
    assert raised.value.current == created.version
    updated = await client.config.set("app.owner", "b", expect_version=created.version)
    with pytest.raises(ConfigConflict):
        await client.config.delete("app.owner", expect_version=created.version)
    assert await client.config.delete("app.owner", expect_version=updated.version)


async def test_list_returns_the_settings_under_a_prefix(client: Client) -> None:
    await client.config.set("capability.a.concurrency", 1)
    await client.config.set("capability.b.rate", 5)
    await client.config.set("app.z", 1)
    assert [e.key for e in await client.config.list("capability.")] == [
        "capability.a.concurrency",
        "capability.b.rate",
    ]
    snapshot = await client.config.snapshot()
    assert snapshot.version == 3 and len(snapshot.entries) == 3


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("capability.summarize.concurency", 4, "unknown config key"),  # a typo
        ("concurrency", 4, "unknown config key"),
        ("capability.summarize.concurrency", "4", "whole number"),  # a string for an int
        ("capability.summarize.concurrency", 2.5, "whole number"),
        ("capability.summarize.concurrency", True, "whole number"),
        ("capability.summarize.concurrency", -1, "within 0..1000000"),
        ("capability.summarize.rate", 0, "within"),
        ("capability.-bad.rate", 1, "capability name"),
        ("retry.backoff", float("nan"), "within"),
        ("breaker.failure_rate", 1.5, "within"),
        ("log.level", "loud", "log level"),
        ("app.blob", "x" * 70_000, "at most"),
        ("app.obj", {1, 2}, "JSON"),
        ("bad key!", 1, "invalid"),
    ],
)
async def test_a_wrong_key_or_value_is_refused_saying_what_is_allowed(
    client: Client, key: str, value: Any, says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        await client.config.set(key, value)
    assert await client.config.version() == 0  # nothing was written


def test_values_typed_as_text_take_the_settings_type() -> None:
    assert parse("capability.x.concurrency", "3") == 3
    assert parse("retry.backoff", "0.5") == 0.5
    assert parse("log.level.shoal.node", "DEBUG") == "debug"
    assert parse("app.flag", "true") is True
    assert parse("app.name", "plain words") == "plain words"
    with pytest.raises(ConfigurationError, match="whole number"):
        parse("capability.x.concurrency", "three")


async def test_a_watched_view_follows_changes_at_once(client: Client, settings: Settings) -> None:
    async with Client(settings=settings) as other:
        view = await other.config.watch()
        assert view.version == 0
        seen: list[int] = []
        view.on_change(lambda v: seen.append(v.version))
        entry = await client.config.set("app.colour", "blue")
        assert await view.wait_for(entry.version, timeout=0.5)  # well before the poll
        assert view.get("app.colour") == "blue" and seen == [entry.version]
        deleted = await client.config.delete("app.colour")
        assert deleted is not None and await view.wait_for(deleted, timeout=0.5)
        assert "app.colour" not in view.values


async def test_a_missed_announcement_is_made_up_for_by_the_periodic_look(
    client: Client, settings: Settings
) -> None:
    async with Client(settings=settings) as other:
        view = await other.config.watch()
        # A change written behind the script's back: no announcement goes out.
        record = "7\n1\nhand\n" + '"quiet"'
        await client.redis.hset(client.keys.live_config[0], "app.quiet", record)
        await client.redis.set(client.keys.live_config[1], 7)
        assert await view.wait_for(7, timeout=3)
        assert view.get("app.quiet") == "quiet"
