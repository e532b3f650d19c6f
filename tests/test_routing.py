"""Placement functions: stable, balanced, and moving little when nodes come and go."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest

from shoal import ConfigurationError
from shoal.routing import assignment, owner_of, partition_of


def test_partition_is_stable_across_processes() -> None:
    ids = ["researcher/alice", "player/42", "chat/ü-ñ"]
    here = [partition_of(i) for i in ids]
    code = f"from shoal.routing import partition_of; print([partition_of(i) for i in {ids!r}])"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert there.stdout.strip() == str(here)


def test_partition_hash_is_standard_crc32_so_other_languages_can_match() -> None:
    assert partition_of("123456789", 2**32) == 0xCBF43926  # the CRC-32 check value


def test_partitions_spread_agent_ids_evenly() -> None:
    counts = collections.Counter(partition_of(f"user/{i}") for i in range(256_000))
    assert len(counts) == 256
    assert min(counts.values()) > 800 and max(counts.values()) < 1200  # ~1000 each


def test_owner_is_deterministic_and_balanced() -> None:
    nodes = {"a": 1.0, "b": 1.0, "c": 1.0}
    owners = assignment(256, nodes)
    assert owners == assignment(256, dict(reversed(list(nodes.items()))))
    per_node = collections.Counter(owners.values())
    assert all(60 <= n <= 110 for n in per_node.values()), per_node


def test_a_joining_node_moves_only_its_share() -> None:
    before = assignment(256, {"a": 1.0, "b": 1.0})
    after = assignment(256, {"a": 1.0, "b": 1.0, "c": 1.0})
    moved = [p for p in before if before[p] != after[p]]
    assert all(after[p] == "c" for p in moved), "partitions only move to the newcomer"
    assert 256 / 3 * 0.7 < len(moved) < 256 / 3 * 1.3


def test_a_leaving_node_hands_only_its_partitions_over() -> None:
    before = assignment(256, {"a": 1.0, "b": 1.0, "c": 1.0})
    after = assignment(256, {"a": 1.0, "b": 1.0})
    assert all(after[p] == before[p] for p in before if before[p] != "c")


def test_weight_skews_ownership() -> None:
    per_node = collections.Counter(assignment(3000, {"big": 2.0, "small": 1.0}).values())
    assert 1.6 < per_node["big"] / per_node["small"] < 2.5


def test_no_nodes_means_no_owner() -> None:
    assert owner_of(7, {}) is None
    assert owner_of(7, {"gone": 0.0}) is None
    assert assignment(4, {}) == {}


def test_partitions_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="partitions must be >= 1"):
        partition_of("a/b", 0)


def test_agent_ids_parse_and_print() -> None:
    from shoal.protocol import AgentId

    agent = AgentId.parse("researcher/alice@example.com")
    assert (agent.type, agent.key) == ("researcher", "alice@example.com")
    assert str(agent) == "researcher/alice@example.com"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice", "is not 'type/key'"),
        ("Researcher/alice", "must be snake_case"),
        ("researcher/", "key '' must be 1-200 characters"),
        ("researcher/has space", "key 'has space'"),
        ("researcher/a/b", "key 'a/b'"),
    ],
)
def test_malformed_agent_ids_say_what_is_wrong(text: str, message: str) -> None:
    from shoal.protocol import AgentId

    with pytest.raises(ConfigurationError, match=message):
        AgentId.parse(text)
