"""The shared token bucket, against the real engine on every topology."""

from __future__ import annotations

import asyncio
import time

import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.coordination import TokenBucket
from tests.conftest import eventually


@pytest.mark.topology
async def test_a_full_bucket_allows_its_burst_then_refuses_saying_when_to_retry(
    client: Client,
) -> None:
    bucket = TokenBucket(client, "test")
    decisions = [await bucket.take("k", rate=0.5, burst=3) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    # A few ms pass between calls; at 0.5 tokens/s they add a few thousandths.
    assert [round(d.remaining) for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.remaining < 0.1
    assert 1.5 < refused.retry_after <= 2.0  # one token at 0.5/s: 2 s, less what refilled
    assert all(d.retry_after == 0 for d in decisions[:3])


@pytest.mark.topology
async def test_retry_after_counts_the_whole_cost(client: Client) -> None:
    bucket = TokenBucket(client, "test")
    assert (await bucket.take("k", rate=1, burst=4, cost=4)).allowed
    refused = await bucket.take("k", rate=1, burst=4, cost=3)
    assert not refused.allowed and 2.5 < refused.retry_after <= 3.0


@pytest.mark.topology
async def test_a_bucket_refills_over_time(client: Client) -> None:
    bucket = TokenBucket(client, "test")
    assert (await bucket.take("k", rate=20, burst=1)).allowed
    start = time.monotonic()
    refused = await bucket.take("k", rate=20, burst=1)
    assert not refused.allowed and 0 < refused.retry_after <= 0.05
    for _ in range(50):  # bounded: each wait is what the bucket says it needs
        decision = await bucket.take("k", rate=20, burst=1)
        if decision.allowed:
            break
        await asyncio.sleep(decision.retry_after)
    else:
        pytest.fail(f"no token 50 waits after a refusal (last: {decision})")
    assert time.monotonic() - start >= refused.retry_after - 0.005  # on the engine's clock


@pytest.mark.topology
async def test_two_clients_share_one_bucket(client: Client, settings: Settings) -> None:
    async with Client(settings=settings) as other:
        mine, theirs = TokenBucket(client, "test"), TokenBucket(other, "test")
        assert (await mine.take("shared", rate=0.1, burst=2)).allowed
        assert (await theirs.take("shared", rate=0.1, burst=2)).allowed
        assert not (await mine.take("shared", rate=0.1, burst=2)).allowed
        assert not (await theirs.take("shared", rate=0.1, burst=2)).allowed


@pytest.mark.topology
async def test_concurrent_takes_never_spend_a_token_twice(
    client: Client, settings: Settings
) -> None:
    async with Client(settings=settings) as other:
        buckets = [TokenBucket(c, "test") for c in (client, other)]
        takes = [buckets[i % 2].take("busy", rate=0.01, burst=10) for i in range(60)]
        decisions = await asyncio.gather(*takes)
    assert sum(d.allowed for d in decisions) == 10


@pytest.mark.topology
async def test_keys_and_names_have_buckets_of_their_own(client: Client) -> None:
    first, second = TokenBucket(client, "first"), TokenBucket(client, "second")
    assert (await first.take("a", rate=0.1, burst=1)).allowed
    assert not (await first.take("a", rate=0.1, burst=1)).allowed
    assert (await first.take("b", rate=0.1, burst=1)).allowed
    assert (await second.take("a", rate=0.1, burst=1)).allowed


@pytest.mark.topology
async def test_a_bucket_expires_once_it_would_be_full_again(client: Client) -> None:
    bucket = TokenBucket(client, "test")
    key = client.keys.ratelimit("test", "idle")
    await bucket.take("idle", rate=1, burst=5, cost=1)
    assert 0 < await client.redis.pttl(key) <= 1000  # one token short of full, at 1/s
    await bucket.take("idle", rate=1, burst=5, cost=4)
    assert 4000 < await client.redis.pttl(key) <= 5000  # five tokens short

    await bucket.take("gone", rate=100, burst=1)
    gone = client.keys.ratelimit("test", "gone")
    await eventually(lambda: _missing(client, gone), "the idle bucket's key expired", 2)
    assert (await bucket.take("gone", rate=100, burst=1)).remaining == 0  # full again


async def _missing(client: Client, key: str) -> bool:
    return not await client.redis.exists(key)


@pytest.mark.topology
async def test_a_smaller_burst_applies_at_once(client: Client) -> None:
    bucket = TokenBucket(client, "test")
    assert (await bucket.take("k", rate=0.01, burst=10)).remaining > 8.9
    lowered = await bucket.take("k", rate=0.01, burst=2)
    assert lowered.allowed and 0.9 < lowered.remaining < 1.1
    assert 0 < await client.redis.pttl(client.keys.ratelimit("test", "k")) <= 100_000


@pytest.mark.topology
async def test_a_refused_take_writes_nothing(client: Client) -> None:
    bucket = TokenBucket(client, "test")
    key = client.keys.ratelimit("test", "k")
    await bucket.take("k", rate=0.01, burst=1)
    before = await client.redis.hgetall(key)
    assert not (await bucket.take("k", rate=0.01, burst=1)).allowed
    assert await client.redis.hgetall(key) == before


@pytest.mark.topology
async def test_a_bucket_lives_under_the_namespace_hash_tag(client: Client) -> None:
    assert client.keys.ratelimit("apikey", "x").startswith(f"shoal:{{{client.keys.namespace}}}:")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1, "burst": 2, "cost": 3}, "more than the bucket holds"),
        ({"rate": 0, "burst": 2}, "rate must be"),
        ({"rate": float("nan"), "burst": 2}, "rate must be"),
        ({"rate": 1, "burst": 0}, "burst must be"),
        ({"rate": 1, "burst": 1.5}, "burst must be"),
        ({"rate": float("inf"), "burst": 2}, r"within 0\.001\.\.1000000"),
        ({"rate": 0.0001, "burst": 2}, r"within 0\.001\.\.1000000"),
        ({"rate": 1, "burst": 2**64}, r"within 1\.\.1000000"),
        ({"rate": 1, "burst": 2, "cost": 0}, "cost must be"),
    ],
)
async def test_bad_arguments_are_refused_before_the_engine_is_asked(
    client: Client, kwargs: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await TokenBucket(client, "test").take("k", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["has space", "line\n", "", "x" * 65, "-dash"])
def test_a_bucket_name_must_be_a_safe_key_part(settings: Settings, name: str) -> None:
    with pytest.raises(ConfigurationError, match="rate-limit name"):
        TokenBucket(Client(settings=settings), name)
