"""Lua scripts for every multi-key state change, loaded from the ``.lua`` files beside
this module. Each file's header documents the keys it touches; ``_common.lua`` is
prepended to each so the helpers (key builders, ``finish_task``) exist once.
"""

from __future__ import annotations

from importlib import resources

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

SCRIPT_NAMES = ("submit", "fetch", "finish", "release", "cancel", "redrive")


def _source(name: str) -> str:
    folder = resources.files(__package__)
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    return common + "\n" + (folder / f"{name}.lua").read_text(encoding="utf-8")


class Scripts:
    """The registered scripts of one connection (EVALSHA with reload on NOSCRIPT)."""

    def __init__(self, redis: Redis) -> None:
        self.submit: AsyncScript = redis.register_script(_source("submit"))
        self.fetch: AsyncScript = redis.register_script(_source("fetch"))
        self.finish: AsyncScript = redis.register_script(_source("finish"))
        self.release: AsyncScript = redis.register_script(_source("release"))
        self.cancel: AsyncScript = redis.register_script(_source("cancel"))
        self.redrive: AsyncScript = redis.register_script(_source("redrive"))
