"""Processes for tests/test_cache.py: ``python -m tests.cache_procs <role> ...`` with
SHOAL_REDIS_URL and SHOAL_NAMESPACE set. Each prints one line per step (flushed).

* ``follow``: opens cache "shared" (ttl 60 s); says "ready", then answers commands
  read from stdin: ``get <key>`` prints ``[value, level]`` as JSON (level: "local"
  or "remote", which level answered), ``set <key> <json>`` stores and prints "ok" (JSON).
* ``stampede <n>``: opens cache "stampede"; says "ready", waits for "go" on stdin,
  then makes n concurrent ``get_or_set("report", fn)`` calls; fn counts itself in
  the engine (INCR ``computed``), takes 300 ms, returns "computed". Prints the
  JSON list of distinct results.
* ``hang``: ``get_or_set("slow", fn)`` on cache "takeover" (fill_lease 1 s), whose
  fn says "computing" and never returns (the test kills the process).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from shoal import Client


def say(*words: Any) -> None:
    print(*words, flush=True)


def computed_key(client: Client) -> str:
    return f"{client.keys.prefix}test_computed"


async def follow(client: Client) -> None:
    cache = client.cache("shared", ttl=60)
    say("ready")
    while line := await asyncio.to_thread(sys.stdin.readline):
        command, key, *rest = line.split(maxsplit=2)
        if command == "get":
            before = cache.stats.local_hits
            value = await cache.get(key)
            say(json.dumps([value, "local" if cache.stats.local_hits > before else "remote"]))
        elif command == "set":
            await cache.set(key, json.loads(rest[0]))
            say(json.dumps("ok"))


async def stampede(client: Client, n: int) -> None:
    cache = client.cache("stampede", ttl=60)

    async def compute() -> str:
        await client.redis.incr(computed_key(client))
        await asyncio.sleep(0.3)  # the computation's duration, so the misses overlap
        return "computed"

    say("ready")
    assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "go"
    results = await asyncio.gather(*(cache.get_or_set("report", compute) for _ in range(n)))
    say(json.dumps(sorted(set(results))))


async def hang(client: Client) -> None:
    cache = client.cache("takeover", fill_lease=1)

    async def compute() -> str:
        say("computing")
        await asyncio.Event().wait()  # killed by the test meanwhile
        return "never"

    await cache.get_or_set("slow", compute)


async def main(role: str, *args: str) -> None:
    async with Client() as client:
        if role == "follow":
            await follow(client)
        elif role == "stampede":
            await stampede(client, int(args[0]))
        elif role == "hang":
            await hang(client)
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
