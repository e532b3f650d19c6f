"""The provider pool against real model servers registered as service instances:
affinity, failover between replicas and to a fallback provider, breakers, streams
retried only before their first token, and quotas held across processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shoal import Client, Settings
from shoal.errors import ConfigurationError
from shoal.llm import (
    LLMBadRequest,
    LLMStreamBroken,
    Provider,
    ProviderPool,
    ProvidersFailed,
    QuotaExceeded,
)
from shoal.llm.model import ChatModel
from shoal.llm.quota import DEFAULT_COMPLETION_TOKENS, Quota
from shoal.llm.types import Usage
from shoal.observability import metrics
from shoal.resilience import BreakerPolicy, RetryPolicy
from shoal.testing.llm_server import LLMServer
from tests.conftest import eventually, node_process

HELLO = [{"role": "user", "content": "hello there"}]
FAST = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05)
KEYS = [f"conversation-{i}" for i in range(12)]


@pytest.fixture
def servers() -> Iterator[list[LLMServer]]:
    started = [LLMServer().start() for _ in range(3)]
    yield started
    for server in started:
        server.stop()


async def register(client: Client, service: str, servers: list[LLMServer]) -> dict[str, LLMServer]:
    by_id = {f"r{i}": server for i, server in enumerate(servers)}
    for instance, server in by_id.items():
        await client.registry.register(service, server.url, id=instance)
    return by_id


def requests(by_id: dict[str, LLMServer]) -> dict[str, int]:
    return {instance: server.stats.requests for instance, server in by_id.items()}


async def test_calls_of_one_conversation_stay_on_one_replica_and_keys_spread(
    client: Client, servers: list[LLMServer]
) -> None:
    by_id = await register(client, "llm", servers)
    async with ProviderPool(client, [Provider("local", model="m", service="llm")]) as pool:
        homes = {}
        for key in KEYS:
            before = requests(by_id)
            answers = [await pool.complete(HELLO, key=key) for _ in range(4)]
            assert {a.instance for a in answers} == {answers[0].instance}
            assert {a.provider for a in answers} == {"local"}
            after = requests(by_id)
            grew = {i: after[i] - before[i] for i in by_id if after[i] != before[i]}
            assert grew == {answers[0].instance: 4}  # the servers agree: one replica
            homes[key] = answers[0].instance
            streamed = [d async for d in pool.stream(HELLO, key=key)]
            assert streamed[-1].completion is not None
            assert streamed[-1].completion.instance == homes[key]
    assert len(set(homes.values())) >= 2  # twelve conversations spread over the replicas


async def test_a_failing_replica_is_retried_around_and_its_breaker_opens(
    client: Client, servers: list[LLMServer]
) -> None:
    by_id = await register(client, "llm", servers)
    provider = Provider(
        "local", model="m", service="llm", breaker=BreakerPolicy(consecutive_failures=2)
    )
    async with ProviderPool(client, [provider], retry=FAST) as pool:
        home = (await pool.complete(HELLO, key="alice")).instance
        by_id[home].settings.fail_next = 1000  # 500s from now on
        for _ in range(4):
            answer = await pool.complete(HELLO, key="alice")
            assert answer.instance != home and answer.content == "You said: hello there"
        view = client.services("llm").view
        await eventually(
            lambda: asyncio.sleep(0, view.by_id[home].breaker == "open"), "the breaker opened"
        )
        failed = by_id[home].stats.failures
        assert 2 <= failed <= 4  # two open it (outcomes reach the engine in the background)
        for _ in range(3):
            assert (await pool.complete(HELLO, key="alice")).instance != home
        assert by_id[home].stats.failures == failed  # the open breaker keeps calls away


async def test_a_429_goes_elsewhere_at_once_or_back_after_its_retry_after(
    client: Client, servers: list[LLMServer]
) -> None:
    by_id = await register(client, "llm", servers[:2])
    provider = Provider(
        "local", model="m", service="llm", breaker=BreakerPolicy(consecutive_failures=1)
    )
    async with ProviderPool(client, [provider], retry=FAST) as pool:
        assert isinstance(pool, ChatModel)
        home = (await pool.complete(HELLO, key="erin")).instance
        by_id[home].settings.fail_next, by_id[home].settings.fail_status = 1, 429
        by_id[home].settings.retry_after = 0.5
        started = time.monotonic()
        answer = await pool.complete(HELLO, key="erin")
        assert answer.instance != home and time.monotonic() - started < 0.5  # at once

        await client.registry.deregister("llm", answer.instance)  # one replica left
        await eventually(lambda: asyncio.sleep(0, len(client.services("llm").candidates()) == 1))
        by_id[home].settings.fail_next = 1
        started = time.monotonic()
        assert (await pool.complete(HELLO, key="erin")).instance == home
        assert time.monotonic() - started >= 0.5  # waited as the server said
        assert client.services("llm").view.by_id[home].breaker == "closed"  # busy, not broken


async def test_a_stream_abandoned_by_its_reader_is_no_failure(
    client: Client, servers: list[LLMServer]
) -> None:
    await register(client, "llm", servers[:1])
    provider = Provider(
        "local", model="m", service="llm", breaker=BreakerPolicy(consecutive_failures=1)
    )
    cancelled = metrics.SERVICE_CALLS.labels("llm", "r0", "cancelled")
    counted = cancelled._value.get()
    async with ProviderPool(client, [provider]) as pool:
        for _ in range(3):
            stream = pool.stream(HELLO, key="frank")
            first = await anext(stream)  # type: ignore[call-overload]
            assert first.content == "You "
            await stream.aclose()  # type: ignore[attr-defined]
        assert cancelled._value.get() == counted + 3
        assert (await pool.complete(HELLO, key="frank")).instance == "r0"


async def test_a_provider_that_cannot_answer_falls_back_to_the_next(
    client: Client, servers: list[LLMServer]
) -> None:
    local, hosted = servers[0], servers[1]
    await register(client, "vllm", [local])
    local.settings.fail_next = 1000
    chain = [
        Provider("local", model="small", service="vllm"),
        Provider("hosted", model="big", base_url=hosted.url, api_key="sk-hosted"),
    ]
    answered = metrics.LLM_ANSWERS.labels("hosted", "model")
    server_errors = metrics.LLM_REQUESTS.labels("local", "server_error")
    counts = answered._value.get(), server_errors._value.get()
    async with ProviderPool(client, chain, retry=FAST) as pool:
        answer = await pool.complete(HELLO, key="bob")
        assert (answered._value.get(), server_errors._value.get()) == (counts[0] + 1, counts[1] + 3)
        assert (answer.provider, answer.instance) == ("hosted", f"127.0.0.1:{hosted.port}")
        assert answer.model == "big" and local.stats.failures == 3  # three tries, then over
        deltas = [d async for d in pool.stream(HELLO, key="bob")]
        assert deltas[-1].completion is not None
        assert deltas[-1].completion.provider == "hosted"

        hosted.settings.fail_next = 1000  # both down: one error names each failure
        with pytest.raises(ProvidersFailed) as caught:
            await pool.complete(HELLO, key="bob")
    assert [name for name, _ in caught.value.failures] == ["local", "hosted"]
    assert "local: " in str(caught.value) and "hosted: " in str(caught.value)
    assert "500" in str(caught.value) and "sk-hosted" not in str(caught.value)


async def test_a_provider_without_replicas_falls_back(
    client: Client, servers: list[LLMServer]
) -> None:
    chain = [
        Provider("local", model="m", service="nothing-registered"),
        Provider("hosted", model="m", base_url=servers[0].url),
    ]
    async with ProviderPool(client, chain) as pool:
        assert (await pool.complete(HELLO)).provider == "hosted"


async def test_a_stream_is_retried_before_its_first_token_never_after(
    client: Client, servers: list[LLMServer]
) -> None:
    by_id = await register(client, "llm", servers)
    async with ProviderPool(
        client, [Provider("local", model="m", service="llm")], retry=FAST
    ) as pool:
        home = (await pool.complete(HELLO, key="carol")).instance
        by_id[home].settings.die_after_chunks = 1  # the role chunk, then cut: no token
        text = [d.content async for d in pool.stream(HELLO, key="carol")]
        assert "".join(text) == "You said: hello there"
        for server in servers:
            server.settings.die_after_chunks = 3  # cut after two tokens
        before = sum(requests(by_id).values())
        seen: list[str] = []

        async def read() -> None:
            async for delta in pool.stream(HELLO, key="carol"):
                seen.append(delta.content)

        with pytest.raises(LLMStreamBroken) as caught:
            await read()
        assert "".join(seen) == "You said: " == caught.value.partial.content
        assert sum(requests(by_id).values()) == before + 1  # not retried after text


async def test_a_rejected_request_is_not_retried_nor_held_against_the_replica(
    client: Client, servers: list[LLMServer]
) -> None:
    by_id = await register(client, "llm", servers[:1])
    chain = [
        Provider("local", model="m", service="llm", breaker=BreakerPolicy(consecutive_failures=1)),
        Provider("hosted", model="m", base_url=servers[1].url),
    ]
    caller_errors = metrics.SERVICE_CALLS.labels("llm", "r0", "caller_error")
    counted = caller_errors._value.get()
    async with ProviderPool(client, chain, retry=FAST) as pool:
        servers[0].settings.fail_next, servers[0].settings.fail_status = 1, 400
        with pytest.raises(LLMBadRequest, match="400"):
            await pool.complete(HELLO, key="dave")
        assert servers[0].stats.requests == 1 and servers[1].stats.requests == 0
        assert caller_errors._value.get() == counted + 1
        assert (await pool.complete(HELLO, key="dave")).provider == "local"  # still closed

        servers[0].settings.fail_next, servers[0].settings.fail_status = 3, 500
        assert (await pool.complete(HELLO, key="dave")).provider == "hosted"
        view = client.services("llm").view
        await eventually(  # a 500 does count: one opens this breaker
            lambda: asyncio.sleep(0, view.by_id["r0"].breaker == "open"), "the breaker opened"
        )
    assert by_id["r0"] is servers[0]


async def test_a_quota_without_room_waits_then_fails_or_falls_back(
    client: Client, servers: list[LLMServer]
) -> None:
    url = servers[0].url
    # 2 a minute: two calls now, the third only when the first leaves the window
    tight = Provider("tight", model="m", base_url=url, rpm=2, quota_wait=0.3)
    async with ProviderPool(client, [tight]) as pool:
        await pool.complete(HELLO)
        await pool.complete(HELLO)
        started = time.monotonic()
        with pytest.raises(QuotaExceeded, match=r"'tight'.*requests-per-minute") as caught:
            await pool.complete(HELLO)
        assert time.monotonic() - started < 0.3  # known at once: it would not fit in time
        assert caught.value.kind == "requests" and caught.value.wait is not None
        assert 58 < caught.value.wait <= 63  # the minute and its 3 s margin
    assert servers[0].stats.requests == 2

    # 3 a second: the next calls wait for the first ones to leave the window
    brisk = Provider(
        "brisk", model="m", base_url=url, rpm=3, quota_period=1.0, quota_margin=0, quota_wait=2
    )
    async with ProviderPool(client, [brisk]) as pool:
        started = time.monotonic()
        for _ in range(5):
            await pool.complete(HELLO)
        assert time.monotonic() - started >= 0.95  # the fourth waited a window

    exceeded = metrics.LLM_QUOTA_EXCEEDED.labels("tight", "requests")
    before = exceeded._value.get()
    spare = Provider("spare", model="m", base_url=servers[1].url)
    async with ProviderPool(client, [tight, spare]) as pool:
        assert (await pool.complete(HELLO)).provider == "spare"
    assert exceeded._value.get() == before + 1


async def test_a_request_bigger_than_the_quota_admits_at_once_fails_at_once(
    client: Client, servers: list[LLMServer]
) -> None:
    provider = Provider("small", model="m", base_url=servers[0].url, tpm=1000, quota_wait=30)
    async with ProviderPool(client, [provider]) as pool:
        with pytest.raises(
            QuotaExceeded, match=r"needs about 1003 tokens.*quota \(1000\)"
        ) as caught:
            await pool.complete(HELLO, max_tokens=1000)
        assert caught.value.kind == "tokens" and caught.value.wait is None
        assert (await pool.complete(HELLO, max_tokens=50)).usage is not None
    assert servers[0].stats.requests == 1


async def test_a_provider_sends_its_own_key_and_never_the_environments(
    client: Client, servers: list[LLMServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_LLM_API_KEY", "sk-environment")
    monkeypatch.setenv("HOSTED_KEY", "sk-environment")
    servers[0].settings.api_key = "sk-environment"
    keyless = Provider("local", model="m", base_url=servers[0].url)
    async with ProviderPool(client, [keyless]) as pool:
        with pytest.raises(ProvidersFailed, match="401") as caught:
            await pool.complete(HELLO)
        assert "sk-environment" not in str(caught.value)
    keyed = Provider("hosted", model="m", base_url=servers[0].url, api_key_env="HOSTED_KEY")
    async with ProviderPool(client, [keyed]) as pool:
        assert (await pool.complete(HELLO)).provider == "hosted"


def test_providers_are_validated_with_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "either service= .* or base_url="),
        ({"service": "a", "base_url": "http://x/v1"}, "either service="),
        ({"base_url": "ftp://x"}, "http"),
        ({"service": "a", "api_key_env": "NO_SUCH_KEY"}, "NO_SUCH_KEY.*not set"),
        ({"service": "a", "rpm": 0}, "rpm must be a whole number"),
        ({"service": "a", "tpm": 1.5}, "tpm must be"),
        ({"service": "a", "strategy": "fastest"}, "strategy must be one of"),
        ({"service": "a", "refund": "yes"}, "refund must be True or False"),
    ]
    for options, message in cases:
        with pytest.raises(ConfigurationError, match=message):
            Provider("p", model="m", **options)
    with pytest.raises(ConfigurationError, match="model="):
        Provider("p", model="", service="a")
    with pytest.raises(ConfigurationError, match="provider name"):
        Provider("no spaces", model="m", service="a")
    secret = Provider("p", model="m", base_url="http://127.0.0.1:1/v1", api_key="sk-secret")
    assert "sk-secret" not in repr(secret)


# --- the quota across the cluster ----------------------------------------------------

PERIOD = 2.0  # a scaled "minute": the quota per 2 s
# The server sees a call some time after the engine admitted it, a time that varies
# (a worker's first call opens its connection): measured on the server's clock, a
# window a little shorter than the engine's absorbs that variation (documented).
SKEW = 0.1
DRIVE_S = 5.0


def busiest_window(
    events: list[tuple[float, float]], start: float, period: float = PERIOD
) -> float:
    """The most counted in any ``period``-long window from ``start`` (events: (time, n))."""
    events = sorted(e for e in events if e[0] >= start)
    best, j, total = 0.0, 0, 0.0
    for t, n in events:
        total += n
        while events[j][0] <= t - period:
            total -= events[j][1]
            j += 1
        best = max(best, total)
    return best


async def drive(client: Client, server: LLMServer, provider: str, **task: Any) -> float:
    """Both nodes drive the provider from one instant; when they started."""
    start = time.time() + 1.0
    task.update(url=server.url, provider=provider, start=start, seconds=DRIVE_S)
    handles = [await client.submit("llm_quota_drive", **task) for _ in range(2)]
    results = [await h.result(timeout=DRIVE_S + 20) for h in handles]
    assert len({r["node"] for r in results}) == 2  # one task on each node
    return start


async def test_two_nodes_together_hold_a_quota_within_five_percent(
    client: Client, settings: Settings
) -> None:
    with (
        node_process(settings, "tests.llm_quota_agents", "--concurrency", "1"),
        node_process(settings, "tests.llm_quota_agents", "--concurrency", "1"),
    ):
        await client.wait_for_hosts("llm_quota_drive", count=2, timeout=20)
        with LLMServer() as server:  # 60 requests per 2 s
            limits = {"rpm": 60, "quota_period": PERIOD}
            start = await drive(client, server, "rpm", limits=limits)
            calls = [(t, 1.0) for t in server.stats.request_times]
        busiest = busiest_window(calls, start, PERIOD - SKEW)
        assert 0.9 * 60 <= busiest <= 60 * 1.05, (busiest, busiest_window(calls, start))

        # 300 tokens per 2 s; a call uses 6, estimated 6 (3 + max_tokens)
        with LLMServer() as server:
            limits = {"tpm": 300, "quota_period": PERIOD}
            start = await drive(client, server, "tpm", limits=limits, max_tokens=3)
            tokens = [(t, n) for t, n in server.stats.token_log]
        busiest = busiest_window(tokens, start, PERIOD - SKEW)
        assert 0.9 * 300 <= busiest <= 300 * 1.05, (busiest, busiest_window(tokens, start))


# --- exactness: under- and over-estimates, usage, the window script ---------------


async def test_a_request_without_max_tokens_is_capped_so_it_cannot_outgrow_its_estimate(
    client: Client,
) -> None:
    # 6000 per 2 s; the model would answer 2,900 words, the request sets no max_tokens
    with LLMServer(script=[" ".join(["word"] * 2900)]) as server:
        long = Provider(
            "long", model="m", base_url=server.url, tpm=6000, quota_period=PERIOD, quota_wait=5
        )
        async with ProviderPool(client, [long]) as pool:
            start = time.time()
            end = start + 3.0  # two windows
            answers = []

            async def worker() -> None:
                while time.time() < end:
                    try:
                        answers.append(await pool.complete(HELLO))
                    except QuotaExceeded:
                        return

            await asyncio.gather(*(worker() for _ in range(16)))
        assert server.stats.last_request is not None
        assert server.stats.last_request["max_tokens"] == DEFAULT_COMPLETION_TOKENS
        log = [(t, float(n)) for t, n in server.stats.token_log]
    assert answers and all(a.finish_reason == "length" for a in answers)
    assert busiest_window(log, start) <= 6000  # used == estimated: the window is exact


async def test_prompts_denser_than_estimated_pass_the_quota_only_by_the_in_flight_ones(
    client: Client,
) -> None:
    # one-letter words: ~2 characters a token where 4 were estimated: each call uses
    # 1,000 more prompt tokens than it was admitted for
    dense = [{"role": "user", "content": " ".join(["a"] * 2000)}]
    with LLMServer() as server:
        provider = Provider(
            "dense", model="m", base_url=server.url, tpm=6000, quota_period=PERIOD,
            quota_margin=0, quota_wait=5,
        )  # fmt: skip
        async with ProviderPool(client, [provider]) as pool:
            start = time.time()
            end = start + 3.0

            async def worker() -> None:
                while time.time() < end:
                    try:
                        await pool.complete(dense, max_tokens=8)
                    except QuotaExceeded:
                        return

            await asyncio.gather(*(worker() for _ in range(8)))
        log = [(t, float(n)) for t, n in server.stats.token_log]
        calls = [(t, 1.0) for t in server.stats.request_times]
    estimate = 1000 + 8
    in_window = busiest_window(calls, start, PERIOD - SKEW)
    assert in_window <= 6000 // estimate  # admitted by their estimates
    # the excess: at most the under-estimates of the calls admitted together
    used = max(n for _, n in log)
    assert used > estimate  # the premise: each call used more than admitted for
    assert busiest_window(log, start, PERIOD - SKEW) <= 6000 + in_window * (used - estimate)


async def test_unused_tokens_are_freed_in_their_own_window_so_none_passes_the_quota(
    client: Client,
) -> None:
    answer = " ".join(["w"] * 20)  # 20 tokens
    with LLMServer(first_token_delay=2.2) as slow, LLMServer(script=[answer]) as fast:
        slow_p = Provider(
            "shared", model="m", base_url=slow.url, tpm=1000, quota_period=PERIOD, quota_wait=5
        )
        fast_p = Provider(
            "shared", model="m", base_url=fast.url, tpm=1000, quota_period=PERIOD, quota_wait=5
        )
        async with ProviderPool(client, [slow_p]) as sp, ProviderPool(client, [fast_p]) as fp:
            t0 = time.time()
            # five long calls (estimated 3 + 97 each, use ~7) outlive their window:
            # their usage, known after it, must not free room in a later one
            slow_calls = [asyncio.create_task(sp.complete(HELLO, max_tokens=97)) for _ in range(5)]
            await eventually(lambda: asyncio.sleep(0, slow.stats.requests == 5), "slow calls")
            end = t0 + 2.0 + PERIOD

            async def worker() -> None:
                await asyncio.sleep(max(0.0, t0 + 2.0 - time.time()))  # a new window
                while time.time() < end:
                    try:
                        await fp.complete(HELLO, max_tokens=20)  # estimated 23, uses 22
                    except QuotaExceeded:
                        return

            await asyncio.gather(*(worker() for _ in range(8)), *slow_calls)
        log = [(t, n) for t, n in slow.stats.token_log + fast.stats.token_log]
    # 1,504 when refunds came at once
    assert busiest_window(log, t0, PERIOD - SKEW) <= 1000 * 1.05, log
    # the fast calls' unused token each came back in its own window: more than
    # 1000 / 23 calls fit in one
    fast_calls = [(t, 1.0) for t in fast.stats.request_times]
    assert busiest_window(fast_calls, t0 + 2.0) > 1000 // 23


async def total(client: Client, provider: str, kind: str = "tokens") -> float:
    """What a provider's window counts now (0 once its keys expired)."""
    stored = await client.redis.get(client.keys.llm_quota(provider, kind)[2])
    return float(stored or 0)


async def test_usage_counts_prompt_and_completion_when_the_total_says_less(
    client: Client,
) -> None:
    quota = Quota(client, "under", rpm=None, tpm=1000, period=PERIOD)
    admission = await quota.admit(100)
    # a server that fills prompt and completion but reports a short total
    await quota.settle(admission, Usage(prompt_tokens=150, completion_tokens=150), failed=False)
    assert await total(client, "under") == 300  # 300 counted, not 100 (nor 0)
    await quota.settle(await quota.admit(50), None, failed=True)  # failed: nothing used
    assert await total(client, "under") == 300


@pytest.mark.topology
async def test_the_window_admits_settles_trims_and_says_how_long_to_wait(
    client: Client,
) -> None:
    quota = Quota(client, "unit", rpm=None, tpm=100, period=1.0, margin=0, wait=0)
    first = await quota.admit(60)
    await asyncio.sleep(0.3)  # spaces the entries (0, 0.3, 0.6 s): the waits tell them apart
    second = await quota.admit(40)
    with pytest.raises(QuotaExceeded, match=r"'unit'.*no room for") as caught:
        await quota.admit(1)
    assert caught.value.wait is not None and 0.5 < caught.value.wait <= 0.71  # `first` leaves
    # a call that used less frees the rest in its own window
    await quota.settle(first, Usage(total_tokens=20), failed=False)
    assert await total(client, "unit") == 60
    await asyncio.sleep(0.3)
    third = await quota.admit(40)
    # one that used more makes the window over-full: 51 must leave, so `second` too
    await quota.settle(second, Usage(total_tokens=90), failed=False)
    assert await total(client, "unit") == 150
    with pytest.raises(QuotaExceeded) as caught:
        await quota.admit(1)
    assert caught.value.wait is not None and 0.5 < caught.value.wait <= 0.71
    patient = Quota(client, "unit", rpm=None, tpm=100, period=1.0, margin=0, wait=2)
    started = time.monotonic()
    await patient.admit(1)  # waits for `first` and `second` to leave, then fits
    assert 0.5 < time.monotonic() - started < 1.0
    assert await total(client, "unit") == 41  # `third` and the new one
    # an entry that left the window is not changed any more
    await quota.settle(first, Usage(total_tokens=5), failed=False)
    assert await total(client, "unit") == 41
    await quota.settle(third, Usage(total_tokens=10), failed=False)
    assert await total(client, "unit") == 11
    # bigger than the quota: at once, whatever the wait
    with pytest.raises(QuotaExceeded, match=r"needs about 101 tokens.*quota \(100\)") as big:
        await patient.admit(101)
    assert big.value.wait is None
    # every key expires one window after the last write
    keys = client.keys.llm_quota("unit", "tokens")
    for key in keys:
        assert 0 < await client.redis.pttl(key) <= 1000
    await eventually(lambda: _all_gone(client, keys), "the keys expired", 3)


async def _all_gone(client: Client, keys: tuple[str, ...]) -> bool:
    return await client.redis.exists(*keys) == 0


@pytest.mark.topology
async def test_requests_and_tokens_count_together_and_refund_false_never_lowers(
    client: Client,
) -> None:
    quota = Quota(client, "both", rpm=2, tpm=100, period=PERIOD, wait=0)
    await quota.admit(90)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.admit(20)
    assert caught.value.kind == "tokens"
    assert await total(client, "both", "requests") == 1  # the refused one is not counted
    await quota.admit(10)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.admit(0)
    assert caught.value.kind == "requests"
    assert await total(client, "both") == 100

    upfront = Quota(client, "upfront", rpm=None, tpm=1000, period=PERIOD, refund=False)
    admission = await upfront.admit(50)
    await upfront.settle(admission, Usage(total_tokens=10), failed=False)
    await upfront.settle(admission, None, failed=True)
    assert await total(client, "upfront") == 50  # counted up front, never given back
    await upfront.settle(admission, Usage(total_tokens=80), failed=False)
    assert await total(client, "upfront") == 80  # an excess still counts


def test_quotas_are_checked_when_the_provider_is_built() -> None:
    Provider("p", model="m", service="a", rpm=2, quota_period=3600)  # any period works
    Provider("p", model="m", service="a", tpm=50_000_000, quota_period=1)
    with pytest.raises(ConfigurationError, match=r"tpm must be a whole number.*2\.\.1000000000"):
        Provider("p", model="m", service="a", tpm=2_000_000_000)
    hidden = Provider("p", model="m", base_url="http://user:hunter2@127.0.0.1:1/v1")
    assert "hunter2" not in repr(hidden) and "user" not in repr(hidden)
    assert "hunter2" not in str(hidden.identity)


async def test_a_replica_that_times_out_is_retried_on_another(client: Client) -> None:
    with LLMServer(first_token_delay=2.0) as slow, LLMServer() as fast:
        await client.registry.register("tllm", slow.url, id="slow")
        await client.registry.register("tllm", fast.url, id="fast")
        p = Provider("local", model="m", service="tllm", read_timeout=0.3, breaker=None)
        async with ProviderPool(client, [p], retry=FAST) as pool:
            for i in range(8):  # some keys hash to the slow replica first
                answer = await pool.complete(HELLO, key=f"conv-{i}")
                assert answer.instance == "fast"
        assert slow.stats.requests > 0


async def test_an_entry_counts_for_the_period_and_the_margin(client: Client) -> None:
    """The margin absorbs the varying delay from admission to the provider: a
    request counts that much longer than the period."""
    quota = Quota(client, "margin", rpm=1, tpm=None, period=1.0, margin=0.5, wait=0)
    await quota.admit(1)
    with pytest.raises(QuotaExceeded) as caught:
        await quota.admit(1)
    assert caught.value.wait is not None and 1.3 < caught.value.wait <= 1.5
    default = Quota(client, "default-margin", rpm=1, tpm=None, period=60.0, wait=0)
    assert default.margin == 3.0  # 5 % of a minute
