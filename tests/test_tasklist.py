"""Listing tasks: newest first over every key group, filtered, paginated, and
trimmed to the retention period."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from shoal import Client, ConfigurationError, Settings, protocol

from .agents import Toolbox
from .conftest import eventually, running_node


@pytest.mark.topology
async def test_pages_cover_every_task_once_newest_first_with_filters(
    client: Client, settings: Settings
) -> None:
    handles = [await client.submit("echo" if i % 3 else "add", a=i, b=1) for i in range(40)]
    async with running_node([Toolbox], settings):
        adds = [h for i, h in enumerate(handles) if i % 3 == 0]
        for h in adds:
            await h.result(timeout=20)
        seen: list[str] = []
        cursor = None
        while True:
            page = await client.list_tasks(limit=7, cursor=cursor)
            assert len(page.tasks) <= 7
            seen += [t.id for t in page.tasks]
            cursor = page.next
            if cursor is None:
                break
        assert seen == sorted((h.id for h in handles), reverse=True)

        page = await client.list_tasks(capability="add", status="succeeded", limit=100)
        assert [t.id for t in page.tasks] == sorted((h.id for h in adds), reverse=True)
        assert all(t.capability == "add" and t.status == "succeeded" for t in page.tasks)
        assert page.next is None


async def test_bad_listing_arguments_are_refused_with_the_reason(client: Client) -> None:
    with pytest.raises(ConfigurationError, match="status 'done' is not one of"):
        await client.list_tasks(status="done")
    with pytest.raises(ConfigurationError, match="limit must be within"):
        await client.list_tasks(limit=0)
    with pytest.raises(ConfigurationError, match="capability name"):
        await client.list_tasks(capability="no spaces")


async def test_the_index_forgets_tasks_older_than_the_retention(settings: Settings) -> None:
    async with Client(settings=settings.with_(retention=0.5)) as short:
        old = await short.submit("echo", value=1)

        async def old_trimmed() -> bool:
            await short.submit("echo", value=2)  # each submit trims the index
            ids = [t.id for t in (await short.list_tasks(limit=1000)).tasks]
            return old.id not in ids

        await eventually(old_trimmed, "the old id trimmed from the index", timeout=10, interval=0.1)
        index = short.keys.task_index(short.keys.task_group(old.id))
        assert await short.redis.zscore(index, old.id) is None


async def test_pages_are_exact_when_the_groups_hold_very_different_numbers(
    settings: Settings,
) -> None:
    """One group holds most tasks (a submit_many chunk stays in one group), so a
    page's share per group runs out there first: ids below its last one must wait
    for the next round, not be skipped."""
    async with Client(settings=settings.with_(key_groups=8)) as grouped:
        handles = await grouped.submit_many("echo", [{"value": i} for i in range(300)])
        handles += [await grouped.submit("echo", value=i) for i in range(20)]
        assert len({grouped.keys.task_group(h.id) for h in handles}) > 4
        for limit, status in ((7, None), (50, "queued")):
            seen: list[str] = []
            cursor = None
            while True:
                page = await grouped.list_tasks(limit=limit, status=status, cursor=cursor)
                seen += [t.id for t in page.tasks]
                if (cursor := page.next) is None:
                    break
            assert seen == sorted((h.id for h in handles), reverse=True)


def test_ids_made_in_one_process_sort_in_the_order_they_were_made() -> None:
    """Many ids share a millisecond: they still sort as made (newest-first listings
    rely on it), and stay unique when made from several threads at once."""
    ids = [protocol.new_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert len({i[:12] for i in ids}) < len(ids), "some shared a millisecond"
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda _: protocol.new_id(), range(4000)))
    assert len(set(made)) == len(made)
    assert all(protocol.validate_task_id(i) == i for i in made[:10])
