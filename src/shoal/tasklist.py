"""Listing tasks, newest first, filtered by capability and status, one page at a time.

Each key group keeps an index of its task ids (``Keys.task_index``: a sorted set whose
members sort by creation time, because ids start with it in hex). A page merges the
groups' indexes from the cursor down, reads the records of a bounded number of ids
and keeps those that match. The index covers the retention period (submit.lua trims
older ids); a task still pending after that is reachable by id, not by listing.

Filters are applied to records, not kept as separate indexes: listing is an
operator's and a dashboard's view, while every extra index would cost every submit a
write — the path that has to stay fast.
"""

from __future__ import annotations

import heapq
from typing import Any

import msgspec

from shoal import protocol
from shoal.errors import ConfigurationError
from shoal.keys import validate_capability

MAX_LIMIT = 1000
SCAN_FACTOR = 20  # a page reads at most this many ids per task asked for ...
SCAN_CAP = 20_000  # ... and never more than this many, whatever the filters


class TaskPage(msgspec.Struct, frozen=True):
    """One page of a listing. ``next`` continues it (None: nothing older is left);
    with narrow filters a page may hold fewer tasks than asked for and still have a
    ``next`` — the scan stops after a bounded number of ids to keep a call short."""

    tasks: tuple[protocol.TaskInfo, ...]
    next: str | None = None


def validate_query(
    capability: str | None, status: str | None, limit: int, cursor: str | None
) -> None:
    if capability is not None:
        validate_capability(capability)
    if status is not None and status not in protocol.STATUSES:
        raise ConfigurationError(f"status {status!r} is not one of: {', '.join(protocol.STATUSES)}")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigurationError(f"limit must be within 1..{MAX_LIMIT}, got {limit!r}")
    if cursor is not None:
        protocol.validate_task_id(cursor)


async def list_tasks(
    client: Any,
    *,
    capability: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> TaskPage:
    """The newest tasks older than ``cursor`` (a task id; None: from the newest)."""
    validate_query(capability, status, limit, cursor)
    budget = min(SCAN_CAP, limit * SCAN_FACTOR)
    found: list[protocol.TaskInfo] = []
    position = cursor
    while len(found) < limit and budget > 0:
        wanted = min(budget, max(limit * 2, 100))
        ids = await _newest_ids(client, position, wanted)
        budget -= len(ids)
        for task_id, record in zip(ids, await _records(client, ids), strict=True):
            position = task_id
            if record and _matches(record, capability, status):
                found.append(protocol.task_info_from_record(task_id, record))
                if len(found) == limit:
                    return TaskPage(tuple(found), position)
        if len(ids) < wanted:  # the index has nothing older
            return TaskPage(tuple(found), None)
    return TaskPage(tuple(found), position)


async def _newest_ids(client: Any, below: str | None, count: int) -> list[str]:
    """Up to ``count`` ids older than ``below``, newest first, merged over the groups."""
    top = f"({below}" if below else "+"
    async with client.errors():
        pipe = client.redis.pipeline(transaction=False)
        for group in range(client.keys.groups):
            pipe.zrange(
                client.keys.task_index(group), top, "-", desc=True, bylex=True,
                offset=0, num=count,
            )  # fmt: skip
        per_group: list[list[bytes]] = await pipe.execute()
    merged = heapq.merge(*per_group, reverse=True)
    return [member.decode() for _, member in zip(range(count), merged, strict=False)]


async def _records(client: Any, ids: list[str]) -> list[dict[bytes, bytes]]:
    async with client.errors():
        pipe = client.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(client.keys.task(task_id))
        records: list[dict[bytes, bytes]] = await pipe.execute()
    return records


def _matches(record: dict[bytes, bytes], capability: str | None, status: str | None) -> bool:
    if capability is not None and record.get(b"cap") != capability.encode():
        return False
    return status is None or record.get(b"status") == status.encode()
