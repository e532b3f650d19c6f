"""The sliding window and RateLimiter (waiting for room) against the real engine,
and one limit shared by two real processes (tests/ratelimit_procs.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from shoal import Agent, Client, ConfigurationError, RateLimited, Settings, capability
from shoal.coordination import SlidingWindow
from tests.conftest import REPO, node_env, running_node


@pytest.mark.topology
async def test_a_window_admits_its_limit_then_says_when_the_oldest_call_leaves(
    client: Client,
) -> None:
    window = SlidingWindow(client, "test")
    decisions = [await window.take("k", limit=3, window=1.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert 0.9 < decisions[3].retry_after <= 1.0  # the first call leaves after 1 s


@pytest.mark.topology
async def test_a_window_slides_calls_leave_one_by_one(client: Client) -> None:
    window = SlidingWindow(client, "test")
    assert (await window.take("k", limit=2, window=0.3)).allowed
    await asyncio.sleep(0.1)  # calls spaced in time: what a sliding window is about
    assert (await window.take("k", limit=2, window=0.3)).allowed
    refused = await window.take("k", limit=2, window=0.3)
    assert not refused.allowed and 0.1 < refused.retry_after <= 0.2
    await asyncio.sleep(refused.retry_after)  # room comes back when the first call leaves
    assert (await window.take("k", limit=2, window=0.3)).allowed
    assert not (await window.take("k", limit=2, window=0.3)).allowed  # only one left


@pytest.mark.topology
async def test_a_window_refuses_a_cost_that_does_not_fit_and_says_when_it_will(
    client: Client,
) -> None:
    window = SlidingWindow(client, "test")
    assert (await window.take("k", limit=5, window=2.0, cost=3)).allowed
    refused = await window.take("k", limit=5, window=2.0, cost=3)
    assert not refused.allowed and refused.remaining == 2
    assert 1.9 < refused.retry_after <= 2.0  # the three first calls leave together
    assert (await window.take("k", limit=5, window=2.0, cost=2)).allowed


@pytest.mark.topology
async def test_concurrent_calls_never_overfill_a_window(client: Client, settings: Settings) -> None:
    async with Client(settings=settings) as other:
        windows = [SlidingWindow(c, "test") for c in (client, other)]
        takes = [windows[i % 2].take("busy", limit=10, window=60) for i in range(60)]
        decisions = await asyncio.gather(*takes)
    assert sum(d.allowed for d in decisions) == 10
    assert await client.redis.zcard(client.keys.ratewindow("test", "busy")) == 10


async def test_a_window_key_expires_one_window_after_its_last_call(client: Client) -> None:
    await SlidingWindow(client, "test").take("k", limit=5, window=3.0)
    assert 2000 < await client.redis.pttl(client.keys.ratewindow("test", "k")) <= 3000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"limit": 0, "window": 1}, "limit must be"),
        ({"limit": 1.5, "window": 1}, "limit must be"),
        ({"limit": 100_001, "window": 1}, "use a token bucket"),
        ({"limit": 5, "window": 0}, "window must be"),
        ({"limit": 5, "window": float("nan")}, "window must be"),
        ({"limit": 5, "window": 1, "cost": 6}, "more than the window admits"),
    ],
)
async def test_bad_window_arguments_are_refused(
    client: Client, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await SlidingWindow(client, "test").take("k", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give either rate="),
        ({"rate": 1, "limit": 5, "window": 1}, "give either rate="),
        ({"rate": 1, "window": 1}, "window= goes with limit="),
        ({"limit": 5, "burst": 1}, "burst= goes with rate="),
        ({"limit": 5}, "needs window="),
        ({"rate": -1}, "rate must be"),
    ],
)
def test_a_limiter_needs_one_kind_of_limit(
    client: Client, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        client.rate_limiter("api", **kwargs)  # type: ignore[arg-type]


def test_a_limiter_name_must_be_a_short_safe_key_part(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="rate-limit name"):
        client.rate_limiter("has space", rate=1)
    with pytest.raises(ConfigurationError, match="too long"):
        client.rate_limiter("x" * 60, rate=1)


async def test_user_limiters_never_share_the_gateways_buckets(client: Client) -> None:
    await client.rate_limiter("apikey", rate=1, burst=1).take("k")
    assert await client.redis.exists(client.keys.ratelimit("limit.apikey", "k"))
    assert not await client.redis.exists(client.keys.ratelimit("apikey", "k"))


@pytest.mark.topology
async def test_acquire_waits_for_room_then_takes_it(client: Client) -> None:
    limiter = client.rate_limiter("api", rate=20, burst=1)
    await limiter.acquire()
    started = time.monotonic()
    await limiter.acquire(timeout=1)  # the next token comes 50 ms later
    assert 0.04 <= time.monotonic() - started < 0.5


async def test_acquire_raises_rate_limited_when_room_comes_too_late(client: Client) -> None:
    limiter = client.rate_limiter("api", limit=1, window=30)
    await limiter.acquire(key="org-1")
    started = time.monotonic()
    with pytest.raises(RateLimited) as limited:
        await limiter.acquire(key="org-1", timeout=0.2)
    assert time.monotonic() - started < 0.1, "it knows at once that 0.2 s is not enough"
    assert limited.value.limiter == "api" and limited.value.key == "org-1"
    assert 29 < limited.value.retry_after <= 30
    assert "room again in" in str(limited.value)
    await limiter.acquire(key="org-2", timeout=0)  # another key has its own window
    with pytest.raises(ConfigurationError, match="timeout must be"):
        await limiter.acquire(timeout=-1)


class Geocoder(Agent):
    @capability("geocode")
    async def geocode(self, place: str) -> str:
        await self.ctx.rate_limiter("geo-api", limit=2, window=60).acquire(timeout=0)
        return place.upper()


async def test_handlers_share_a_limit_through_ctx(client: Client, settings: Settings) -> None:
    async with running_node([Geocoder], settings):
        assert await client.call("geocode", place="oslo", max_attempts=1) == "OSLO"
        assert await client.call("geocode", place="rome", max_attempts=1) == "ROME"
        handle = await client.submit("geocode", place="lima", max_attempts=1)
        with pytest.raises(Exception, match="rate limit 'geo-api'"):
            await handle.result(timeout=10)
    assert (await handle.status()).errors[0].type == "shoal.errors.RateLimited"


@pytest.mark.parametrize(("kind", "per_second"), [("bucket", 100.0), ("window", 100.0)])
def test_two_processes_share_one_limit_within_five_percent(
    settings: Settings, kind: str, per_second: float
) -> None:
    seconds = 3.0
    start = time.time() + 2.0  # both processes connected and waiting by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.ratelimit_procs", kind, repr(start), repr(seconds)],
            cwd=REPO,
            env=node_env(settings),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=30)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    grants = [json.loads(out) for out in outputs]
    assert all(len(g) > 50 for g in grants), "both processes took a share"
    total = sum(len(g) for g in grants)
    # A bucket starts full: its burst comes on top of the rate. A window's first
    # `limit` calls are its share of the first window: 3 s hold exactly 6 windows.
    upfront = 10 if kind == "bucket" else 0
    measured = (total - upfront) / seconds
    assert abs(measured - per_second) <= 0.05 * per_second, (total, measured)
