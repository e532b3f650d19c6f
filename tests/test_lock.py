"""Locks with fencing tokens and leader election, against the real engine, with real
processes contending, paused (SIGSTOP) and killed (tests/lock_procs.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from shoal import Agent, Client, ConfigurationError, LockLost, LockTimeout, Settings, capability
from shoal.coordination import LockHolder
from shoal.coordination.lock import holder_of
from tests.conftest import (
    eventually,
    helper_process,
    read_line,
    running_node,
    wait_for_status,
)
from tests.lock_procs import fenced_write, store_key


def lock_process(settings: Settings, *args: str) -> Any:
    return helper_process(settings, "tests.lock_procs", *args, stdin=False)


async def test_three_processes_contending_lose_no_update_and_tokens_follow_acquisition_order(
    client: Client, settings: Settings
) -> None:
    n = 25
    with (
        lock_process(settings, "count", str(n)) as a,
        lock_process(settings, "count", str(n)) as b,
        lock_process(settings, "count", str(n)) as c,
    ):
        assert [await read_line(p, 15) for p in (a, b, c)] == ["done"] * 3
    prefix = client.keys.prefix
    assert int(await client.redis.get(f"{prefix}count")) == 3 * n  # no lost update
    tokens = [int(t) for t in await client.redis.lrange(f"{prefix}tokens", 0, -1)]
    # Appended inside the critical section, so in acquisition order: strictly increasing,
    # and one token per acquisition.
    assert tokens == list(range(1, 3 * n + 1))


async def test_a_holder_paused_past_its_ttl_gets_lock_lost_and_its_stale_token_is_refused(
    client: Client, settings: Settings
) -> None:
    with lock_process(settings, "hold") as holder:
        word, token = (await read_line(holder)).split()
        assert word == "acquired"
        assert await fenced_write(client, int(token), "first holder")
        holder.send_signal(signal.SIGSTOP)  # a GC pause, a swapped-out VM...
        async with client.lock("job", ttl=5, wait=10) as lock:  # taken once the ttl ran out
            assert lock.token is not None and lock.token > int(token)
            assert await fenced_write(client, lock.token, "second holder")
            holder.send_signal(signal.SIGCONT)
            assert await read_line(holder) == "lost"  # its watchdog found the lock taken
            assert await read_line(holder) == "refused"  # its stale write, by the store
            assert lock.held and not lock.lost.is_set()
    assert await client.redis.hget(store_key(client), "value") == b"second holder"


async def test_a_killed_leader_is_succeeded_within_about_its_ttl(
    client: Client, settings: Settings
) -> None:
    elected: asyncio.Queue[int] = asyncio.Queue()
    with lock_process(settings, "lead", "first") as first:
        word, token = (await read_line(first)).split()
        assert word == "elected"
        assert await client.leader_of("singleton") == LockHolder("first", int(token))
        async with client.leader(
            "singleton", ttl=1, holder="second", on_elected=elected.put_nowait
        ) as second:
            assert not second.is_leader
            first.kill()
            successor = await asyncio.wait_for(elected.get(), timeout=3)  # ttl 1 s + slack
            assert successor > int(token)
            assert second.is_leader and second.token == successor
            assert await client.leader_of("singleton") == LockHolder("second", successor)
    assert await client.leader_of("singleton") is None  # resigned on exit


@pytest.mark.topology
async def test_an_acquire_that_cannot_get_the_lock_in_time_raises_lock_timeout(
    client: Client,
) -> None:
    async with client.lock("busy", ttl=5):
        with pytest.raises(LockTimeout, match=r"lock 'busy' not acquired within 0.0s"):
            await client.lock("busy", wait=0).acquire()
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(LockTimeout, match=r"within 0\.2s"):
            async with client.lock("busy", wait=0.2):
                pytest.fail("acquired a held lock")
        assert 0.2 <= loop.time() - start < 1


async def test_a_waiter_takes_the_lock_as_soon_as_it_is_released(client: Client) -> None:
    first = client.lock("handoff", ttl=30)
    token = await first.acquire()
    waiter = asyncio.create_task(client.lock("handoff", wait=10).acquire())

    async def blocked() -> bool:  # the waiter waits for a wake-up, not for the expiry
        return any(c.get("cmd") == "blpop" for c in await client.redis.client_list())

    await eventually(blocked, "the waiter blocking on the wake-up list")
    assert await first.release()
    assert await asyncio.wait_for(waiter, 1) == token + 1  # woken, not at the 30 s expiry
    assert await client.leader_of("x") is None


@pytest.mark.topology
async def test_a_client_closing_releases_the_locks_it_holds(settings: Settings) -> None:
    async with Client(settings=settings) as holder, Client(settings=settings) as other:
        await holder.lock("left", ttl=30).acquire()
        await holder.close()
        async with other.lock("left", wait=0) as lock:  # free at once, not in 30 s
            assert lock.token == 2


async def test_a_client_closing_ends_its_campaigns_and_its_leader_resigns(
    settings: Settings,
) -> None:
    async with Client(settings=settings) as leader, Client(settings=settings) as heir:
        first = await leader.leader("closing", ttl=30, holder="first").start()
        await asyncio.wait_for(first.elected.wait(), 5)
        second = await heir.leader("closing", ttl=30, holder="second").start()
        await leader.close()  # not first.stop(): the client's close must do it
        await asyncio.wait_for(second.elected.wait(), 5)  # not in 30 s
        assert not first.is_leader and not leader.campaigns
        await second.stop()


@pytest.mark.topology
async def test_only_the_holder_releases(client: Client) -> None:
    mine = client.lock("owned", ttl=5)
    token = await mine.acquire()
    impostor = client.lock("owned", ttl=5, holder="someone-else")
    impostor.token = token  # even knowing the token, another holder id is refused
    assert not await impostor.release()
    twin = client.lock("owned", ttl=5)  # same holder id, another acquisition
    twin.token, twin._claim = token, f"{mine.holder} 0123456789abcdef"
    assert not await twin.release()
    assert await holder_of(client, "owned") == LockHolder(mine.holder, token)
    assert await mine.release()
    assert not await mine.release()  # released already


@pytest.mark.topology
async def test_a_lock_taken_from_its_holder_cancels_the_block_with_lock_lost(
    client: Client,
) -> None:
    lock = client.lock("stolen", ttl=0.3)

    async def hold() -> None:
        async with lock:
            await client.redis.delete(client.keys.lock("stolen")[0])  # expired, say
            await asyncio.Event().wait()  # cancelled at the next renewal, ~0.1 s

    with pytest.raises(LockLost, match=r"lock 'stolen' \(fencing token 1\) was lost"):
        await hold()
    assert lock.lost.is_set() and not lock.held
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


@pytest.mark.topology
async def test_a_held_lock_is_renewed_past_its_ttl(client: Client) -> None:
    async with client.lock("long", ttl=0.3) as lock:
        await asyncio.sleep(0.7)  # time passing is the point: past two ttls
        assert lock.held
        assert lock.token is not None
        assert await holder_of(client, "long") == LockHolder(lock.holder, lock.token)
        assert (await client.leader_of("long")) is None  # a lock, not a leadership


async def test_bad_lock_arguments_fail_at_once(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="lock ttl"):
        client.lock("x", ttl=0)
    with pytest.raises(ConfigurationError, match="lock wait"):
        client.lock("x", wait=-1)
    with pytest.raises(ConfigurationError, match="lock name"):
        client.lock("bad name")


class Locker(Agent):
    @capability("locked_token")
    async def locked_token(self) -> list[Any]:
        async with (
            self.ctx.lock("from-a-handler", wait=5) as lock,
            self.ctx.leader("handler-lead") as lead,
        ):
            await lead.elected.wait()
            return [lock.token, lead.holder == self.ctx.node_id, lead.token]


async def test_handlers_lock_and_lead_through_their_context(
    client: Client, settings: Settings
) -> None:
    async with running_node([Locker], settings):
        async with client.lock("from-a-handler") as mine:
            token = mine.token
            handle = await client.submit("locked_token")
            await wait_for_status(handle, "running")  # the handler waits for the lock
        assert token is not None
        assert await handle.result(timeout=10) == [token + 1, True, 1]


async def test_an_acquire_whose_reply_never_came_is_freed_by_its_nonce(client: Client) -> None:
    """The other half of a cancelled acquire: the script ran and took the lock, the
    caller never saw the token. Its nonce still names the acquisition."""
    lost_reply = client.lock("ghost", ttl=30)
    lost_reply._claim = f"{lost_reply.holder} feedfacecafebeef"
    taken, _ = await lost_reply._call("acquire", lost_reply._claim, 30_000)
    assert taken
    bystander = client.lock("ghost", ttl=30)
    bystander._claim = f"{bystander.holder} 0000000000000000"
    await bystander._abandon()  # another nonce frees nothing
    assert await holder_of(client, "ghost") is not None
    waiter = asyncio.create_task(client.lock("ghost", wait=10).acquire())
    await lost_reply._abandon()
    assert await asyncio.wait_for(waiter, 5) == 2  # woken by the abandon, not by the ttl


async def test_a_renewal_the_engine_does_not_answer_loses_the_lock_before_its_ttl(
    client: Client, settings: Settings
) -> None:
    """A renewal stuck waiting for its reply (a paused engine here) must not leave the
    holder believing it holds the lock past the ttl: it is lost a margin before."""
    async with Client(settings=settings) as admin:
        lock = client.lock("stalled", ttl=0.6)
        await lock.acquire()
        await admin.redis.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        try:
            paused = time.monotonic()
            await asyncio.wait_for(lock.lost.wait(), timeout=1.0)
            assert time.monotonic() - paused < 0.6  # within the ttl of the last renewal
        finally:
            await admin.redis.execute_command("CLIENT", "UNPAUSE")
        assert not lock.held
        await lock.release()


async def test_a_leader_that_stops_from_its_own_callback_resigns(
    client: Client, settings: Settings
) -> None:
    async with Client(settings=settings) as other:
        lead = client.leader("self-stopping", ttl=30)

        async def step_down(token: int) -> None:
            await lead.stop()

        lead._on_elected = step_down
        await lead.start()
        heir = await other.leader("self-stopping", ttl=30, holder="heir").start()
        await asyncio.wait_for(heir.elected.wait(), 5)  # not in 30 s: it resigned
        assert not lead.is_leader and lead not in client.campaigns
        await heir.stop()


async def test_a_leader_whose_stop_is_cancelled_still_resigns(
    client: Client, settings: Settings
) -> None:
    """A node shutting down cancels the task that is stopping a campaign (the
    prober did: a successor then waited out the ttl)."""
    async with Client(settings=settings) as other:
        lead = await client.leader("cancelled-stop", ttl=30).start()
        await asyncio.wait_for(lead.elected.wait(), 5)
        stopping = asyncio.create_task(lead.stop())
        await asyncio.sleep(0)  # it has begun: the campaign is being cancelled
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        heir = await other.leader("cancelled-stop", ttl=30, holder="heir").start()
        await asyncio.wait_for(heir.elected.wait(), 5)  # not in 30 s: it resigned
        await heir.stop()


async def test_a_closing_client_tells_a_running_block_it_lost_its_lock(
    settings: Settings,
) -> None:
    async with Client(settings=settings) as holder:
        entered = asyncio.Event()

        async def hold() -> None:
            async with holder.lock("closing-block", ttl=30):
                entered.set()
                await asyncio.Event().wait()

        block = asyncio.create_task(hold())
        await asyncio.wait_for(entered.wait(), 5)
        await holder.close()
        with pytest.raises(LockLost, match="the client closed"):
            await asyncio.wait_for(block, 5)


async def test_a_waiter_that_leaves_passes_a_wake_up_on_only_for_a_free_lock(
    client: Client,
) -> None:
    held = client.lock("handed-on", ttl=30)
    await held.acquire()
    wake = client.keys.lock("handed-on")[2]
    assert await held._call("wake") == 0 and not await client.redis.exists(wake)
    await held.release()
    await client.redis.delete(wake)  # the release's own wake-up, taken by nobody
    assert await held._call("wake") == 1 and await client.redis.llen(wake) == 1
