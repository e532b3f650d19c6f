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
        ids, more = await _newest_ids(client, position, min(budget, max(limit * 2, 100)))
        budget -= len(ids)
        for task_id, record in await _matching(client, ids, capability, status):
            found.append(protocol.task_info_from_record(task_id, record))
            if len(found) == limit:
                return TaskPage(tuple(found), task_id)
        if ids:
            position = ids[-1]
        if not more:  # the index has nothing older
            return TaskPage(tuple(found), None)
    return TaskPage(tuple(found), position)


async def _newest_ids(client: Any, below: str | None, count: int) -> tuple[list[str], bool]:
    """About ``count`` ids older than ``below``, newest first, merged over the groups,
    and whether older ones may remain. Each group is asked for its share only (plus
    a margin), so a page costs the same with 1 group or 256: the merge keeps the ids
    down to the newest last-fetched id of a group that had more — below it, that
    group's next ids are unknown yet, so they wait for the next round."""
    groups = client.keys.groups
    share = min(count, -(-count // groups) + 16)
    top = f"({below}" if below else "+"
    async with client.errors():
        pipe = client.redis.pipeline(transaction=False)
        for group in range(groups):
            pipe.zrange(
                client.keys.task_index(group), top, "-", desc=True, bylex=True,
                offset=0, num=share,
            )  # fmt: skip
        per_group: list[list[bytes]] = await pipe.execute()
    cut_off = max((ids[-1] for ids in per_group if len(ids) == share), default=None)
    merged = heapq.merge(*per_group, reverse=True)
    ids = [m.decode() for m in merged if cut_off is None or m >= cut_off][:count]
    return ids, cut_off is not None or len(ids) == count


async def _matching(
    client: Any, ids: list[str], capability: str | None, status: str | None
) -> list[tuple[str, dict[bytes, bytes]]]:
    """The records of those ids that exist and match. With a filter, two fields are
    read first and whole records (arguments, results, errors) only of the matches."""
    filters = (capability, status)
    if capability is not None or status is not None:
        async with client.errors():
            pipe = client.redis.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(client.keys.task(task_id), "cap", "status")
            fields: list[list[bytes | None]] = await pipe.execute()
        ids = [
            task_id
            for task_id, (cap, stat) in zip(ids, fields, strict=True)
            if cap is not None and _matches({b"cap": cap, b"status": stat or b""}, *filters)
        ]
    if not ids:
        return []
    async with client.errors():
        pipe = client.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(client.keys.task(task_id))
        records: list[dict[bytes, bytes]] = await pipe.execute()
    return [(t, r) for t, r in zip(ids, records, strict=True) if r and _matches(r, *filters)]


def _matches(record: dict[bytes, bytes], capability: str | None, status: str | None) -> bool:
    if capability is not None and record.get(b"cap") != capability.encode():
        return False
    return status is None or record.get(b"status") == status.encode()
