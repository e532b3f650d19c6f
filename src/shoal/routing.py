"""Placement: which partition an agent id falls in, and which node owns a partition.

Both are pure functions of their inputs, identical in every process and every
language that implements them the same way:

- ``partition_of``: CRC-32 (IEEE, as zlib and every standard library compute it)
  of the UTF-8 agent id, modulo the number of partitions. Never Python's
  ``hash()``, which differs per process.
- ``owner_of``: weighted rendezvous (highest-random-weight) hashing. Each node
  scores each partition with ``-weight / ln(u)``, where ``u`` in (0, 1) comes from
  a stable hash of (node, partition); the highest score owns the partition. When
  a node joins or leaves, only the partitions it wins or held move — about
  ``1/n`` of them — and a node with twice the weight owns about twice as many.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Mapping

from shoal.errors import ConfigurationError
from shoal.settings import DEFAULT_PARTITIONS


def partition_of(agent_id: str, partitions: int = DEFAULT_PARTITIONS) -> int:
    """The partition of ``agent_id`` (stable across processes and languages)."""
    if partitions < 1:
        raise ConfigurationError(f"partitions must be >= 1, got {partitions}")
    return zlib.crc32(agent_id.encode("utf-8")) % partitions


def _unit(node_id: str, partition: int) -> float:
    """A stable pseudo-random number in (0, 1) for a (node, partition) pair."""
    digest = hashlib.blake2b(f"{node_id}\x00{partition}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 1)


def score(node_id: str, weight: float, partition: int) -> float:
    """The node's rendezvous score for the partition (higher wins)."""
    return -weight / math.log(_unit(node_id, partition))


def owner_of(partition: int, nodes: Mapping[str, float]) -> str | None:
    """The node (id -> weight) that owns ``partition``, or None if there is none.
    Ties — practically impossible — go to the smaller node id."""
    best: tuple[float, str] | None = None
    for node_id, weight in nodes.items():
        if weight <= 0:
            continue
        candidate = (score(node_id, weight, partition), node_id)
        if (
            best is None
            or candidate[0] > best[0]
            or (candidate[0] == best[0] and candidate[1] < best[1])
        ):
            best = candidate
    return best[1] if best else None


def assignment(partitions: int, nodes: Mapping[str, float]) -> dict[int, str]:
    """Every partition's owner among ``nodes`` (empty if there are no nodes)."""
    owners = {p: owner_of(p, nodes) for p in range(partitions)}
    return {p: o for p, o in owners.items() if o is not None}
