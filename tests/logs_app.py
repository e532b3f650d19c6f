"""Agents whose handlers log, for the structured-log tests (``--app tests.logs_app``)."""

from __future__ import annotations

import logging
from typing import Any

from shoal import Agent, capability, handler

log = logging.getLogger("tests.logs_app")


class Chatty(Agent):
    @capability("chatty")
    async def chatty(self, word: str) -> str:
        log.info("chatty says %s", word)
        log.warning("chatty warns %s", word)
        try:
            raise ValueError(f"bad {word}")
        except ValueError:
            log.exception("chatty caught it")
        return word

    @capability("chatty_sync")
    def chatty_sync(self, word: str) -> str:
        """A sync handler logs from a worker thread: the ids travel with it."""
        log.warning("sync chatty says %s", word)
        return word


class Talker(Agent):
    """An addressed agent: its lines name it."""

    @handler
    async def hear(self, message: Any) -> str:
        log.warning("talker heard %s", message)
        return "heard"
