"""The service call site against real HTTP replicas (shoal.testing.replica) and a
real engine: balancing over the watched view, shared breakers, retries with
Retry-After, timeouts, bulkheads, fallback chains, zones, shared load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from shoal import Client, Settings
from shoal.resilience import (
    NO_RETRY,
    BreakerPolicy,
    BulkheadFull,
    CircuitOpen,
    FallbackFailed,
    NoInstance,
    RetryPolicy,
    ServiceCallFailed,
)
from shoal.services import Endpoint, ServicePool
from shoal.testing.replica import ReplicaProcess, replicas
from tests.conftest import eventually

DEFAULTS = {
    "latency": 0.0, "jitter": 0.0, "fail_next": 0, "fail_rate": 0.0, "fail_status": 500,
    "retry_after": None, "health_status": 200, "hang": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def trio() -> Iterator[list[ReplicaProcess]]:
    """Three replicas for the module; each test starts them from the defaults."""
    with replicas(3, names=["a", "b", "c"]) as started:
        yield started


@pytest.fixture
def three(trio: list[ReplicaProcess]) -> list[ReplicaProcess]:
    for replica in trio:
        replica.control(**DEFAULTS, reset_stats=True)
    return trio


async def register(client: Client, service: str, reps: list[ReplicaProcess], **kw: object) -> None:
    for replica in reps:
        await client.registry.register(service, replica.url, id=replica.name, **kw)  # type: ignore[arg-type]


def served(reps: list[ReplicaProcess]) -> dict[str, int]:
    return {r.name: r.stats()["requests"] for r in reps}


async def test_round_robin_spreads_requests_exactly(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "echo", three)
    pool = client.services("echo", strategy="round_robin")
    answered: Counter[str] = Counter()
    for i in range(30):
        response = await pool.request("POST", "/v1/echo", json={"i": i})
        assert response.status_code == 200
        body = response.json()
        assert body["path"] == "/v1/echo" and body["body"] == {"i": i}
        answered[body["replica"]] += 1
    assert answered == {"a": 10, "b": 10, "c": 10}
    assert served(three) == {"a": 10, "b": 10, "c": 10}


async def test_least_outstanding_prefers_the_fast_replica(
    client: Client, three: list[ReplicaProcess]
) -> None:
    """Uneven latency: a replica 20x slower keeps calls in flight longer, so it is
    picked far less under concurrency."""
    three[0].control(latency=0.2)
    for fast in three[1:]:
        fast.control(latency=0.01)
    await register(client, "llm", three)
    pool = client.services("llm", strategy="least_outstanding")

    async def worker() -> None:
        for _ in range(10):
            await pool.request("GET", "/gen")

    await asyncio.gather(*(worker() for _ in range(6)))
    counts = served(three)
    assert sum(counts.values()) == 60
    assert counts["a"] < counts["b"] / 3 and counts["a"] < counts["c"] / 3, counts


async def test_consistent_hash_keeps_a_conversation_on_one_replica(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "llm", three)
    pool = client.services("llm", strategy="consistent_hash")
    where = {}
    for conversation in ("alice", "bob", "carol", "dave", "erin"):
        replies = {
            (await pool.request("POST", "/chat", key=conversation)).json()["replica"]
            for _ in range(5)
        }
        assert len(replies) == 1, (conversation, replies)
        where[conversation] = replies.pop()
    assert len(set(where.values())) >= 2  # five keys do not all land on one replica


@pytest.mark.topology
async def test_breaker_opens_fails_fast_half_opens_and_closes(
    client: Client, three: list[ReplicaProcess]
) -> None:
    (replica,) = three[:1]
    await register(client, "flaky", [replica])
    policy = BreakerPolicy(consecutive_failures=3, recovery=0.5)
    pool = client.services("flaky", breaker=policy, retry=NO_RETRY)
    replica.control(fail_next=100)
    for _ in range(3):
        with pytest.raises(ServiceCallFailed, match="HTTP 500"):
            await pool.request("GET", "/x")
    view = pool.view
    await eventually(
        lambda: asyncio.sleep(0, view.by_id["a"].breaker == "open"), "the breaker opened"
    )
    before = replica.stats()["requests"]
    started = time.monotonic()
    with pytest.raises(CircuitOpen, match="circuit open") as caught:
        await pool.request("GET", "/x")
    assert time.monotonic() - started < 0.25  # failed fast (and, below, sent nothing)
    assert caught.value.instances == ["a"] and 0 < caught.value.retry_in <= 0.5
    assert replica.stats()["requests"] == before  # no network call

    # after the recovery time one trial goes through; it fails: open again
    await asyncio.sleep(0.5)  # the breaker's recovery time, under test
    with pytest.raises(ServiceCallFailed):
        await pool.request("GET", "/x")
    assert replica.stats()["requests"] == before + 1
    assert view.by_id["a"].breaker == "open"
    with pytest.raises(CircuitOpen):
        await pool.request("GET", "/x")

    # the replica recovers; the next trial succeeds and closes the breaker
    replica.control(fail_next=0)
    await asyncio.sleep(0.5)  # the recovery time again
    assert (await pool.request("GET", "/x")).status_code == 200
    assert view.by_id["a"].breaker == "closed"
    for _ in range(5):
        assert (await pool.request("GET", "/x")).status_code == 200


async def test_an_open_breaker_moves_calls_to_the_other_replicas(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "llm", three)
    three[0].control(fail_next=1000)
    pool = client.services(
        "llm", strategy="round_robin", breaker=BreakerPolicy(consecutive_failures=2, recovery=60)
    )
    for _ in range(30):  # every failure of 'a' is retried on another replica
        assert (await pool.request("GET", "/x")).status_code == 200
    assert three[0].stats()["requests"] == 2  # then its breaker opened
    assert pool.view.by_id["a"].breaker == "open"
    assert {r.id for r in pool.candidates()} == {"b", "c"}


CALLER = """
import asyncio, sys
from shoal import Client, Settings
from shoal.resilience import NO_RETRY, BreakerPolicy, ServiceCallFailed

async def main():
    url, namespace = sys.argv[1], sys.argv[2]
    async with Client(settings=Settings(url=url, namespace=namespace)) as client:
        pool = client.services("shared", retry=NO_RETRY,
                               breaker=BreakerPolicy(consecutive_failures=3, recovery=30))
        for _ in range(3):
            try:
                await pool.request("GET", "/x")
            except ServiceCallFailed:
                pass
        while pool.view.by_id["a"].breaker != "open":  # failures are recorded in the background
            if not await pool.view.changed(timeout=5):
                break
        print(pool.view.by_id["a"].breaker, flush=True)

asyncio.run(main())
"""


def run_caller(settings: Settings) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", CALLER, str(settings.url), settings.namespace]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


async def test_breaker_state_is_shared_between_processes(
    client: Client, settings: Settings, three: list[ReplicaProcess]
) -> None:
    """Another process opens the breaker; this one sees it within a second and
    fails fast without calling the replica."""
    replica = three[0]
    await register(client, "shared", [replica])
    pool = client.services(
        "shared", retry=NO_RETRY, breaker=BreakerPolicy(consecutive_failures=3, recovery=30)
    )
    await pool.start()
    assert pool.view.by_id["a"].breaker == "closed"
    replica.control(fail_next=3)
    done = await asyncio.to_thread(run_caller, settings)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "open"
    opened_at = time.monotonic()
    while pool.view.by_id["a"].breaker != "open":
        assert await pool.view.changed(timeout=1.0), "the open breaker was not seen"
    assert time.monotonic() - opened_at < 1.0
    requests = replica.stats()["requests"]
    with pytest.raises(CircuitOpen):
        await pool.request("GET", "/x")
    assert replica.stats()["requests"] == requests


async def test_retry_honours_retry_after(client: Client, three: list[ReplicaProcess]) -> None:
    replica = three[0]
    await register(client, "quota", [replica])
    replica.control(fail_next=1, fail_status=429, retry_after=1)
    pool = client.services("quota", retry=RetryPolicy(attempts=2, backoff=0.01))
    started = time.monotonic()
    response = await pool.request("POST", "/v1/chat")
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert 1.0 <= elapsed < 2.0, elapsed  # waited what the server said, not 10 ms
    assert replica.stats()["requests"] == 2
    assert pool.view.by_id["a"].breaker == "closed"  # a 429 is not a broken instance

    # told to come back later than max_retry_after: no retry, a clear failure
    replica.control(fail_next=1, retry_after=120)
    with pytest.raises(ServiceCallFailed, match="HTTP 429") as caught:
        await pool.request("POST", "/v1/chat")
    assert caught.value.response is not None and caught.value.response.status_code == 429


async def test_a_slow_attempt_times_out_and_is_retried_elsewhere(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "slow", three[:2])
    three[0].control(hang=True)
    pool = client.services("slow", strategy="round_robin", timeout=0.3)
    for _ in range(4):
        response = await pool.request("GET", "/x")
        assert response.json()["replica"] == "b"
    three[1].control(hang=True)
    started = time.monotonic()
    with pytest.raises(ServiceCallFailed, match=r"no answer within 0\.3s"):
        await pool.request("GET", "/x", retry=RetryPolicy(attempts=2, backoff=0))
    assert time.monotonic() - started < 1.5
    for replica in three[:2]:
        replica.control(hang=False)


async def test_bulkhead_rejects_instead_of_queueing(
    client: Client, three: list[ReplicaProcess]
) -> None:
    replica = three[0]
    await register(client, "narrow", [replica])
    pool = client.services("narrow", max_concurrent=2, max_wait=0.2, retry=NO_RETRY)
    replica.control(hang=True)
    held = [asyncio.create_task(pool.request("GET", "/x")) for _ in range(2)]
    await eventually(
        lambda: asyncio.sleep(0, replica.stats()["in_flight"] == 2), "two calls in flight", 5
    )
    await eventually(lambda: asyncio.sleep(0, pool.bulkhead.in_flight == 2), "the bulkhead is full")
    started = time.monotonic()
    with pytest.raises(BulkheadFull, match="2 calls already in flight") as caught:
        await pool.request("GET", "/x")
    assert 0.2 <= time.monotonic() - started < 1.0  # waited max_wait, not for ever
    assert caught.value.limit == 2
    replica.control(hang=False)
    for task in held:
        assert (await task).status_code == 200
    assert (await pool.request("GET", "/x")).status_code == 200  # places were given back


async def test_fallback_chain_answers_from_the_first_step_that_can(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "primary", [three[0]])
    await register(client, "secondary", [three[1]])
    for name in ("primary", "secondary"):
        client.services(name, retry=NO_RETRY)

    async def canned(method: str, path: str, **kwargs: object) -> str:
        return "canned answer"

    chain = client.services.fallback("primary", "secondary", canned, name="llm")
    answer = await chain("POST", "/v1/chat")
    assert answer.source == "primary" and answer.value.json()["replica"] == "a"
    assert answer.failures == []

    three[0].control(fail_next=1)
    answer = await chain("POST", "/v1/chat")
    assert answer.source == "secondary" and answer.value.json()["replica"] == "b"
    assert [name for name, _ in answer.failures] == ["primary"]

    three[0].control(fail_next=1)
    three[1].control(fail_next=1)
    answer = await chain("POST", "/v1/chat")
    assert (answer.source, answer.value) == ("canned", "canned answer")
    assert [name for name, _ in answer.failures] == ["primary", "secondary"]

    async def broken(method: str, path: str, **kwargs: object) -> str:
        raise RuntimeError("no canned answer either")

    three[0].control(fail_next=1)
    three[1].control(fail_next=1)
    with pytest.raises(FallbackFailed, match="no canned answer either"):
        await client.services.fallback("primary", "secondary", broken)("GET", "/x")


async def test_zone_preference_and_spill_over(client: Client, three: list[ReplicaProcess]) -> None:
    a, b, c = three
    await client.registry.register("llm", a.url, id="eu-1", zone="eu")
    await client.registry.register("llm", b.url, id="eu-2", zone="eu")
    await client.registry.register("llm", c.url, id="us-1", zone="us")
    pool = client.services("llm", strategy="round_robin", zone="eu", spill_at=2)
    for _ in range(10):
        await pool.request("GET", "/x")
    assert served(three) == {"a": 5, "b": 5, "c": 0}

    # overloaded: both eu replicas have spill_at calls in flight -> us takes calls
    a.control(hang=True)
    b.control(hang=True)
    held = [asyncio.create_task(pool.request("GET", "/x", timeout=10)) for _ in range(4)]
    await eventually(lambda: asyncio.sleep(0, pool.load.outstanding("eu-1") == 2), "eu-1 full")
    await eventually(lambda: asyncio.sleep(0, pool.load.outstanding("eu-2") == 2), "eu-2 full")
    assert (await pool.request("GET", "/x")).json()["replica"] == "c"
    a.control(hang=False)
    b.control(hang=False)
    await asyncio.gather(*held)

    # unhealthy: both eu replicas draining -> us serves
    await client.registry.set_status("llm", "eu-1", "draining")
    await client.registry.set_status("llm", "eu-2", "down")
    await eventually(lambda: asyncio.sleep(0, [r.id for r in pool.candidates()] == ["us-1"]),
                     "the view shows only us-1 usable")  # fmt: skip
    assert (await pool.request("GET", "/x")).json()["replica"] == "c"


async def test_no_instance_is_a_clear_error(client: Client) -> None:
    pool = client.services("nothing")
    with pytest.raises(NoInstance, match="'nothing' has no instance in rotation: none registered"):
        await pool.request("GET", "/x")
    await client.registry.register("nothing", "http://127.0.0.1:9", id="x", status="draining")
    await eventually(lambda: asyncio.sleep(0, "x" in pool.view.by_id), "x in the view")
    with pytest.raises(NoInstance, match=r"x \(draining\)"):
        await pool.request("GET", "/x")


async def test_a_dead_replica_is_retried_around_and_its_breaker_opens(
    client: Client,
) -> None:
    with replicas(2, names=["live", "doomed"]) as (live, doomed):
        await register(client, "llm", [live, doomed])
        pool = client.services(
            "llm", strategy="round_robin", breaker=BreakerPolicy(consecutive_failures=2)
        )
        doomed.kill()
        for _ in range(10):
            assert (await pool.request("GET", "/x")).json()["replica"] == "live"
        assert pool.view.by_id["doomed"].breaker == "open"


async def test_calls_in_flight_are_shared_between_processes(
    client: Client, settings: Settings, three: list[ReplicaProcess]
) -> None:
    """Another client (its own process id) holds calls on 'a'; this client's
    least-outstanding pool sees them and sends its calls elsewhere."""
    a, b, _ = three
    await register(client, "llm", [a, b])
    a.control(hang=True)
    async with Client(settings=settings) as other:
        busy = other.services("llm", strategy="round_robin")
        held = [asyncio.create_task(busy.request("GET", "/x", timeout=10)) for _ in range(4)]
        await eventually(lambda: asyncio.sleep(0, busy.load.outstanding("a") == 2), "2 on a")
        pool = client.services("llm", strategy="least_outstanding")
        await pool.start()
        await eventually(
            lambda: asyncio.sleep(0, pool.load.outstanding("a") == 2),
            "the other process's calls on 'a' are seen",
        )
        b_before = b.stats()["requests"]
        for _ in range(4):
            assert (await pool.request("GET", "/x")).json()["replica"] == "b"
        assert b.stats()["requests"] == b_before + 4
        a.control(hang=False)
        await asyncio.gather(*held)


async def test_pool_options_are_fixed_at_first_use(client: Client) -> None:
    first = client.services("llm", strategy="round_robin")
    assert client.services("llm") is first
    with pytest.raises(ValueError, match="exists with other options"):
        client.services("llm", strategy="random")
    with pytest.raises(ValueError, match="unknown balancing strategy"):
        ServicePool(client, "x", strategy="fastest")


async def test_passive_health_marks_an_erring_replica_degraded(
    client: Client, three: list[ReplicaProcess]
) -> None:
    """Half of a's calls fail: not enough to open its breaker (60 %), enough to
    mark it degraded (20 %) — then calls go to the healthy replica, and every
    process sees the degraded status."""
    a, b, _ = three
    await register(client, "llm", [a, b])
    policy = BreakerPolicy(
        consecutive_failures=100, failure_rate=0.6, min_calls=8, degraded_rate=0.2, window=1.0
    )
    pool = client.services("llm", strategy="round_robin", breaker=policy)
    a.control(fail_next=4)
    while a.stats()["requests"] < 8:  # a's first 4 calls fail (and are retried on b)
        assert (await pool.request("GET", "/x")).status_code == 200
    await eventually(
        lambda: asyncio.sleep(0, pool.view.by_id["a"].status == "degraded"), "a is degraded"
    )
    assert pool.view.by_id["a"].breaker == "closed"
    assert [s.id for s in await client.registry.instances("llm", status="degraded")] == ["a"]
    calls_of_a = a.stats()["requests"]
    for _ in range(10):
        assert (await pool.request("GET", "/x")).json()["replica"] == "b"
    assert a.stats()["requests"] == calls_of_a

    # no outcome for two windows: the verdict lapses, a is tried again
    started = time.monotonic()
    while pool.view.by_id["a"].status != "up":
        assert await pool.view.changed(timeout=3), "a's degraded verdict did not lapse"
    assert time.monotonic() - started < 2 * 1.0 + 1.0
    for _ in range(4):
        await pool.request("GET", "/x")
    assert a.stats()["requests"] == calls_of_a + 2


async def test_a_streak_of_failures_is_counted_in_order(
    client: Client, three: list[ReplicaProcess]
) -> None:
    """Failures mixed with successes inside one batch of outcomes are not a streak:
    only the failures after the batch's last success continue it."""
    a = three[0]
    await register(client, "llm", [a])
    policy = BreakerPolicy(consecutive_failures=3, failure_rate=1.0, min_calls=100)
    pool = client.services("llm", breaker=policy, retry=NO_RETRY)
    await pool.start()
    for ok in (False, True, False, True, False, True, False, False):
        pool._finished(Endpoint(pool.view.by_id["a"], trial=False), "ok" if ok else "failed", 0)
    await pool._flush_all()
    health = (await client.registry.instances("llm"))[0].health
    assert (health.c, health.f, health.k, health.b) == (8, 5, 2, "closed")
    pool._finished(Endpoint(pool.view.by_id["a"], trial=False), "failed", 0)
    await pool._flush_all()
    health = (await client.registry.instances("llm"))[0].health
    assert (health.k, health.b) == (3, "open")


async def test_a_request_the_caller_got_wrong_is_not_the_instances_failure(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "llm", three[:1])
    pool = client.services("llm", retry=NO_RETRY, breaker=BreakerPolicy(consecutive_failures=2))
    for _ in range(3):
        with pytest.raises(TypeError, match="not JSON serializable"):
            await pool.request("POST", "/x", json={"x": object()})
    await pool._flush_all()
    assert pool.view.by_id["a"].breaker == "closed"
    assert (await pool.request("GET", "/x")).status_code == 200
    with pytest.raises(ValueError, match="collection of instance ids"):
        async with pool.pick(exclude="a"):
            pass
    with pytest.raises(ValueError, match="timeout must be a number"):
        await pool.request("GET", "/x", timeout="5")  # type: ignore[arg-type]


async def test_retry_after_of_one_instance_does_not_delay_another(
    client: Client, three: list[ReplicaProcess]
) -> None:
    a, b, _ = three
    await register(client, "llm", [a, b])
    a.control(fail_next=1, fail_status=503, retry_after=3)
    pool = client.services("llm", strategy="round_robin")
    started = time.monotonic()
    response = await pool.request("GET", "/x")
    assert response.json()["replica"] == "b"
    assert time.monotonic() - started < 1.0  # b was tried at once, not after 3 s


async def test_cancelling_a_call_is_never_retried(
    client: Client, three: list[ReplicaProcess]
) -> None:
    """Even a retry_on that says yes to everything does not retry a cancellation:
    the caller's timeout holds."""
    await register(client, "llm", three[:1])
    three[0].control(latency=2)
    pool = client.services("llm", retry=RetryPolicy(attempts=5, retry_on=lambda exc: True))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await pool.request("GET", "/x")
    assert time.monotonic() - started < 1.0


async def outcome(client: Client, instance: str, oks: int, fails: int, **policy: float) -> None:
    """Record outcomes as a pool would (services.lua's outcome op)."""
    args = BreakerPolicy(**policy).outcome_args()  # type: ignore[arg-type]
    await client.scripts.services(
        [client.keys.service("llm")],
        [client.keys.prefix, "outcome", "llm", instance, oks, fails, *args, "0", fails],
    )


async def test_a_half_open_instance_with_its_trial_out_leaves_the_degraded_one(
    client: Client, three: list[ReplicaProcess]
) -> None:
    a, b, _ = three
    await register(client, "llm", [a, b])
    await outcome(client, "a", 0, 1, consecutive_failures=1)  # a: open
    await outcome(client, "b", 3, 1, consecutive_failures=100, failure_rate=1.0,
                  min_calls=1, degraded_rate=0.2)  # fmt: skip  # b: degraded, closed
    policy = BreakerPolicy(recovery=0.05)
    pool = client.services("llm", breaker=policy, timeout=30)
    await pool.start()
    await eventually(lambda: asyncio.sleep(0, pool.view.by_id["b"].status == "degraded"), "b")
    a.control(hang=True)
    await asyncio.sleep(0.05)  # a's recovery time: it is due for a trial
    trial = asyncio.create_task(pool.request("GET", "/x"))  # takes a's one trial
    await eventually(lambda: asyncio.sleep(0, pool.view.by_id["a"].health.t == 1), "trial out")
    assert (await pool.request("GET", "/x")).json()["replica"] == "b"
    a.control(hang=False)
    assert (await trial).json()["replica"] == "a"


async def test_a_retry_that_finds_every_breaker_open_reports_the_attempts(
    client: Client, three: list[ReplicaProcess]
) -> None:
    await register(client, "llm", three[:1])
    three[0].control(fail_next=10)
    pool = client.services(
        "llm", breaker=BreakerPolicy(consecutive_failures=1, recovery=60),
        retry=RetryPolicy(attempts=3, backoff=0.01),
    )  # fmt: skip
    with pytest.raises(ServiceCallFailed, match="circuit open") as caught:
        await pool.request("GET", "/x")
    *made, last = caught.value.attempts  # the breaker opens as the first outcome lands
    assert made and all(attempt == ("a", "HTTP 500") for attempt in made), made
    assert last[0] == "(retry)"
    assert caught.value.response is not None and caught.value.response.status_code == 500
