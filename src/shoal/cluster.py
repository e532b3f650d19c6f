"""What the cluster looks like right now: nodes, queues and agent types
(``Client.cluster()``, ``shoal status``). Read-only; built from the node records,
the streams, the partition leases and the ownership log."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from shoal.keys import CONSUMER_GROUP, PRIORITIES

OWNERSHIP_CHANGES_SHOWN = 5  # the most recent entries of the ownership stream


class NodeInfo(msgspec.Struct, frozen=True):
    """One node as its heartbeats describe it. ``state``: alive, suspect (a heartbeat
    is late), or dead (silent past ``dead_after``, or declared dead in the last hour)."""

    id: str
    state: str
    host: str
    pid: int
    version: str
    zone: str
    weight: float
    capabilities: tuple[str, ...]
    concurrency: int
    in_flight: int
    free: int
    cpu_percent: float
    rss_bytes: int
    completed: int
    heartbeat_age_s: float
    started_at: int
    stalled: str = ""
    partitions: int = 0  # agent partitions whose lease it holds
    active_agents: int = 0  # agents active (in memory) on it


class QueueInfo(msgspec.Struct, frozen=True):
    """One (capability, priority) stream. ``depth`` counts entries not yet acknowledged:
    ``waiting`` ones no node has taken, ``pending`` ones running on a node."""

    capability: str
    priority: str
    depth: int
    waiting: int
    pending: int
    oldest_age_s: float | None
    consumers: int
    dead_letters: int
    duplicates: int


class AgentTypeStatus(msgspec.Struct, frozen=True):
    """One registered agent type: which nodes hold leases on its partitions, and how
    many entries (messages and addressed tasks) wait in its mailboxes."""

    name: str
    capabilities: tuple[str, ...]
    handles_messages: bool
    partitions: int  # the namespace's partition count
    owners: dict[str, int]  # node id -> partitions of this type whose lease it holds
    unowned: int  # partitions no node holds a lease on right now
    backlog: int  # entries in the type's mailboxes, not processed yet


class OwnershipChange(msgspec.Struct, frozen=True):
    """One entry of the ``ownership`` stream: a node acquired or released a lease."""

    id: str
    type: str
    partition: int
    node: str
    event: str
    token: int
    at: int  # epoch ms, by the clock of the node that made the change


class ClusterState(msgspec.Struct, frozen=True):
    nodes: tuple[NodeInfo, ...]
    queues: tuple[QueueInfo, ...]
    delayed: int
    agent_types: tuple[AgentTypeStatus, ...] = ()
    ownership: tuple[OwnershipChange, ...] = ()  # newest first


def _text(record: dict[bytes, bytes], field: str, default: str = "") -> str:
    return record.get(field.encode(), default.encode()).decode()


def _number(record: dict[bytes, bytes], field: str) -> float:
    try:
        return float(record.get(field.encode(), b"0") or 0)
    except ValueError:
        return 0.0


def node_info(node_id: str, record: dict[bytes, bytes], now_ms: int) -> NodeInfo:
    age = max(0.0, (now_ms - _number(record, "heartbeat")) / 1000)
    interval = _number(record, "heartbeat_interval") or 1.0
    dead_after = _number(record, "dead_after") or 3.0
    state = "alive" if age <= 2 * interval else "suspect" if age <= dead_after else "dead"
    if _text(record, "state") == "dead":
        state = "dead"
    return NodeInfo(
        id=node_id, state=state, host=_text(record, "host"), pid=int(_number(record, "pid")),
        version=_text(record, "version"), zone=_text(record, "zone"),
        weight=_number(record, "weight") or 1.0,
        capabilities=tuple(c for c in _text(record, "capabilities").split(",") if c),
        concurrency=int(_number(record, "concurrency")),
        in_flight=int(_number(record, "in_flight")),
        free=int(_number(record, "free")), cpu_percent=_number(record, "cpu"),
        rss_bytes=int(_number(record, "rss")), completed=int(_number(record, "completed")),
        heartbeat_age_s=round(age, 2), started_at=int(_number(record, "started_at")),
        stalled=_text(record, "stalled"), partitions=int(_number(record, "partitions")),
        active_agents=int(_number(record, "active_agents")),
    )  # fmt: skip


async def read_cluster(client: Any) -> ClusterState:
    """Nodes (live and recently dead), every known capability's queues, and every
    registered agent type's partition owners and backlog."""
    keys, r = client.keys, client.redis
    now = int(time.time() * 1000)
    async with client.errors():
        live = [m.decode() for m in await r.zrange(keys.nodes, 0, -1)]
        dead = [m.decode() for m in await r.zrange(keys.dead_nodes, 0, -1)]
        capabilities = sorted(m.decode() for m in await r.smembers(keys.capabilities))
        pipe = r.pipeline(transaction=False)
        ids = live + [d for d in dead if d not in live]
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        pipe.zcard(keys.delayed)
        pipe.hgetall(keys.stats)
        replies = await pipe.execute()
        records, delayed, stats = replies[: len(ids)], replies[-2], replies[-1]
        queues = [
            await _queue(client, cap, prio, stats, now)
            for cap in capabilities
            for prio in PRIORITIES
        ]
    nodes = tuple(node_info(i, rec, now) for i, rec in zip(ids, records, strict=True) if rec)
    agent_types, ownership = await _agent_plane(client)
    return ClusterState(
        nodes=nodes, queues=tuple(q for q in queues if q), delayed=int(delayed),
        agent_types=agent_types, ownership=ownership,
    )  # fmt: skip


async def _agent_plane(
    client: Any,
) -> tuple[tuple[AgentTypeStatus, ...], tuple[OwnershipChange, ...]]:
    """Per registered type: lease holders (one MGET of its lease keys, whose names the
    partition count gives, so no SCAN of the keyspace) and mailbox backlog (XLEN of
    each mailbox, pipelined); then the latest ownership changes."""
    keys, r = client.keys, client.redis
    types = await client.agent_types()
    async with client.errors():
        # Read, not Client.partitions(): that one fixes the count of a new namespace.
        raw_count = await r.hget(keys.config, "partitions")
        entries = await r.xrevrange(keys.ownership, count=OWNERSHIP_CHANGES_SHOWN)
        partitions = int(raw_count or 0)
        replies: list[Any] = []
        if types and partitions:
            pipe = r.pipeline(transaction=False)
            for name in sorted(types):
                pipe.mget([keys.lease(name, p) for p in range(partitions)])
                for p in range(partitions):
                    pipe.xlen(keys.mailbox(name, p))
            replies = await pipe.execute()
    statuses = []
    for index, name in enumerate(sorted(types)):
        leases, backlog = [], 0
        if replies:
            base = index * (partitions + 1)
            leases, backlog = replies[base], sum(replies[base + 1 : base + 1 + partitions])
        owners: dict[str, int] = {}
        for value in leases:
            if value:  # '<node id> <token>'
                node = value.decode().rsplit(" ", 1)[0]
                owners[node] = owners.get(node, 0) + 1
        info = types[name]
        statuses.append(
            AgentTypeStatus(
                name=name, capabilities=tuple(info.capabilities),
                handles_messages=info.handles_messages, partitions=partitions,
                owners=dict(sorted(owners.items())), unowned=partitions - sum(owners.values()),
                backlog=int(backlog),
            )
        )  # fmt: skip
    return tuple(statuses), tuple(_ownership_change(i, f) for i, f in entries)


def _ownership_change(entry_id: bytes, fields: dict[bytes, bytes]) -> OwnershipChange:
    return OwnershipChange(
        id=entry_id.decode(), type=_text(fields, "type"), partition=int(_number(fields, "p")),
        node=_text(fields, "node"), event=_text(fields, "event"),
        token=int(_number(fields, "token")), at=int(_number(fields, "t")),
    )  # fmt: skip


async def _queue(
    client: Any, capability: str, priority: str, stats: dict[bytes, bytes], now: int
) -> QueueInfo | None:
    keys, r = client.keys, client.redis
    key = keys.queue(capability, priority)
    if not await r.exists(key):
        return None
    pipe = r.pipeline(transaction=False)
    pipe.xlen(key)
    pipe.xrange(key, count=1)
    pipe.xlen(keys.dlq(capability))
    depth, first, dlq = await pipe.execute()
    pending, consumers = 0, 0
    for group in await r.xinfo_groups(key):
        if group["name"] == CONSUMER_GROUP.encode():
            pending, consumers = int(group["pending"]), int(group["consumers"])
    oldest = None
    if first:
        oldest = round(max(0.0, (now - int(first[0][0].split(b"-")[0])) / 1000), 2)
    if priority != "normal" and depth == 0 and not dlq:
        return None  # keep the table short: empty high/low queues are not shown
    return QueueInfo(
        capability=capability, priority=priority, depth=depth, waiting=max(0, depth - pending),
        pending=pending, oldest_age_s=oldest, consumers=consumers, dead_letters=dlq,
        duplicates=int(stats.get(f"duplicates:{capability}".encode(), b"0")),
    )  # fmt: skip
