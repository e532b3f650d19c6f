"""Per-capability limits on a running node, after the review: start tokens are paid
only by starts, a held-back capability costs no fetches, a changed limit applies at
once, a broken bucket holds back only its capability; and the live settings'
edges (a version counter that went back, several nodes in one process, values the
node cannot apply, max_attempts of tasks under way)."""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any

from shoal import Client, Settings
from shoal.admission import Admission, Limits
from shoal.coordination.ratelimit import TokenBucket
from tests.config_app import Flaky, Limited, Mixed, Ticker
from tests.conftest import eventually, running_node, wait_for_status
from tests.test_config import applied

# --- start tokens -----------------------------------------------------------------------


async def test_tokens_are_taken_up_to_what_the_bucket_has_and_given_back(client: Client) -> None:
    bucket = TokenBucket(client, "capability")
    got = await bucket.take_each({"a": (0.001, 3, 5), "b": (0.001, 2, 1)})
    assert not isinstance(got["a"], Exception) and got["a"][0] == 3  # all it had, not 5
    assert not isinstance(got["b"], Exception) and got["b"][0] == 1
    refused = (await bucket.take_each({"a": (0.001, 3, 1)}))["a"]
    assert not isinstance(refused, Exception)
    assert refused[0] == 0 and refused[1].retry_after > 100  # ~1000 s at this rate
    await bucket.give_each({"a": (0.001, 3, 2)})
    again = (await bucket.take_each({"a": (0.001, 3, 5)}))["a"]
    assert not isinstance(again, Exception) and again[0] == 2
    await bucket.give_each({"a": (0.001, 3, 10)})  # never past the bucket's size
    assert not await client.redis.exists(client.keys.ratelimit("capability", "a"))  # full
    assert (await bucket.take_each({"a": (0.001, 3, 10)}))["a"][0] == 3  # type: ignore[index]


async def test_one_round_trip_takes_every_capability_s_tokens_and_finishes_wake_sparingly(
    client: Client,
) -> None:
    opened: list[int] = []
    admission = Admission(client, lambda: opened.append(1))
    limits = {"r1": Limits(rate=100), "r2": Limits(rate=100), "r3": Limits(rate=5, burst=2)}
    admission.set_limits({**limits, "c": Limits(concurrency=2), "free": Limits()})
    opened.clear()
    budgets = await admission.budgets(10)
    assert budgets == {"r1": 10, "r2": 10, "r3": 2, "c": 2}
    assert admission.token_calls == 1  # pipelined: one round trip for the three buckets
    await admission.settle(Counter({"r1": 4}))  # r1 used 4 of 10; the rest goes back
    assert admission.token_calls == 2
    assert (await admission.budgets(10))["r1"] == 10  # 6 given back + refill
    await admission.settle(Counter({"r1": 10, "r2": 10, "r3": 2}))
    # a finish wakes the loop only when it reopens a concurrency limit
    for cap in ("r1", "c", "c"):
        admission.started(cap)
    admission.finished("r1")
    assert opened == []  # rate-only: a finish opens nothing
    admission.finished("c")
    assert opened == [1]  # 2 -> 1 under a limit of 2
    admission.close()


async def test_a_rate_limited_capability_keeps_its_rate_beside_a_busy_one_on_a_full_node(
    client: Client, settings: Settings
) -> None:
    rate, n, burst = 10.0, 21, 5
    await client.config.set("capability.cfg_rated.rate", rate)
    # a burst of a few tokens: a round the loaded node runs late loses no accrual
    # (with burst 1, every late millisecond is a token never made; a full suite run
    # once measured 8.7/s that way)
    entry = await client.config.set("capability.cfg_rated.burst", burst)
    async with running_node([Mixed], settings, concurrency=1) as node:
        await applied(node, entry.version)
        busy = await client.submit_many("cfg_busy", [{"i": i} for i in range(1200)])
        rated = await client.submit_many("cfg_rated", [{"i": i} for i in range(n)])
        for handle in rated:
            await handle.result(timeout=10)
        # the node's one slot was wanted by the busy capability all along
        assert (await busy[-1].status()).status == "queued"
        # every token the node kept paid for a start: none spent on a round whose
        # slot went to the busy capability (the defect this test was written for)
        assert node.admission.tokens["cfg_rated"] == n
    starts = sorted([(await h.status()).started_at or 0 for h in rated])
    measured = (len(starts) - burst) / ((starts[-1] - starts[0]) / 1000)  # the burst at once
    # ~9.97/s measured, also beside another run; tokens not given back when the
    # slot went to the busy capability (the reviewed code) gave 8.8-9.5/s
    assert abs(measured - rate) / rate < 0.05, f"{measured:.2f} starts/s, configured {rate}"


async def test_a_held_back_capability_s_submissions_do_not_wake_the_node(
    client: Client, settings: Settings
) -> None:
    Limited.reset()
    assert Limited.gate is not None
    Limited.gate.set()
    async with running_node([Limited], settings) as node:
        paused = await client.config.set("capability.cfg_gated.concurrency", 0)
        await applied(node, paused.version)
        assert await client.call("cfg_other", result_timeout=5) == "other"
        before = node.fetch_calls
        handles = [await client.submit("cfg_gated", i=i) for i in range(60)]
        assert await client.call("cfg_other", result_timeout=5) == "other"
        # one fetch for cfg_other, perhaps one more per idle second and the round
        # after cfg_other's: not one per submission of the paused capability
        assert node.fetch_calls - before <= 5, node.fetch_calls - before
        assert {(await h.status()).status for h in handles} == {"queued"}
        await client.config.delete("capability.cfg_gated.concurrency")
        for handle in handles:
            await handle.result(timeout=10)


async def test_a_raised_rate_ends_an_earlier_refusal_at_once(
    client: Client, settings: Settings
) -> None:
    await client.config.set("capability.cfg_tick.rate", 0.01)  # one start in 100 s
    entry = await client.config.set("capability.cfg_tick.burst", 1)
    async with running_node([Ticker], settings) as node:
        await applied(node, entry.version)
        assert await client.call("cfg_tick", i=1, result_timeout=5) == 1  # the burst
        second = await client.submit("cfg_tick", i=2)

        async def refused() -> bool:
            return node.admission.held_back("cfg_tick") > 50  # told to wait ~100 s

        await eventually(refused, "the bucket to refuse the second start")
        await client.config.set("capability.cfg_tick.rate", 100)
        assert await second.result(timeout=3) == 2


async def test_a_broken_bucket_holds_back_only_its_own_capability(
    client: Client, settings: Settings
) -> None:
    bucket = client.keys.ratelimit("capability", "cfg_rated")
    await client.redis.set(bucket, "not a bucket")  # every take of it: WRONGTYPE
    await client.config.set("capability.cfg_rated.rate", 50)
    entry = await client.config.set("capability.cfg_spare.rate", 50)
    async with running_node([Mixed], settings) as node:
        await applied(node, entry.version)
        handle = await client.submit("cfg_rated", i=1)
        assert await client.call("cfg_spare", result_timeout=5) == "spare"  # rate-limited too
        assert await client.call("cfg_busy", i=3, result_timeout=5) == 3  # unlimited
        assert (await handle.status()).status == "queued"
        await client.redis.delete(bucket)
        assert await handle.result(timeout=5) == 1  # within the error pause


# --- live settings' edges ----------------------------------------------------------------


async def test_watchers_and_nodes_follow_a_version_counter_that_went_back(
    client: Client, settings: Settings
) -> None:
    async with Client(settings=settings) as other, running_node([Ticker], settings) as node:
        view = await other.config.watch()
        for n in range(3):
            entry = await client.config.set("app.n", n)
        assert await view.wait_for(entry.version, timeout=3)
        await applied(node, entry.version)
        await client.redis.delete(*client.keys.live_config)  # the engine lost the settings
        after = await client.config.set("capability.cfg_tick.concurrency", 5)
        assert after.version == 1

        async def view_reset() -> bool:
            return view.get("capability.cfg_tick.concurrency") == 5

        await eventually(view_reset, "the view to take the lower version", timeout=3)
        assert view.version == 1 and "app.n" not in view.values

        async def node_reset() -> bool:
            return node.admission.limits.get("cfg_tick") == Limits(concurrency=5)

        await eventually(node_reset, "the node to apply the setting", timeout=3)
        assert node.config_version == 1


async def test_log_levels_of_two_nodes_in_one_process_come_back_when_both_stop(
    client: Client, settings: Settings
) -> None:
    logger = logging.getLogger("shoal.cfgtest.two")
    before = logger.level
    first, second = contextlib.AsyncExitStack(), contextlib.AsyncExitStack()
    try:
        node = await first.enter_async_context(running_node([Ticker], settings))
        entry = await client.config.set("log.level.shoal.cfgtest.two", "debug")
        await applied(node, entry.version)
        other = await second.enter_async_context(running_node([Ticker], settings))
        await applied(other, entry.version)
        assert logger.level == logging.DEBUG
        await first.aclose()  # the other node still wants it
        assert logger.level == logging.DEBUG
        await second.aclose()
        assert logger.level == before
    finally:
        await first.aclose()
        await second.aclose()
        logger.setLevel(before)


async def test_a_node_skips_values_it_cannot_apply_and_applies_the_rest(
    client: Client, settings: Settings
) -> None:
    await client.config.set("capability.cfg_gated.concurrency", 1)
    # written behind the store's back (a newer Shoal, a hand-made HSET)
    raw = {
        "log.level": "5\n1\nhand\n" + '"loud"',
        "capability.cfg_gated.rate": "6\n1\nhand\n" + "-3",
        "future.setting": "7\n1\nhand\n" + "1",
    }
    await client.redis.hset(client.keys.live_config[0], mapping=raw)
    await client.redis.set(client.keys.live_config[1], 7)
    root_before = logging.getLogger().level
    async with running_node([Limited], settings) as node:
        assert node.config_version == 7
        assert node.admission.limits["cfg_gated"] == Limits(concurrency=1)
        assert logging.getLogger().level == root_before


async def test_a_live_max_attempts_reaches_a_task_already_under_way(
    client: Client, settings: Settings
) -> None:
    await client.config.set("capability.cfg_flaky.backoff", 1.0)  # 0.5..1 s to attempt 2
    entry = await client.config.set("capability.cfg_flaky.max_attempts", 2)
    async with running_node([Flaky], settings) as node:
        await applied(node, entry.version)
        handle = await client.submit("cfg_flaky")

        async def failed_once() -> Any:
            info = await handle.status()
            return info.attempts == 1 and info.status != "running"

        await eventually(failed_once, "the first attempt to fail", timeout=5)
        await client.config.set("capability.cfg_flaky.backoff", 0.01)
        entry = await client.config.set("capability.cfg_flaky.max_attempts", 4)
        await applied(node, entry.version)
        await wait_for_status(handle, "dead", timeout=5)
        assert (await handle.status()).attempts == 4
