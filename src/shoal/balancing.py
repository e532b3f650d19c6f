"""Client-side load balancing: which replica of a service serves the next call.

A strategy picks one of the replicas a caller currently considers usable (its
local, current view of the registry: healthy and not behind an open breaker), so a
pick is a few microseconds of Python and no network call. Strategies:

- ``round_robin``: each replica in turn (exact shares).
- ``weighted_round_robin``: nginx's *smooth* weighted round robin — shares follow
  the weights, and a heavy replica's turns are spread out, not bunched together.
- ``random``: weighted random (no state to share; good with many callers).
- ``least_outstanding``: the replica with the fewest calls in flight per unit of
  weight (in-flight counts from ``Load``, released on completion or error).
- ``power_of_two``: two replicas at random, the less loaded per unit of weight — most
  of least-outstanding's benefit at O(1), and no herd on the single idlest replica.
- ``consistent_hash``: by a request key on a ring with virtual nodes (affinity: the
  same conversation reaches the same replica, whose KV cache is warm; when a replica
  leaves, only its keys move).

``ZoneAware`` wraps any of them: replicas in the caller's zone first, the others
when none is left there or all local ones are overloaded.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from cachetools import LRUCache
from uhashring import HashRing

from shoal.errors import ConfigurationError, ShoalError

VNODES = 160  # virtual nodes per unit of weight on the hash ring (ketama's usual)


class NoReplica(ShoalError):
    """No usable replica to pick from (none registered, or all down or open)."""


@dataclass(frozen=True)
class Replica:
    """What a strategy needs to know of a service instance."""

    id: str
    weight: float = 1.0
    zone: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigurationError("a replica needs an id")
        if not self.weight > 0:
            raise ConfigurationError(f"replica {self.id!r}: weight must be > 0, got {self.weight}")


class Load:
    """Calls in flight per replica: taken when a call starts and given back when it
    ends, however it ends (``with load.track(id):``). Counts this process's calls
    exactly; ``set_remote`` adds what the other processes calling the same service
    have in flight (shared through the engine by ``shoal.services``, a fraction of
    a second old), so least-outstanding balances the whole cluster's calls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._remote: dict[str, int] = {}

    def outstanding(self, replica_id: str) -> int:
        return self._in_flight[replica_id] + self._remote.get(replica_id, 0)

    def local(self) -> dict[str, int]:
        """This process's calls in flight, per replica (a copy)."""
        with self._lock:
            return dict(self._in_flight)

    def set_remote(self, counts: dict[str, int]) -> None:
        """The other processes' calls in flight, per replica (replaces the last)."""
        self._remote = counts

    def acquire(self, replica_id: str) -> None:
        with self._lock:
            self._in_flight[replica_id] += 1

    def release(self, replica_id: str) -> None:
        with self._lock:
            if self._in_flight[replica_id] <= 1:
                del self._in_flight[replica_id]
            else:
                self._in_flight[replica_id] -= 1

    @contextmanager
    def track(self, replica_id: str) -> Iterator[None]:
        self.acquire(replica_id)
        try:
            yield
        finally:
            self.release(replica_id)

    def per_weight(self, replica: Replica) -> float:
        return self.outstanding(replica.id) / replica.weight


class Strategy(Protocol):
    """Picks one of ``replicas`` (never empty) for a call, optionally by ``key``."""

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica: ...


def _ordered(replicas: Sequence[Replica]) -> list[Replica]:
    """A stable order: every caller walks the same cycle whatever order its view has."""
    return sorted(replicas, key=lambda r: r.id)


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        ordered = _ordered(replicas)
        return ordered[next(self._turn) % len(ordered)]


class SmoothWeightedRoundRobin:
    """nginx's algorithm: every pick adds each replica's weight to its current
    weight, takes the highest, and subtracts the total from the one taken. Weights
    5, 1, 1 give a a b a c a a — five of seven, spread out."""

    def __init__(self) -> None:
        self._current: dict[str, float] = {}
        self._lock = threading.Lock()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        ordered = _ordered(replicas)
        total = sum(r.weight for r in ordered)
        with self._lock:
            current = {r.id: self._current.get(r.id, 0.0) + r.weight for r in ordered}
            best = max(ordered, key=lambda r: current[r.id])
            current[best.id] -= total
            self._current = current  # a replica that left is forgotten
        return best


class WeightedRandom:
    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        return self._rng.choices(replicas, weights=[r.weight for r in replicas])[0]


class LeastOutstanding:
    """Fewest calls in flight per unit of weight; ties in turn (not always the first,
    which would pile every quiet moment's calls on one replica)."""

    def __init__(self, load: Load) -> None:
        self._load = load
        self._tie = itertools.count()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        ordered = _ordered(replicas)
        least = min(self._load.per_weight(r) for r in ordered)
        idle = [r for r in ordered if self._load.per_weight(r) == least]
        return idle[next(self._tie) % len(idle)]


class PowerOfTwoChoices:
    def __init__(self, load: Load, rng: random.Random | None = None) -> None:
        self._load = load
        self._rng = rng or random.Random()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        if len(replicas) == 1:
            return replicas[0]
        first, second = self._rng.sample(list(replicas), 2)
        return min((first, second), key=self._load.per_weight)


class ConsistentHash:
    """A ketama ring (uhashring: md5 points, the layout memcached clients share) with
    ``VNODES`` virtual nodes per unit of weight. Rings are kept per set of replicas
    (the last ``RINGS`` sets): a retry that excludes the replica tried, or a zone
    spill-over, alternates between sets, and rebuilding a ring costs milliseconds.
    A call without a key goes to a random replica."""

    RINGS = 16

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._rings: LRUCache[frozenset[tuple[str, float]], tuple[HashRing, dict[str, Replica]]]
        self._rings = LRUCache(maxsize=self.RINGS)
        self._lock = threading.Lock()

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        if key is None:
            return self._rng.choice(list(replicas))
        ring, by_id = self._ring_for(replicas)
        return by_id[ring.get_node(key)]

    def _ring_for(self, replicas: Sequence[Replica]) -> tuple[HashRing, dict[str, Replica]]:
        members = frozenset((r.id, r.weight) for r in replicas)
        with self._lock:
            found = self._rings.get(members)
            if found is None:
                nodes = {r.id: {"weight": 1, "vnodes": max(1, round(VNODES * r.weight))}
                         for r in replicas}  # fmt: skip
                found = self._rings[members] = (
                    HashRing(nodes=nodes, hash_fn="ketama"),
                    {r.id: r for r in replicas},
                )
            return found


class ZoneAware:
    """Replicas in ``zone`` first; all of them when the zone has none usable or every
    local one has ``spill_at`` calls in flight or more (then the nearest are busy
    enough that a farther one answers sooner)."""

    def __init__(self, inner: Strategy, zone: str, load: Load, spill_at: int = 32) -> None:
        if spill_at < 1:
            raise ConfigurationError(f"spill_at must be >= 1, got {spill_at}")
        self._inner, self.zone, self._load, self._spill_at = inner, zone, load, spill_at

    def pick(self, replicas: Sequence[Replica], key: str | None = None) -> Replica:
        local = [r for r in replicas if r.zone == self.zone]
        if local and any(self._load.outstanding(r.id) < self._spill_at for r in local):
            return self._inner.pick(local, key)
        return self._inner.pick(replicas, key)


STRATEGIES: dict[str, Callable[[Load], Strategy]] = {
    "round_robin": lambda load: RoundRobin(),
    "weighted_round_robin": lambda load: SmoothWeightedRoundRobin(),
    "random": lambda load: WeightedRandom(),
    "least_outstanding": LeastOutstanding,
    "power_of_two": PowerOfTwoChoices,
    "consistent_hash": lambda load: ConsistentHash(),
}


def make_strategy(name: str, load: Load, zone: str | None = None, spill_at: int = 32) -> Strategy:
    """The strategy called ``name`` (see STRATEGIES), zone-aware if ``zone`` is given."""
    try:
        strategy = STRATEGIES[name](load)
    except KeyError:
        raise ConfigurationError(
            f"unknown balancing strategy {name!r}; use one of {', '.join(STRATEGIES)}"
        ) from None
    return ZoneAware(strategy, zone, load, spill_at) if zone else strategy


def pick(
    strategy: Strategy, replicas: Sequence[Replica], service: str, key: str | None = None
) -> Replica:
    """``strategy``'s pick, or ``NoReplica`` naming the service when there is none."""
    if not replicas:
        raise NoReplica(f"no usable instance of service {service!r} (none up, or all open)")
    return strategy.pick(replicas, key)
