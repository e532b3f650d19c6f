"""Live configuration: the store (typed, versioned, with history), its watch, and each
live setting applied by a running node without a restart."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.coordination import ConfigConflict
from shoal.coordination.config import HISTORY_LENGTH, parse
from shoal.node import Node
from shoal.resilience import BreakerPolicy
from tests.config_app import Caller, Flaky, Limited, Ticker
from tests.conftest import eventually, node_process, running_node, wait_for_status

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
    history = await client.config.history(limit=HISTORY_LENGTH)
    versions = [c.version for c in history]
    newest = HISTORY_LENGTH + 5
    assert versions == list(range(newest, newest - HISTORY_LENGTH, -1))  # distinct, consecutive


async def test_a_key_s_history_is_read_in_pages_back_to_its_changes(client: Client) -> None:
    first = await client.config.set("app.rare", "a")
    await asyncio.gather(*(client.config.set("app.busy", n) for n in range(250)))
    last = await client.config.set("app.rare", "b")
    assert [c.version for c in await client.config.history("app.rare")] == [
        last.version,
        first.version,
    ]
    assert [c.value for c in await client.config.history("app.rare", limit=1)] == ["b"]
    assert len(await client.config.history("app.busy", limit=120)) == 120


async def test_expect_version_makes_a_compare_and_set(client: Client) -> None:
    created = await client.config.set("app.owner", "a", expect_version=0)
    with pytest.raises(ConfigConflict) as raised:
        await client.config.set("app.owner", "b", expect_version=0)
    assert raised.value.current == created.version
    updated = await client.config.set("app.owner", "b", expect_version=created.version)
    with pytest.raises(ConfigConflict):
        await client.config.delete("app.owner", expect_version=created.version)
    assert await client.config.delete("app.owner", expect_version=updated.version)
    # an unset key is at version 0: expecting another one is a conflict, not "not set"
    with pytest.raises(ConfigConflict) as raised:
        await client.config.delete("app.owner", expect_version=updated.version)
    assert raised.value.current == 0
    assert await client.config.delete("app.owner", expect_version=0) is None


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
        ("capability.summarize.concurrency", 10**400, "within 0..1000000"),  # no float
        ("retry.backoff", 10**400, "within"),
        (
            "app.deep",
            [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
            "nested",
        ),
    ],
)
async def test_a_wrong_key_or_value_is_refused_saying_what_is_allowed(
    client: Client, key: str, value: Any, says: str
) -> None:
    with pytest.raises(ConfigurationError, match=says):
        await client.config.set(key, value)
    assert await client.config.version() == 0  # nothing was written


async def test_an_empty_author_is_refused_not_replaced(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="'by' names who"):
        await client.config.set("app.x", 1, by="")
    value: list[Any] = []
    for _ in range(100_000):  # deeper than json.dumps can recurse
        value = [value]
    with pytest.raises(ConfigurationError, match=r"nested too deeply"):
        await client.config.set("app.x", value)
    assert await client.config.version() == 0


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


async def test_a_burst_of_changes_costs_a_watcher_a_few_reads(
    client: Client, settings: Settings
) -> None:
    async with Client(settings=settings) as other:
        view = await other.config.watch()
        watcher = other.config._watcher
        assert watcher is not None
        before = watcher.reads
        entries = await asyncio.gather(*(client.config.set("app.n", n) for n in range(200)))
        assert await view.wait_for(max(e.version for e in entries), timeout=3)
        assert watcher.reads - before < 50, watcher.reads - before  # not one per change


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


# --- live settings on a running node ------------------------------------------------------


async def applied(node: Node, version: int) -> None:
    """Wait until the node applied config ``version`` (it says so in its record too)."""

    async def at_version() -> bool:
        return node.config_version >= version

    await eventually(at_version, f"node to apply config version {version}", timeout=5)


async def test_a_capability_s_concurrency_limit_holds_and_follows_live_changes(
    client: Client, settings: Settings
) -> None:
    Limited.reset()
    assert Limited.gate is not None
    async with running_node([Limited], settings, concurrency=10) as node:
        handles = [await client.submit("cfg_gated", i=i) for i in range(8)]

        async def running(n: int) -> Any:
            return Limited.in_flight == n or None

        await eventually(lambda: running(2), "the decorator's limit: 2 running")
        # other capabilities are not held back by a limited one
        assert await client.call("cfg_other", result_timeout=5) == "other"
        assert Limited.peak == 2
        raised = await client.config.set("capability.cfg_gated.concurrency", 4)
        await eventually(lambda: running(4), "the raised live limit: 4 running", timeout=2)
        lowered = await client.config.set("capability.cfg_gated.concurrency", 1)
        await applied(node, lowered.version)
        assert Limited.in_flight == 4  # lowering cancels nothing that runs
        Limited.peak = 0
        Limited.gate.set()  # the 4 finish; the other 4 may run one at a time only
        for handle in handles:
            await handle.result(timeout=10)
        # the other 4 started one at a time, each after the 4 running ones ended
        assert Limited.peak == 1 and raised.version < lowered.version


async def test_a_lowered_limit_lets_one_task_at_a_time_run(
    client: Client, settings: Settings
) -> None:
    Limited.reset()
    assert Limited.gate is not None
    Limited.gate.set()  # tasks take ~20 ms each
    entry = await client.config.set("capability.cfg_gated.concurrency", 1)
    async with running_node([Limited], settings, concurrency=10) as node:
        await applied(node, entry.version)
        handles = [await client.submit("cfg_gated", i=i) for i in range(6)]
        assert [await h.result(timeout=10) for h in handles] == list(range(6))
        assert Limited.peak == 1  # without the limit, all 6 would start in one fetch
        await client.config.delete("capability.cfg_gated.concurrency")  # back to 2
        Limited.peak = 0
        Limited.gate.clear()
        handles = [await client.submit("cfg_gated", i=i) for i in range(4)]

        async def two_running() -> bool:
            return Limited.in_flight == 2

        await eventually(two_running, "the decorator's limit again")
        Limited.gate.set()
        for handle in handles:
            await handle.result(timeout=10)
        assert Limited.peak == 2


async def test_a_paused_capability_starts_nothing_until_resumed(
    client: Client, settings: Settings
) -> None:
    Limited.reset()
    assert Limited.gate is not None
    Limited.gate.set()
    async with running_node([Limited], settings) as node:
        paused = await client.config.set("capability.cfg_gated.concurrency", 0)
        await applied(node, paused.version)
        handle = await client.submit("cfg_gated", i=7)
        assert await client.call("cfg_other", result_timeout=5) == "other"  # fetched after it
        assert (await handle.status()).status == "queued"
        await client.config.delete("capability.cfg_gated.concurrency")
        assert await handle.result(timeout=2) == 7


async def test_live_retry_defaults_apply_to_tasks_that_set_none(
    client: Client, settings: Settings
) -> None:
    await client.config.set("retry.backoff", 0.01)  # namespace-wide: the default is 1 s
    entry = await client.config.set("capability.cfg_flaky.max_attempts", 2)
    async with running_node([Flaky], settings) as node:
        await applied(node, entry.version)
        handle = await client.submit("cfg_flaky")
        await wait_for_status(handle, "dead", timeout=5)
        assert (await handle.status()).attempts == 2
        entry = await client.config.set("capability.cfg_flaky.max_attempts", 4)
        await applied(node, entry.version)
        handle = await client.submit("cfg_flaky")
        # four attempts within 3 s: the back-off is 10 ms, not 1 s, 2 s, 4 s
        await wait_for_status(handle, "dead", timeout=3)
        assert (await handle.status()).attempts == 4
        own = await client.submit("cfg_flaky", max_attempts=1)  # a task's own option wins
        await wait_for_status(own, "dead", timeout=3)
        assert (await own.status()).attempts == 1
        await client.config.delete("capability.cfg_flaky.max_attempts")
        entry = await client.config.set("retry.max_attempts", 3)  # the namespace default
        await applied(node, entry.version)
        handle = await client.submit("cfg_flaky")
        await wait_for_status(handle, "dead", timeout=3)
        assert (await handle.status()).attempts == 3


async def test_live_breaker_thresholds_reach_a_running_pool_that_set_no_policy(
    client: Client, settings: Settings
) -> None:
    explicit = client.services("cfg-explicit", breaker=BreakerPolicy(consecutive_failures=7))
    await explicit.start()
    async with running_node([Caller], settings) as node:
        before = await client.call("cfg_breaker", result_timeout=5)
        assert before["consecutive_failures"] == 5  # BreakerPolicy's default
        await client.config.set("breaker.consecutive_failures", 2)
        entry = await client.config.set("breaker.recovery", 0.5)
        await applied(node, entry.version)
        after = await client.call("cfg_breaker", result_timeout=5)  # the same pool
        assert (after["consecutive_failures"], after["recovery"]) == (2, 0.5)
        assert after["min_calls"] == before["min_calls"]
    assert explicit.breaker == BreakerPolicy(consecutive_failures=7)  # its own policy


async def test_log_levels_change_live_and_come_back_when_unset(
    client: Client, settings: Settings
) -> None:
    root, named = logging.getLogger(), logging.getLogger("shoal.cfgtest")
    root_before, named_before = root.level, named.level
    async with running_node([Ticker], settings) as node:
        await client.config.set("log.level.shoal.cfgtest", "DEBUG")
        entry = await client.config.set("log.level", "error")
        await applied(node, entry.version)
        assert (root.level, named.level) == (logging.ERROR, logging.DEBUG)
        await client.config.delete("log.level")
        entry = await client.config.set("log.level.shoal.cfgtest", "warning")
        await applied(node, entry.version)
        assert (root.level, named.level) == (root_before, logging.WARNING)
    assert named.level == named_before  # a stopped node gives the levels back


async def test_a_node_shows_the_config_version_it_applied_in_its_record(
    client: Client, settings: Settings
) -> None:
    entry = await client.config.set("app.anything", 1)
    async with running_node([Ticker], settings) as node:
        assert node.config_version == entry.version  # applied before it registered
        entry = await client.config.set("app.anything", 2)

        async def recorded() -> bool:
            raw = await client.redis.hget(client.keys.node(node.node_id), "config_version")
            return raw == str(entry.version).encode()

        await eventually(recorded, "the heartbeat to carry the applied version", timeout=5)


async def test_two_node_processes_share_a_capability_s_start_rate(
    client: Client, settings: Settings
) -> None:
    rate, burst, n = 25.0, 4, 100
    await client.config.set("capability.cfg_tick.rate", rate)
    entry = await client.config.set("capability.cfg_tick.burst", burst)
    with node_process(settings, "tests.config_app"), node_process(settings, "tests.config_app"):
        nodes = await client.wait_for_hosts("cfg_tick", count=2, timeout=20)

        async def both_applied() -> bool:
            versions = [
                await client.redis.hget(client.keys.node(node_id), "config_version")
                for node_id in nodes
            ]
            return all(int(v or 0) >= entry.version for v in versions)

        await eventually(both_applied, "both nodes to apply the rate", timeout=10)
        handles = await client.submit_many("cfg_tick", [{"i": i} for i in range(n)])
        for handle in handles:
            await handle.result(timeout=20)
    infos = [await handle.status() for handle in handles]
    starts = sorted(info.started_at or 0 for info in infos)[burst:]  # past the burst
    measured = (len(starts) - 1) / ((starts[-1] - starts[0]) / 1000)
    assert abs(measured - rate) / rate < 0.05, f"{measured:.2f} starts/s, configured {rate}"
    shares = [sum(info.node == node_id for info in infos) for node_id in nodes]
    assert min(shares) > n // 5, f"both nodes take part: {shares}"
