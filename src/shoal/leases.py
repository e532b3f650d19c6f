"""Partition leases: which agent partitions this node owns, kept from a thread.

Each partition of an agent type (its mailbox, and the single writer of its agents'
state) is owned by one live node at a time through a lease: the key
``lease:<type>:<p>`` holding ``'<node> <token>'`` with a time to live. The owner
renews it every ``interval``; a partition whose owner stops renewing is free again
after ``lease_time``. Tokens only grow, so the engine can refuse a write from an
owner that lost its lease (see turn_end.lua).

Who *should* own what is weighted rendezvous hashing over the live nodes hosting
the type (routing.owner_of): every node computes the same answer from the same
view, so a node joining or leaving moves only its share. The keeper acquires the
free partitions it should own; partitions it owns but no longer should are
reported as ``unwanted``, and the node hands them over (finishes their turns,
then releases) — the new owner takes them on its next round.

Why a thread, like the heartbeat (liveness.py): a handler blocking the event loop
must not let the leases lapse while the node is alive — another node would then
run the same agents. In turn, the node must stop a partition *before* its lease can
have expired when renewals fail: ``valid()`` says until when a lease is surely
still ours, measured from when the renewal was *sent*, less a safety margin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from shoal.engine import open_sync_connection
from shoal.keys import Keys
from shoal.routing import owner_of
from shoal.scripts import load_source

log = logging.getLogger("shoal.leases")

Partition = tuple[str, int]  # (agent type, partition number)


@dataclass
class Change:
    """What one round of the keeper changed, handed to the node's loop."""

    acquired: dict[Partition, int] = field(default_factory=dict)  # partition -> token
    lost: set[Partition] = field(default_factory=set)
    unwanted: set[Partition] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.acquired or self.lost or self.unwanted)


@dataclass
class Lease:
    token: int
    valid_until: float  # time.monotonic() before which the lease is surely ours


class LeaseKeeper:
    """Renews, acquires and reports partition leases for one node, every ``interval``."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        node_id: str,
        agent_types: list[str],
        partitions: int,
        *,
        lease_time: float,
        interval: float,
        dead_after: float,
        notify: Callable[[Change], None],
    ) -> None:
        self._url = url
        self._keys = keys
        self.node_id = node_id
        self._types = agent_types
        self._partitions = partitions
        self._lease_ms = int(lease_time * 1000)
        # Stop before the engine can expire the lease: a margin for clock drift
        # between this process and the engine, and for the time a turn's commit
        # takes to arrive.
        self._safe_for = lease_time - min(0.5, lease_time / 4)
        self._interval = interval
        self._dead_after_ms = int(dead_after * 1000)
        self._notify = notify
        self._lock = threading.Lock()
        self._owned: dict[Partition, Lease] = {}
        self._paused = False  # while draining: renew only, acquire nothing
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-leases", daemon=True)
        self._assignment_cache: tuple[tuple[tuple[str, float], ...], dict[int, str | None]] | None
        self._assignment_cache = None

    # --- called from the node's loop ---------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 5)

    def poke(self) -> None:
        """Run a round now (e.g. after releasing partitions, so others see it soon)."""
        self._wake.set()

    def pause_acquiring(self) -> None:
        with self._lock:
            self._paused = True

    def valid(self, part: Partition) -> Lease | None:
        """The lease if it is surely still ours now, else None."""
        lease = self._owned.get(part)
        if lease is None or time.monotonic() >= lease.valid_until:
            return None
        return lease

    def owned(self) -> dict[Partition, int]:
        with self._lock:
            return {part: lease.token for part, lease in self._owned.items()}

    def forget(self, parts: set[Partition]) -> None:
        """The node released (or gave up) these partitions."""
        with self._lock:
            for part in parts:
                self._owned.pop(part, None)

    # --- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        # A round stuck on a slow engine must not outlive the leases it renews, so
        # socket waits are bounded well inside the lease (valid() is what the node
        # checks before every turn; this keeps the keeper's reports timely too).
        wait = max(0.05, min(self._interval, self._safe_for / 3))
        conn = open_sync_connection(self._url, timeout=wait)
        script = conn.register_script(load_source("lease"))
        try:
            while not self._stop.is_set():
                try:
                    self._round(conn, script)
                except redis.RedisError as exc:
                    log.warning("node %s: lease round failed: %s", self.node_id, exc)
                    self._drop_expired()
                except Exception:  # a bug must not end the thread and let leases lapse
                    log.exception("node %s: lease round crashed", self.node_id)
                    self._drop_expired()
                self._wake.wait(self._interval)
                self._wake.clear()
        finally:
            conn.close()

    def _round(self, conn: redis.Redis, script: Any) -> None:
        desired = self._desired(conn)
        with self._lock:
            owned = {part: lease.token for part, lease in self._owned.items()}
            paused = self._paused
        to_acquire = [] if paused else sorted(desired - owned.keys())
        ops: list[tuple[str, Partition, int | str]] = [
            ("renew", part, token) for part, token in owned.items()
        ]
        ops += [("acquire", part, "") for part in to_acquire]
        if not ops:
            return
        by_group: dict[int, list[tuple[str, Partition, int | str]]] = {}
        for item in ops:
            by_group.setdefault(self._keys.partition_group(item[1][1]), []).append(item)
        ops, results, sent = [], [], []
        for group, group_ops in sorted(by_group.items()):  # one call per slot
            args: list[Any] = [
                self._keys.group_prefix(group), self.node_id, self._lease_ms,
                int(time.time() * 1000),
            ]  # fmt: skip
            for verb, (agent_type, p), token in group_ops:
                args += [verb, agent_type, p, token]
            sent_at = time.monotonic()
            results += script(keys=[self._keys.lease_tokens(group)], args=args)
            ops += group_ops
            sent += [sent_at] * len(group_ops)
        change = Change()
        with self._lock:
            for (op, part, _), result, sent_at in zip(ops, results, sent, strict=True):
                if op == "renew":
                    if part not in self._owned:
                        continue  # released by the node meanwhile
                    if result:
                        self._owned[part].valid_until = sent_at + self._safe_for
                    else:
                        del self._owned[part]
                        change.lost.add(part)
                elif result:
                    self._owned[part] = Lease(int(result), sent_at + self._safe_for)
                    change.acquired[part] = int(result)
            change.unwanted = {part for part in self._owned if part not in desired}
        self._report(change)

    def _drop_expired(self) -> None:
        """Renewals fail: give up each lease once it may have expired in the engine."""
        now = time.monotonic()
        change = Change()
        with self._lock:
            for part, lease in list(self._owned.items()):
                if now >= lease.valid_until:
                    del self._owned[part]
                    change.lost.add(part)
        self._report(change)

    def _report(self, change: Change) -> None:
        if change.acquired:
            log.info("node %s acquired %d partition(s)", self.node_id, len(change.acquired))
        if change.lost:
            log.warning("node %s lost %d partition lease(s)", self.node_id, len(change.lost))
        if change:
            self._notify(change)

    def _desired(self, conn: redis.Redis) -> set[Partition]:
        """The partitions rendezvous hashing gives this node, per hosted type."""
        cutoff = int(time.time() * 1000) - self._dead_after_ms
        pipe = conn.pipeline(transaction=False)
        for agent_type in self._types:
            pipe.zrangebyscore(self._keys.agent_hosts(agent_type), cutoff, "+inf")
        hosts_per_type: list[list[bytes]] = pipe.execute()
        everyone = sorted({h.decode() for hosts in hosts_per_type for h in hosts})
        weights = self._weights(conn, everyone)
        desired: set[Partition] = set()
        for agent_type, hosts in zip(self._types, hosts_per_type, strict=True):
            nodes = {h.decode(): weights.get(h.decode(), 1.0) for h in hosts}
            if self.node_id not in nodes:
                continue  # not (yet, or any more) a live host: own nothing
            owners = self._assignment(nodes)
            desired |= {(agent_type, p) for p, o in owners.items() if o == self.node_id}
        return desired

    def _weights(self, conn: redis.Redis, node_ids: list[str]) -> dict[str, float]:
        pipe = conn.pipeline(transaction=False)
        for node_id in node_ids:
            pipe.hget(self._keys.node(node_id), "weight")
        raw = pipe.execute()
        return {n: float(w) if w else 1.0 for n, w in zip(node_ids, raw, strict=True)}

    def _assignment(self, nodes: dict[str, float]) -> dict[int, str | None]:
        """owner_of for every partition, cached while the live set stays the same."""
        signature = tuple(sorted(nodes.items()))
        if self._assignment_cache is None or self._assignment_cache[0] != signature:
            owners = {p: owner_of(p, nodes) for p in range(self._partitions)}
            self._assignment_cache = (signature, owners)
        return self._assignment_cache[1]
