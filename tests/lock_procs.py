"""Processes for tests/test_lock.py: ``python -m tests.lock_procs <role> ...`` with
SHOAL_REDIS_URL and SHOAL_NAMESPACE set. Each prints one line per step it reaches
(flushed), so the test can follow it.

* ``count <n>``: n times, take lock "counter" and in it read-modify-write the key
  ``count`` and append the acquisition's fencing token to the list ``tokens``.
* ``hold``: take lock "job" (ttl 1 s), print its token, wait in the block; on
  LockLost print "lost" then try a write with the stale token to the fenced store.
* ``lead <holder>``: campaign for leadership of "singleton" (ttl 1 s); print
  "elected <token>" when elected; run until killed.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from shoal import Client, LockLost

# "write if token >= the last one": the fenced store the tests write through.
FENCED_WRITE = """
local last = tonumber(redis.call('HGET', KEYS[1], 'token') or '0')
local token = tonumber(ARGV[1])
if token < last then return 0 end
redis.call('HSET', KEYS[1], 'token', token, 'value', ARGV[2])
return 1
"""


def store_key(client: Client) -> str:
    return f"{client.keys.prefix}test_store"


async def fenced_write(client: Client, token: int, value: str) -> bool:
    return bool(await client.redis.eval(FENCED_WRITE, 1, store_key(client), token, value))


def say(*words: Any) -> None:
    print(*words, flush=True)


async def count(client: Client, n: int) -> None:
    prefix = client.keys.prefix
    for _ in range(n):
        async with client.lock("counter", ttl=5) as lock:
            value = int(await client.redis.get(f"{prefix}count") or 0)
            await asyncio.sleep(0)  # let the others run between the read and the write
            await client.redis.set(f"{prefix}count", value + 1)
            await client.redis.rpush(f"{prefix}tokens", lock.token)
    say("done")


async def hold(client: Client) -> None:
    token = 0
    try:
        async with client.lock("job", ttl=1) as lock:
            token = lock.token or 0
            say("acquired", token)
            await asyncio.Event().wait()  # paused and resumed by the test
    except LockLost:
        say("lost")
        say("wrote" if await fenced_write(client, token, "stale") else "refused")


async def lead(client: Client, holder: str) -> None:
    async with client.leader(
        "singleton", ttl=1, holder=holder, on_elected=lambda token: say("elected", token)
    ):
        await asyncio.Event().wait()


async def main(role: str, *args: str) -> None:
    async with Client() as client:
        if role == "count":
            await count(client, int(args[0]))
        elif role == "hold":
            await hold(client)
        elif role == "lead":
            await lead(client, args[0])
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
