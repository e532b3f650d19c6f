"""What the cluster looks like right now: nodes, queues and agent types
(``Client.cluster()``, ``shoal status``). Read-only; built from the node records,
the streams, the partition leases and the ownership log."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster

from shoal.keys import CONSUMER_GROUP, PRIORITIES, slot_of

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
    metrics_port: int | None = None  # where it serves /metrics (on its host), if it does


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


class KeyGroup(msgspec.Struct, frozen=True):
    """Where one hash-tag group of the namespace lives (see shoal.keys)."""

    group: int
    tag: str
    slot: int
    shard: str = ""  # on a Cluster: host:port of the primary serving the slot


class ClusterState(msgspec.Struct, frozen=True):
    nodes: tuple[NodeInfo, ...]
    queues: tuple[QueueInfo, ...]
    delayed: int
    agent_types: tuple[AgentTypeStatus, ...] = ()
    ownership: tuple[OwnershipChange, ...] = ()  # newest first
    key_groups: tuple[KeyGroup, ...] = ()


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
        metrics_port=int(_number(record, "metrics_port")) or None,
    )  # fmt: skip


async def read_cluster(client: Any) -> ClusterState:
    """Nodes (live and recently dead), every known capability's queues, every
    registered agent type's partition owners and backlog, and where the key groups
    live. Per-group keys (queues, delayed tasks, counters) are summed over groups."""
    keys, r = client.keys, client.redis
    groups = range(keys.groups)
    now = int(time.time() * 1000)
    async with client.errors():
        live = [m.decode() for m in await r.zrange(keys.nodes, 0, -1)]
        dead = [m.decode() for m in await r.zrange(keys.dead_nodes, 0, -1)]
        capabilities = sorted(m.decode() for m in await r.smembers(keys.capabilities))
        pipe = r.pipeline(transaction=False)
        ids = live + [d for d in dead if d not in live]
        for node_id in ids:
            pipe.hgetall(keys.node(node_id))
        for group in groups:
            pipe.zcard(keys.delayed(group))
        for group in groups:
            pipe.hgetall(keys.stats(group))
        replies = await pipe.execute()
        records = replies[: len(ids)]
        delayed = sum(replies[len(ids) : len(ids) + keys.groups])
        stats = _sum_counters(replies[len(ids) + keys.groups :])
        queues = [
            await _queue(client, cap, prio, stats, now)
            for cap in capabilities
            for prio in PRIORITIES
        ]
    nodes = tuple(node_info(i, rec, now) for i, rec in zip(ids, records, strict=True) if rec)
    agent_types, ownership = await _agent_plane(client)
    return ClusterState(
        nodes=nodes, queues=tuple(q for q in queues if q), delayed=int(delayed),
        agent_types=agent_types, ownership=ownership, key_groups=key_groups(client),
    )  # fmt: skip


def key_groups(client: Any) -> tuple[KeyGroup, ...]:
    """Each key group's tag and slot, and on a Cluster the primary serving it."""
    keys, conn = client.keys, client.redis
    out = []
    for group, tag in enumerate(keys.tags):
        shard = ""
        if isinstance(conn, RedisCluster):
            node = conn.get_node_from_key(keys.delayed(group))
            shard = node.name if node is not None else "?"
        out.append(KeyGroup(group=group, tag=tag, slot=slot_of(tag), shard=shard))
    return tuple(out)


def _sum_counters(hashes: list[dict[bytes, bytes]]) -> dict[bytes, bytes]:
    total: dict[bytes, int] = {}
    for counters in hashes:
        for name, value in counters.items():
            total[name] = total.get(name, 0) + int(value)
    return {name: str(value).encode() for name, value in total.items()}


async def _agent_plane(
    client: Any,
) -> tuple[tuple[AgentTypeStatus, ...], tuple[OwnershipChange, ...]]:
    """Per registered type: lease holders (GETs of its lease keys, whose names the
    partition count gives, so no SCAN of the keyspace) and mailbox backlog (XLEN of
    each mailbox, pipelined); then the latest ownership changes of every group."""
    keys, r = client.keys, client.redis
    types = await client.agent_types()
    async with client.errors():
        # Read, not Client.partitions(): that one fixes the count of a new namespace.
        raw_count = await r.hget(keys.config, "partitions")
        pipe = r.pipeline(transaction=False)
        for group in range(keys.groups):
            pipe.xrevrange(keys.ownership(group), count=OWNERSHIP_CHANGES_SHOWN)
        logs = await pipe.execute()
        partitions = int(raw_count or 0)
        replies: list[Any] = []
        if types and partitions:
            pipe = r.pipeline(transaction=False)
            for name in sorted(types):
                for p in range(partitions):
                    pipe.get(keys.lease(name, p))  # not MGET: partitions span slots
                for p in range(partitions):
                    pipe.xlen(keys.mailbox(name, p))
            replies = await pipe.execute()
    statuses = []
    for index, name in enumerate(sorted(types)):
        leases, backlog = [], 0
        if replies:
            base = index * 2 * partitions
            leases = replies[base : base + partitions]
            backlog = sum(replies[base + partitions : base + 2 * partitions])
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
    entries = sorted((e for log in logs for e in log), key=_entry_order, reverse=True)
    changes = tuple(_ownership_change(i, f) for i, f in entries[:OWNERSHIP_CHANGES_SHOWN])
    return tuple(statuses), changes


def _entry_order(entry: tuple[bytes, Any]) -> tuple[int, ...]:
    return tuple(int(x) for x in entry[0].split(b"-"))


def _ownership_change(entry_id: bytes, fields: dict[bytes, bytes]) -> OwnershipChange:
    return OwnershipChange(
        id=entry_id.decode(), type=_text(fields, "type"), partition=int(_number(fields, "p")),
        node=_text(fields, "node"), event=_text(fields, "event"),
        token=int(_number(fields, "token")), at=int(_number(fields, "t")),
    )  # fmt: skip


async def _queue(
    client: Any, capability: str, priority: str, stats: dict[bytes, bytes], now: int
) -> QueueInfo | None:
    """One capability and priority, summed over the key groups' streams."""
    keys, r = client.keys, client.redis
    depth = pending = consumers = dlq = 0
    oldest: float | None = None
    seen = False
    for group in range(keys.groups):
        key = keys.queue(capability, priority, group)
        if not await r.exists(key):
            continue
        seen = True
        pipe = r.pipeline(transaction=False)
        pipe.xlen(key)
        pipe.xrange(key, count=1)
        pipe.xlen(keys.dlq(capability, group))
        length, first, dead = await pipe.execute()
        depth, dlq = depth + length, dlq + dead
        for info in await r.xinfo_groups(key):
            if info["name"] == CONSUMER_GROUP.encode():
                pending += int(info["pending"])
                consumers = max(consumers, int(info["consumers"]))
        if first:
            age = round(max(0.0, (now - int(first[0][0].split(b"-")[0])) / 1000), 2)
            oldest = age if oldest is None else max(oldest, age)
    if not seen:
        return None
    if priority != "normal" and depth == 0 and not dlq:
        return None  # keep the table short: empty high/low queues are not shown
    return QueueInfo(
        capability=capability, priority=priority, depth=depth, waiting=max(0, depth - pending),
        pending=pending, oldest_age_s=oldest, consumers=consumers, dead_letters=dlq,
        duplicates=int(stats.get(f"duplicates:{capability}".encode(), b"0")),
    )  # fmt: skip
