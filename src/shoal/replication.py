"""Waiting for replicas: the optional ``WAIT`` after submits and results.

Redis replicates asynchronously: a primary acknowledges a write before any replica
has it, so a failover can lose the last writes. ``WAIT n timeout`` blocks until n
replicas have every write made *on the same connection* — so the WAIT is queued in
the same pipeline as the writes (a pipeline runs on one connection; on a Cluster,
one per shard, and one WAIT goes to each shard written). Off by default
(``ack_replicas=0``); docs/scale-out.md says what it costs and what it still
cannot promise (a WAIT that timed out does not undo the write).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from shoal.errors import ReplicationTimeout


def queue_waits(pipe: Any, conn: Any, keys: Sequence[str], replicas: int, timeout_s: float) -> int:
    """Queue one WAIT per shard that ``keys`` live on (one on a single server);
    returns how many were queued (the pipeline's last replies)."""
    timeout_ms = max(1, int(timeout_s * 1000))
    if not isinstance(conn, RedisCluster):
        pipe.execute_command("WAIT", replicas, timeout_ms)
        return 1
    nodes = {}
    for key in keys:
        node = conn.get_node_from_key(key)
        if node is not None:
            nodes[node.name] = node
    for node in nodes.values():
        pipe.execute_command("WAIT", replicas, timeout_ms, target_nodes=node)
    return len(nodes)


def check_acks(replies: Sequence[Any], replicas: int, what: str) -> None:
    """Raise ReplicationTimeout if a WAIT counted fewer replicas than asked."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        if int(reply) < replicas:
            raise ReplicationTimeout(
                f"{what} reached {int(reply)} of {replicas} replica(s) in time: the primary "
                "has it, but a failover now could lose it (check the replicas' health, or "
                "lower ack_replicas / raise ack_timeout)"
            )
