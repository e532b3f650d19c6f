"""Engine URL forms: standalone, Cluster seed lists and Sentinel groups."""

from __future__ import annotations

import pytest

from shoal.addresses import mask_url, parse
from shoal.errors import ConfigurationError
from shoal.keys import Keys, group_tags, slot_of


def test_plain_urls_are_standalone() -> None:
    for url in ("redis://h:1/0", "rediss://:pw@h:1", "unix:///tmp/s.sock?db=0"):
        assert parse(url).kind == "standalone"


def test_a_cluster_url_lists_seed_nodes_and_credentials() -> None:
    address = parse("redis+cluster://user:p%40ss@10.0.0.1:7000,10.0.0.2:7001")
    assert address.kind == "cluster"
    assert address.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (address.username, address.password, address.tls) == ("user", "p@ss", False)
    assert parse("rediss+cluster://h:1").tls


def test_a_sentinel_url_names_its_service_database_and_sentinel_password() -> None:
    address = parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2?sentinel_password=sp")
    assert address.kind == "sentinel"
    assert address.hosts == (("s1", 26379), ("s2", 26380))
    assert (address.service, address.db, address.password) == ("mymaster", 2, "pw")
    assert address.sentinel_password == "sp"
    assert "sp" not in repr(address) and "pw" not in repr(address)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://s1:26379", "name the Sentinel service"),
        ("redis+sentinel://s1:26379/a/b/c", "name the Sentinel service"),
        ("redis+sentinel://s1:26379/svc/x", "database 'x' is not a number"),
        ("redis+cluster://h:1/3", "a Cluster has only database 0"),
        ("redis+cluster://h", "'h' is not host:port"),
        ("redis+cluster://:pw@h:1,:2", "':2' is not host:port"),
        ("redis+cluster://h:notaport", "is not host:port"),
        ("localhost:6379", "is not a URL"),
        ("memcached://h:1", "has scheme 'memcached'"),
    ],
)
def test_bad_urls_say_what_is_wrong_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigurationError, match=says) as caught:
        parse(url)
    assert "pw" not in str(caught.value).replace("password", "")


def test_passwords_are_masked_in_every_form() -> None:
    assert mask_url("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("redis+cluster://u:s3cret@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    assert mask_url("redis+sentinel://:s3cret@a:1/svc") == "redis+sentinel://:***@a:1/svc"
    assert mask_url("redis://h:1") == "redis://h:1"


def test_key_groups_spread_evenly_over_the_slot_range() -> None:
    """Each group's tag falls in its own 1/n stripe of the 16384 slots (measured from
    group 0's), so shards owning equal slot ranges get equal shares of the groups."""
    for groups in (1, 3, 16, 256):
        tags = group_tags("orders", groups)
        assert len(set(tags)) == groups and tags[0] == "orders"
        base = slot_of("orders")
        stripes = [(slot_of(t) - base) % 16384 * groups // 16384 for t in tags]
        assert stripes == list(range(groups))


def test_task_ids_and_partitions_name_their_group() -> None:
    keys = Keys("orders", 16)
    for group in range(16):
        task_id = keys.new_task_id(group)
        assert keys.task_group(task_id) == group and len(task_id) == 28
        assert keys.task(task_id).startswith(keys.group_prefix(group))
    assert keys.mailbox("t", 37).startswith(keys.group_prefix(37 % 16))
    assert keys.lease("t", 37).startswith(keys.group_prefix(37 % 16))
    assert Keys("orders").task(keys.new_task_id(5)).startswith("shoal:{orders}:")


def test_group_counts_out_of_range_are_refused() -> None:
    for bad in (0, 257, True, 2.0):
        with pytest.raises(ConfigurationError, match="hash tag groups"):
            Keys("x", bad)  # type: ignore[arg-type]


async def test_unreachable_clusters_and_sentinels_are_one_clear_error() -> None:
    """Nothing listens on port 1: each topology says it cannot reach the engine, with
    the masked URL, and never dumps redis-py's internals."""
    from shoal import Client
    from shoal.errors import EngineUnavailable

    for url, says in (
        (
            "redis+cluster://:pw@127.0.0.1:1",
            r"cannot reach the engine at redis\+cluster://:\*\*\*@",
        ),
        ("redis+sentinel://127.0.0.1:1/svc", "no Sentinel there names a primary"),
    ):
        with pytest.raises(EngineUnavailable, match=says) as caught:
            async with Client(url, namespace="t"):
                pass
        assert "ConnectionPool" not in str(caught.value) and ":pw@" not in str(caught.value)
