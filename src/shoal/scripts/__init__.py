"""Lua scripts for every multi-key state change, loaded from the ``.lua`` files beside
this module. Each file's header documents the keys it touches; ``_common.lua`` is
prepended to each so the helpers (key builders, ``finish_task``) exist once.

Scripts run by EVALSHA. redis-py's own Script helper checks ``SCRIPT EXISTS`` before
every pipeline — an extra round trip per batch on the hot path — so this module
loads the scripts once per connection pool and reloads them only when the engine
answers NOSCRIPT (after a restart or SCRIPT FLUSH).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

SCRIPT_NAMES = (
    "submit", "fetch", "finish", "release", "cancel", "redrive", "follow", "events", "beat",
    "reap", "claim", "lease", "turn_begin", "turn_end", "send", "ratelimit", "ratewindow",
    "services", "lock", "cache", "config", "saga",
    "quotawindow",
)  # fmt: skip

Arg = str | int | float | bytes


def load_source(name: str) -> str:
    """The full source of a script (common helpers included), e.g. for a sync client."""
    return _source(name)


def _source(name: str) -> str:
    folder = resources.files(__package__)
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


class Script:
    """One Lua script, called by its SHA and loaded on demand."""

    def __init__(self, redis: Redis, name: str) -> None:
        self.name = name
        self.source = _source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()
        self._redis = redis

    async def __call__(
        self, keys: Sequence[str], args: Sequence[Arg], *, on: Redis | None = None
    ) -> Any:
        """Run the script (on ``on``, another connection pool, if given)."""
        conn = on or self._redis
        try:
            return await conn.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await conn.script_load(self.source)
            return await conn.evalsha(self.sha, len(keys), *keys, *args)

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Add a call to a pipeline; on NOSCRIPT its reply is a NoScriptError and the
        caller re-runs it with ``__call__`` (which loads the script)."""
        # execute_command, not pipe.evalsha: redis-py's Cluster pipeline refuses the
        # latter outright, though EVALSHA routes by its first key like any command
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def load(self) -> None:
        await self._redis.script_load(self.source)


class Scripts:
    """The scripts of one connection pool."""

    def __init__(self, redis: Redis) -> None:
        self.submit = Script(redis, "submit")
        self.fetch = Script(redis, "fetch")
        self.finish = Script(redis, "finish")
        self.release = Script(redis, "release")
        self.cancel = Script(redis, "cancel")
        self.redrive = Script(redis, "redrive")
        self.follow = Script(redis, "follow")
        self.lease = Script(redis, "lease")
        self.turn_begin = Script(redis, "turn_begin")
        self.turn_end = Script(redis, "turn_end")
        self.send = Script(redis, "send")
        self.events = Script(redis, "events")
        self.beat = Script(redis, "beat")
        self.reap = Script(redis, "reap")
        self.claim = Script(redis, "claim")
        self.ratelimit = Script(redis, "ratelimit")
        self.ratewindow = Script(redis, "ratewindow")
        self.services = Script(redis, "services")
        self.lock = Script(redis, "lock")
        self.cache = Script(redis, "cache")
        self.config = Script(redis, "config")
        self.saga = Script(redis, "saga")
        self.quotawindow = Script(redis, "quotawindow")

    def all(self) -> list[Script]:
        return [getattr(self, name) for name in SCRIPT_NAMES]

    async def load_all(self) -> None:
        for script in self.all():
            await script.load()
