"""Death detection and takeover: every node reaps the nodes that stopped beating.

A node whose last heartbeat is older than ``dead_after`` is dead. Every live node
looks for such nodes a few times per ``dead_after`` and runs the reap script on
each; the script removes the dead node from the live set first, so exactly one
survivor takes over each dead node's entries — at once, not after a visibility
timeout. Entries of live nodes are never touched, however long their tasks run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import psutil

from shoal import protocol
from shoal.client import Client
from shoal.errors import ConfigurationError, ShoalError
from shoal.keys import CONSUMER_GROUP
from shoal.observability import metrics
from shoal.protocol import ErrorInfo

log = logging.getLogger("shoal.recovery")

DIED_WHILE_RUNNING = "node died while running"
SWEEP_INTERVAL_S = 60.0  # how often a reaper re-claims for recently dead nodes
STALL_S = 0.5  # a heartbeat read slower than this, or this late, means an outage


def _pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs (a zombie — killed, not yet waited for by
    its parent — does not)."""
    try:
        return bool(pid > 0 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclass(frozen=True)
class Takeover:
    """What reaping one dead node did."""

    node_id: str
    requeued: tuple[str, ...]
    dead_lettered: tuple[str, ...]


class Reaper:
    """Finds dead nodes and takes their work over (one reaper per node)."""

    def __init__(self, client: Client, node_id: str, dead_after: float) -> None:
        self._client = client
        self._node_id = node_id
        self._dead_after_ms = int(dead_after * 1000)
        self.interval = max(0.1, dead_after / 6)
        self._reconnected_at = 0.0  # loop time the engine came back after an outage
        self._last_round = 0.0  # loop time of the last round that read the heartbeats

    async def reap_once(self) -> list[Takeover]:
        """Reap every node silent for longer than ``dead_after`` (not this one).

        Silence only counts when everybody could have spoken: not while this reaper
        itself could not reach the engine, nor in the first ``dead_after`` after the
        engine (re)started — after an outage every heartbeat is old, and reaping
        then would take live nodes' work away.
        """
        client, keys = self._client, self._client.keys
        loop = asyncio.get_running_loop()
        asked = loop.time()
        cutoff = protocol.now_ms() - self._dead_after_ms
        async with client.errors():
            silent = await client.redis.zrangebyscore(keys.nodes, "-inf", cutoff)
        self._note_stall(asked)
        silent = [s for s in silent if s.decode() != self._node_id]
        if not silent or not await self._fair_to_judge():
            return []
        takeovers = []
        for raw in silent:
            node_id = raw.decode()
            if node_id != self._node_id and (done := await self._reap(node_id, cutoff)):
                takeovers.append(done)
        return takeovers

    def _note_stall(self, asked: float) -> None:
        """An outage can hide inside one command (redis-py retries a lost connection
        before any error reaches Shoal) or between rounds: a read that took long, or
        a round long after the previous one, restarts the fairness window too."""
        now = asyncio.get_running_loop().time()
        previous, self._last_round = self._last_round, now
        if now - asked > STALL_S or (previous and asked - previous > self.interval + STALL_S):
            self._reconnected_at = now

    async def _fair_to_judge(self) -> bool:
        loop = asyncio.get_running_loop()
        if self._reconnected_at and loop.time() - self._reconnected_at < self._dead_after_ms / 1000:
            return False
        async with self._client.errors():
            uptime = (await self._client.redis.info("server")).get("uptime_in_seconds", 0)
        return bool(int(uptime) * 1000 >= self._dead_after_ms)

    async def _reap(self, node_id: str, cutoff: int, *, force: bool = False) -> Takeover | None:
        client = self._client
        died = protocol.encode(
            ErrorInfo(
                "shoal.errors.NodeDied", DIED_WHILE_RUNNING, node=node_id, at=protocol.now_ms()
            )
        )
        args: list[str | int | bytes] = [
            client.keys.prefix, node_id, protocol.now_ms(), cutoff, "1" if force else "0",
        ]  # fmt: skip
        async with client.errors():
            capabilities = await client.scripts.reap([client.keys.nodes], args)
        if capabilities is False or capabilities is None:
            return None  # another survivor reaped it, or it came back
        metrics.NODES_DECLARED_DEAD.inc()
        requeued, buried = await self.claim(node_id, capabilities.decode(), died)
        takeover = Takeover(node_id, tuple(requeued), tuple(buried))
        log.warning(
            "node %s declared dead (silent > %.1fs): %d task(s) re-queued, %d dead-lettered%s",
            node_id, self._dead_after_ms / 1000, len(requeued), len(buried),
            f": {', '.join(requeued[:10])}" if requeued else "",
        )  # fmt: skip
        return takeover

    async def claim(
        self, node_id: str, capabilities: str, died: bytes
    ) -> tuple[list[str], list[str]]:
        """Take over what a dead node had started, in every key group (each group's
        queues live in its own slot, so one claim script call per group)."""
        client, keys = self._client, self._client.keys
        requeued: list[str] = []
        buried: list[str] = []
        if not capabilities:
            return requeued, buried
        for group in range(keys.groups):
            args: list[str | int | bytes] = [
                keys.group_prefix(group), node_id, protocol.now_ms(), CONSUMER_GROUP,
                int(client.settings.retention * 1000), died, capabilities,
            ]  # fmt: skip
            async with client.errors():
                result = await client.scripts.claim([keys.delayed(group)], args)
            requeued += [i.decode() for i in result[0]]
            buried += [i.decode() for i in result[1]]
            metrics.tasks_reclaimed(len(result[0]), len(result[1]))
        return requeued, buried

    async def claim_own(self, capabilities: str) -> int:
        """Take over this node's own started tasks (it abandoned them: it learnt it
        was declared dead, or that the engine forgot it)."""
        died = protocol.encode(
            ErrorInfo(
                "shoal.errors.NodeDied", DIED_WHILE_RUNNING, node=self._node_id,
                at=protocol.now_ms(),
            )
        )  # fmt: skip
        requeued, buried = await self.claim(self._node_id, capabilities, died)
        if requeued or buried:
            log.warning(
                "node %s: %d task(s) it had started re-queued, %d dead-lettered",
                self._node_id, len(requeued), len(buried),
            )  # fmt: skip
        return len(requeued) + len(buried)

    async def sweep_dead(self) -> int:
        """Claim again for every node declared dead in the last hour: finishes the
        work of a reaper that died between declaring a node dead and claiming its
        tasks in every group (claiming twice finds nothing the second time)."""
        client, keys = self._client, self._client.keys
        async with client.errors():
            dead = await client.redis.zrange(keys.dead_nodes, 0, -1)
            pipe = client.redis.pipeline(transaction=False)
            for raw in dead:
                pipe.hget(keys.node(raw.decode()), "capabilities")
            capabilities = await pipe.execute()
        died = protocol.encode(
            ErrorInfo("shoal.errors.NodeDied", DIED_WHILE_RUNNING, at=protocol.now_ms())
        )
        taken = 0
        for raw, caps in zip(dead, capabilities, strict=True):
            if caps:
                requeued, buried = await self.claim(raw.decode(), caps.decode(), died)
                taken += len(requeued) + len(buried)
        return taken

    async def reclaim_own_name(self, host: str) -> Takeover | None:
        """Before a node registers under a name, take over what an earlier process of
        that name left behind (a node restarted by its supervisor right after a
        crash comes back before anyone declared the old one dead, and would
        otherwise leave its predecessor's started tasks stranded).

        An earlier holder on this host whose pid is gone is reaped at once; one
        elsewhere gets ``dead_after`` to fall silent. A name that keeps beating
        belongs to a live node: refused, since two nodes must never share one.
        """
        client, node_id = self._client, self._node_id
        async with client.errors():
            previous = await client.redis.hgetall(client.keys.node(node_id))
        if not previous or previous.get(b"state") != b"alive":
            return await self._reap(node_id, 0, force=True)  # entries of a reaped/left holder
        pid = int(previous.get(b"pid", b"0"))
        if previous.get(b"host", b"").decode() == host and not _pid_alive(pid):
            return await self._reap(node_id, 0, force=True)
        # Judge the earlier holder by its own dead_after (it may beat more slowly).
        theirs = float(previous.get(b"dead_after", b"0") or 0) * 1000
        dead_after_ms = max(self._dead_after_ms, int(theirs))
        deadline = asyncio.get_running_loop().time() + dead_after_ms / 1000 + 1
        while asyncio.get_running_loop().time() < deadline:
            cutoff = protocol.now_ms() - dead_after_ms
            if (done := await self._reap(node_id, cutoff)) is not None:
                return done
            await asyncio.sleep(self.interval)  # give the earlier holder time to fall silent
        raise ConfigurationError(
            f"a live node named {node_id!r} runs already (pid {pid} on "
            f"{previous.get(b'host', b'?').decode()}); give this one another --name"
        )

    async def run(self, closing: asyncio.Event) -> None:
        """Reap until ``closing`` is set; engine errors are logged and retried."""
        loop = asyncio.get_running_loop()
        next_sweep = 0.0
        while not closing.is_set():
            try:
                if loop.time() >= next_sweep:
                    await self.sweep_dead()
                    next_sweep = loop.time() + SWEEP_INTERVAL_S
                await self.reap_once()
            except ShoalError as exc:
                # nobody can be judged on heartbeats written while this reaper could
                # not read them: the fairness window restarts at every failure
                self._reconnected_at = loop.time()
                log.warning("looking for dead nodes failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), self.interval)
