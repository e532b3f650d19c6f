"""Load-balancing strategies over 10,000 picks: the shares each promises, affinity,
what moves when a replica leaves, load-awareness and zones. Pure functions of a
view of replicas: no engine needed (the registry that feeds them is tested apart)."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from shoal.balancing import (
    ConsistentHash,
    LeastOutstanding,
    Load,
    NoReplica,
    PowerOfTwoChoices,
    Replica,
    RoundRobin,
    SmoothWeightedRoundRobin,
    WeightedRandom,
    ZoneAware,
    make_strategy,
    pick,
)
from shoal.errors import ConfigurationError

PICKS = 10_000
A, B, C = Replica("a"), Replica("b"), Replica("c")


def shares(strategy: object, replicas: list[Replica], picks: int = PICKS) -> Counter[str]:
    return Counter(strategy.pick(replicas).id for _ in range(picks))  # type: ignore[attr-defined]


def test_round_robin_is_exact_and_the_same_cycle_in_any_order_of_the_view() -> None:
    strategy = RoundRobin()
    assert shares(strategy, [C, A, B], 9999) == {"a": 3333, "b": 3333, "c": 3333}
    other = RoundRobin()
    assert [other.pick([B, C, A]).id for _ in range(4)] == ["a", "b", "c", "a"]


def test_smooth_weighted_round_robin_follows_weights_and_spreads_turns() -> None:
    heavy = [Replica("a", 5), Replica("b", 1), Replica("c", 1)]
    strategy = SmoothWeightedRoundRobin()
    assert [strategy.pick(heavy).id for _ in range(7)] == list("aabacaa"), "nginx's sequence"
    weights = [Replica("a", 3), Replica("b", 2), Replica("c", 1)]
    counted = shares(SmoothWeightedRoundRobin(), weights, 6000)
    assert counted == {"a": 3000, "b": 2000, "c": 1000}


def test_weighted_random_is_within_two_percent_of_the_weights() -> None:
    replicas = [Replica("a", 2), Replica("b", 1), Replica("c", 1)]
    counted = shares(WeightedRandom(random.Random(7)), replicas)
    for replica in replicas:
        assert abs(counted[replica.id] / PICKS - replica.weight / 4) < 0.02, counted


def test_least_outstanding_prefers_the_idle_replica_and_rotates_ties() -> None:
    load = Load()
    strategy = LeastOutstanding(load)
    for _ in range(3):
        load.acquire("a")
    load.acquire("b")
    assert strategy.pick([A, B, C]).id == "c"
    load.release("b")
    assert {strategy.pick([A, B, C]).id for _ in range(4)} == {"b", "c"}, "ties rotate"
    with load.track("c"), load.track("b"):
        assert load.outstanding("c") == 1
    assert load.outstanding("c") == 0, "released however the call ended"


def test_least_outstanding_sends_most_calls_to_the_fast_replica() -> None:
    """A discrete simulation of uneven latency: 'fast' answers in 1 tick, 'slow' in
    5; each tick three calls arrive and are placed by the strategy."""
    fast, slow = Replica("fast"), Replica("slow")
    load = Load()
    strategy = LeastOutstanding(load)
    ends: list[tuple[int, str]] = []
    placed: Counter[str] = Counter()
    for tick in range(PICKS // 3):
        for end, replica_id in [e for e in ends if e[0] <= tick]:
            load.release(replica_id)
            ends.remove((end, replica_id))
        for _ in range(3):
            chosen = strategy.pick([fast, slow])
            load.acquire(chosen.id)
            ends.append((tick + (1 if chosen is fast else 5), chosen.id))
            placed[chosen.id] += 1
    assert placed["fast"] > 0.7 * sum(placed.values()), placed


def test_power_of_two_choices_avoids_the_loaded_replica() -> None:
    load = Load()
    for _ in range(10):
        load.acquire("b")
        load.acquire("c")
    counted = shares(PowerOfTwoChoices(load, random.Random(3)), [A, B, C])
    assert abs(counted["a"] / PICKS - 2 / 3) < 0.02, "a wins whenever it is drawn"
    assert PowerOfTwoChoices(load).pick([B]).id == "b"


def test_consistent_hash_keeps_a_key_on_its_replica_and_moves_about_one_nth() -> None:
    strategy = ConsistentHash()
    four = [Replica(f"r{i}") for i in range(4)]
    keys = [f"conversation-{i}" for i in range(PICKS)]
    before = {k: strategy.pick(four, k).id for k in keys}
    assert all(strategy.pick(four, k).id == before[k] for k in keys[:500]), "affinity"
    spread = Counter(before.values())
    assert all(abs(n / PICKS - 0.25) < 0.05 for n in spread.values()), spread

    three = [r for r in four if r.id != "r3"]
    after = {k: strategy.pick(three, k).id for k in keys}
    moved = [k for k in keys if after[k] != before[k]]
    assert all(before[k] == "r3" for k in moved), "only the leaving replica's keys move"
    assert abs(len(moved) / PICKS - 0.25) < 0.05, len(moved)

    five = [*four, Replica("r4")]
    grown = {k: strategy.pick(five, k).id for k in keys}
    gained = [k for k in keys if grown[k] != before[k]]
    assert all(grown[k] == "r4" for k in gained), "a new replica only takes keys"
    assert abs(len(gained) / PICKS - 0.2) < 0.05, len(gained)


def test_consistent_hash_weights_and_keyless_calls() -> None:
    strategy = ConsistentHash(random.Random(5))
    weighted = [Replica("big", 3), Replica("small", 1)]
    counted = Counter(strategy.pick(weighted, f"k{i}").id for i in range(PICKS))
    assert abs(counted["big"] / PICKS - 0.75) < 0.05, counted
    assert {strategy.pick(weighted).id for _ in range(50)} == {"big", "small"}


def test_zone_aware_prefers_the_local_zone_then_spills_over() -> None:
    load = Load()
    near_1, near_2 = Replica("near-1", zone="eu"), Replica("near-2", zone="eu")
    far = Replica("far", zone="us")
    strategy = ZoneAware(RoundRobin(), "eu", load, spill_at=2)
    assert shares(strategy, [near_1, near_2, far], 100) == {"near-1": 50, "near-2": 50}
    assert strategy.pick([far]).id == "far", "no local replica usable: spill over"
    for _ in range(2):
        load.acquire("near-1")
        load.acquire("near-2")
    assert "far" in {strategy.pick([near_1, near_2, far]).id for _ in range(3)}, "overloaded"


def test_strategies_by_name_and_clear_errors() -> None:
    load = Load()
    assert isinstance(make_strategy("least_outstanding", load), LeastOutstanding)
    assert isinstance(make_strategy("round_robin", load, zone="eu"), ZoneAware)
    with pytest.raises(ConfigurationError, match="unknown balancing strategy 'fastest'; use"):
        make_strategy("fastest", load)
    with pytest.raises(NoReplica, match="no usable instance of service 'llm'"):
        pick(RoundRobin(), [], "llm")
    with pytest.raises(ConfigurationError, match="weight must be > 0"):
        Replica("x", weight=0)
    with pytest.raises(ConfigurationError, match="spill_at must be >= 1"):
        ZoneAware(RoundRobin(), "eu", load, spill_at=0)


def test_the_example_of_the_docs_runs() -> None:
    text = (Path(__file__).parent.parent / "docs" / "resilience.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "make_strategy" in b)
    namespace: dict[str, object] = {}
    exec(code.replace("...  ", "chosen = replica  "), namespace)
    assert namespace["chosen"] == Replica("vllm-1", weight=2, zone="eu"), "least loaded, eu"
    assert namespace["load"].outstanding("vllm-1") == 0  # type: ignore[attr-defined]
