"""Agents whose capabilities are the steps of the sagas in tests/test_sagas.py
(importable as ``tests.saga_app`` by node processes too).

Every step and compensation appends ``"<what>:<item>"`` to the engine list
``saga_test:done`` when it completes, so a test sees which ran, in what order and
how often — across processes. ``gated`` waits until the test opens its gate (a
list the test pushes to), so a test can act while the step runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from shoal import Agent, capability


def done_key(prefix: str) -> str:
    return f"{prefix}saga_test:done"


def gate_key(prefix: str, name: str) -> str:
    return f"{prefix}saga_test:gate:{name}"


def started_key(prefix: str) -> str:
    return f"{prefix}saga_test:started"


def fixed_key(prefix: str) -> str:
    """Set by a test: ``mend`` succeeds from then on."""
    return f"{prefix}saga_test:fixed"


class Steps(Agent):
    async def _record(self, what: str) -> None:
        client = self.ctx.sagas.client
        await client.redis.rpush(done_key(client.keys.prefix), what)

    @capability("reserve")
    async def reserve(self, item: str, key: str | None = None, seen: Any = None) -> dict[str, Any]:
        await self._record(f"reserve:{item}")
        return {"item": item, "key": key}

    @capability("release")
    async def release(self, item: str, key: str | None = None, seen: Any = None) -> Any:
        await self._record(f"release:{item}")
        return {"key": key, "seen": seen}

    @capability("combine")
    async def combine(self, item: str, earlier: dict[str, Any]) -> list[str]:
        await self._record(f"combine:{item}")
        return sorted(earlier)

    @capability("gated")
    async def gated(self, item: str, gate: str) -> str:
        """Waits for the gate (a blocking move that leaves the token in place, so
        every later waiter passes too)."""
        client = self.ctx.sagas.client
        prefix = client.keys.prefix
        await client.redis.rpush(started_key(prefix), f"{item}:{self.ctx.node_id}")
        await client.blocking.blmove(gate_key(prefix, gate), gate_key(prefix, gate), 0)
        await self._record(f"gated:{item}")
        return item

    @capability("stubborn", max_attempts=1)
    async def stubborn(self, item: str, gate: str) -> str:
        """Like ``gated``, but a cancellation does not stop it: it does its side
        effect and returns anyway (as a handler that shields its work would)."""
        client = self.ctx.sagas.client
        prefix = client.keys.prefix
        await client.redis.rpush(started_key(prefix), f"{item}:{self.ctx.node_id}")
        try:
            await client.blocking.blmove(gate_key(prefix, gate), gate_key(prefix, gate), 0)
        except asyncio.CancelledError:
            await self._record(f"stubborn:{item}")
            return item
        await self._record(f"stubborn:{item}")
        return item

    @capability("mend", max_attempts=2, backoff=0.01, max_backoff=0.02)
    async def mend(self, item: str) -> None:
        """A compensation that fails until the test sets fixed_key."""
        client = self.ctx.sagas.client
        if not await client.redis.exists(fixed_key(client.keys.prefix)):
            raise RuntimeError(f"{item} cannot be mended yet")
        await self._record(f"mend:{item}")

    @capability("explode", max_attempts=1)
    async def explode(self, item: str) -> None:
        raise RuntimeError(f"{item} cannot be booked")

    @capability("refuse", max_attempts=5, backoff=0.01, max_backoff=0.02)
    async def refuse(self, item: str) -> None:
        await self._record(f"refuse:{item}")
        raise RuntimeError(f"{item} cannot be released")


class Wallet(Agent):
    """An addressed agent: a step sent to ``wallet/<key>`` runs there, with its state."""

    @capability("credit")
    async def credit(self, amount: int, key: str) -> int:
        return self._apply(amount, f"credit:{key}")

    @capability("debit")
    async def debit(self, amount: int, key: str) -> int:
        return self._apply(-amount, f"debit:{key}")

    def _apply(self, amount: int, key: str) -> int:
        seen = self.state.setdefault("seen", [])
        if key not in seen:  # the idempotency key makes a re-run harmless
            seen.append(key)
            self.state["balance"] = self.state.get("balance", 0) + amount
        return int(self.state["balance"])


agents = [Steps, Wallet]
