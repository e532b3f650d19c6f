"""The whole key schema, in one place.

A namespace's keys spread over ``groups`` hash tags (fixed when the namespace is
first used: 1 on a standalone server or Sentinel group, 16 on a Cluster). Every key
that a Lua script, MULTI or multi-key command touches together shares one tag, so
every such operation runs inside one hash slot — on one shard of a Cluster:

* the **control** keys (nodes, capabilities, agent types, the directory) live
  under ``shoal:{<namespace>}:`` — group 0's prefix;
* a **task** lives in the group its id names (``task_group``): its record, its
  events, the queue entry that carries it, the delayed set, the dead letters, the
  submitter's reply inbox (one per group), the idempotency key that found it;
* an **agent partition** p lives in group ``p % groups``: its mailbox, its lease,
  its fencing tokens and its agents' state — and tasks addressed to its agents.

With one group every key shares the namespace's tag (one slot). With more, group
g's tag ``<namespace>/<n>`` is chosen so that each group's slot lies in its own
1/groups stripe of the 16,384 slots: a Cluster whose shards own equal slot ranges
gets a near-equal share of the groups (``shoal status`` shows the spread).

| key                         | group   | type        | holds                                |
|-----------------------------|---------|-------------|--------------------------------------|
| task:<id>                   | task's  | hash        | the task record (TaskInfo reads it)  |
| events:<id>                 | task's  | stream      | the task's events; 'done' ends it if |
|                             |         |             | it emitted events or a client        |
|                             |         |             | follows it                           |
| queue:<capability>:<prio>   | each    | stream      | ids of queued tasks; consumer group  |
|                             |         |             | "nodes"                              |
| delayed                     | each    | sorted set  | task id -> due time (ms)             |
| dlq:<capability>            | each    | stream      | dead tasks: id, reason               |
| idem:<key>                  | key's   | string      | task id for an idempotency key (TTL) |
| capability:<name>           | each    | hash        | per-capability settings published by |
|                             |         |             | nodes (a copy in every group)        |
| stats                       | each    | hash        | counters, e.g. duplicates:<cap>      |
| inbox:<client id>           | each    | list        | '<id> <status> <outcome>' of finished|
|                             |         |             | tasks the client waits for           |
| cancel                      | each    | shard chan. | ids of tasks whose cancellation was  |
|                             |         |             | asked (SPUBLISH)                     |
| mailbox:<type>:<p>          | p's     | stream      | partition p's messages and addressed |
|                             |         |             | tasks; deleted once processed        |
| lease:<type>:<p>            | p's     | string      | '<node id> <token>' of the owner (PX)|
| lease_tokens                | each    | hash        | '<type>:<p>' -> last token issued    |
| state:<type>:<p>            | p's     | hash        | agent id -> msgpack state            |
| hosts:<capability>          | control | sorted set  | node id -> last heartbeat (ms)       |
| capabilities                | control | set         | every capability any node hosted     |
| nodes                       | control | sorted set  | live node id -> last heartbeat (ms)  |
| node:<id>                   | control | hash        | node description, load, state        |
| dead_nodes                  | control | sorted set  | node id -> when declared dead        |
| config                      | control | hash        | fixed at creation: partitions, groups|
| agent_types                 | control | hash        | agent type -> description (msgpack)  |
| agent_hosts:<type>          | control | sorted set  | node id -> last heartbeat            |
| active:<node>               | control | hash        | agent id -> [activated, last message]|
| subscribers:<topic>         | control | set         | agent types subscribed to the topic  |
| ownership                   | each    | stream      | partition ownership changes (capped) |
| broadcast                   | control | shard chan. | messages for every active agent of a |
|                             |         |             | type (SPUBLISH)                      |
| apikeys                     | control | hash        | API key id -> msgpack record: name,  |
|                             |         |             | scopes, limits, sha256 of the secret |
|                             |         |             | (never the secret itself)            |
| ratelimit:<name>:<key>      | control | hash        | a token bucket: tokens, ts (engine   |
|                             |         |             | ms); PX the time to refill to full   |
| ratewindow:<name>:<key>     | control | sorted set  | a sliding window log: one member per |
|                             |         |             | admitted call, score = engine ms     |
| llmquota:<provider>:<kind>  | control | sorted set  | a provider's quota window: request id|
|                             |         |             | -> engine ms when admitted           |
| llmquota_amounts:<p>:<kind> | control | hash        | request id -> tokens it counts for   |
| llmquota_total:<p>:<kind>   | control | string      | the sum of the amounts in the window |
| services                    | control | set         | names of registered services         |
| service:<name>              | control | hash        | instance id -> msgpack record        |
| service_ttl:<name>          | control | sorted set  | instance id -> expiry (engine ms);   |
|                             |         |             | static instances are absent          |
| service_health:<name>       | control | hash        | instance id -> JSON health: breaker, |
|                             |         |             | window counts, probe verdict         |
| service_probes              | control | hash        | service -> msgpack probe settings    |
| service_load:<name>         | control | hash        | process id -> msgpack calls in flight|
|                             |         |             | per instance, with a timestamp       |
| services_changed            | control | shard chan. | a service whose view changed         |
| lock:<name>                 | control | string      | the holder: "<token> <holder>" (PX)  |
| lock_fence:<name>           | control | string      | the lock's last fencing token (INCR; |
|                             |         |             | never expires: tokens only grow)     |
| lock_wake:<name>            | control | list        | one wake-up for waiters, pushed on   |
|                             |         |             | release (PX: a stale one is harmless)|
| cache:<name>:<key>          | control | string      | a cache entry: format byte + msgpack |
|                             |         |             | (zlib when large); PX the cache's ttl|
| cache_fill:<name>:<key>     | control | string      | get_or_set's fill lease: the holder  |
|                             |         |             | computing the value (PX, renewed)    |
| cache_seq                   | control | string      | the last cache write's number (INCR) |
| cache_changed               | control | shard chan. | "<seq> " + msgpack [writer, cache,   |
|                             |         |             | keys]: drop older local copies       |
| live_config                 | control | hash        | setting key -> "<version>\n<at ms>\n |
|                             |         |             | <by>\n<JSON value>" (live settings)  |
| live_config_version         | control | string      | the last config version (INCR)       |
| live_config_history         | control | stream      | every change: key, version, op,      |
|                             |         |             | value, by, at (capped)               |
| live_config_changed         | control | shard chan. | "<version> <key>" of each change     |
| saga:<id>                   | control | hash        | a saga's summary: name, status,      |
|                             |         |             | definition, current step, token,     |
|                             |         |             | each step's status and task ids      |
| saga_log:<id>               | control | stream      | the saga's durable log: one entry per|
|                             |         |             | transition (the runner's truth)      |
| sagas                       | control | sorted set  | saga id -> created (ms), for listing |
| sagas_active                | control | sorted set  | saga id -> created (ms): the sagas a |
|                             |         |             | runner must drive                    |
| saga_wake                   | control | stream      | a saga that needs a runner now       |
|                             |         |             | (capped; read by every SagaRunner)   |
"""

from __future__ import annotations

import functools
import re
import zlib

from redis.crc import key_slot

from shoal.errors import ConfigurationError
from shoal.protocol import new_id

PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
CONSUMER_GROUP = "nodes"

_CAPABILITY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")


def validate_capability(name: str) -> str:
    """Capability names become key parts, so they are kept to a safe alphabet."""
    if not isinstance(name, str) or not _CAPABILITY_RE.match(name):
        raise ConfigurationError(
            f"capability name {name!r} is invalid: start with a letter or '_', then up to "
            "127 letters, digits, '_', '.' or '-'"
        )
    return name


def validate_priority(priority: str) -> str:
    if priority not in PRIORITIES:
        allowed = ", ".join(PRIORITIES)
        raise ConfigurationError(f"priority {priority!r} is invalid: use one of {allowed}")
    return priority


SLOTS = 16384  # Redis Cluster's hash slots
MAX_GROUPS = 256
CLUSTER_GROUPS = 16  # the default on a Cluster: enough to spread over a few dozen shards


def validate_groups(groups: int) -> int:
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= MAX_GROUPS:
        raise ConfigurationError(
            f"hash tag groups must be a whole number from 1 to {MAX_GROUPS}, got {groups!r}"
        )
    return groups


@functools.lru_cache(maxsize=64)
def group_tags(namespace: str, groups: int) -> tuple[str, ...]:
    """The hash tag of each group: the namespace itself for group 0, then tags
    ``<namespace>/<n>`` whose slots fall one in each of ``groups`` equal stripes of
    the slot range (measured from group 0's slot), so the groups spread evenly over
    shards that own equal slot ranges. Found by trying n = 0, 1, 2, …: about
    groups·ln(groups) CRC16s, once per process."""
    validate_groups(groups)
    base = key_slot(namespace.encode())
    tags: list[str | None] = [namespace] + [None] * (groups - 1)
    missing, n = groups - 1, 0
    while missing:
        tag = f"{namespace}/{n}"
        stripe = (key_slot(tag.encode()) - base) % SLOTS * groups // SLOTS
        if tags[stripe] is None:
            tags[stripe] = tag
            missing -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def slot_of(tag: str) -> int:
    return key_slot(tag.encode())


class Keys:
    """Key names for one namespace spread over ``groups`` hash tags."""

    def __init__(self, namespace: str, groups: int = 1) -> None:
        self.namespace = namespace
        self.groups = validate_groups(groups)
        self.tags = group_tags(namespace, groups)
        self.prefixes = tuple(f"shoal:{{{tag}}}:" for tag in self.tags)
        self.prefix = self.prefixes[0]  # the control keys' prefix (and group 0's)

    # --- groups ----------------------------------------------------------------------

    def task_group(self, task_id: str) -> int:
        """The group a task id names: hex digits 12-15 (its first random ones)."""
        if self.groups == 1:
            return 0
        return int(task_id[12:16], 16) % self.groups

    def new_task_id(self, group: int) -> str:
        """A new time-ordered task id (see protocol.new_id) that lives in ``group``."""
        task_id = new_id()
        if self.groups == 1:
            return task_id
        high = int(task_id[12:16], 16)
        high = high - high % self.groups + group
        if high > 0xFFFF:
            high -= self.groups
        return f"{task_id[:12]}{high:04x}{task_id[16:]}"

    def partition_group(self, partition: int) -> int:
        return partition % self.groups

    def key_group(self, key: str) -> int:
        """The group of an idempotency key (stable across processes)."""
        return zlib.crc32(key.encode()) % self.groups if self.groups > 1 else 0

    def group_prefix(self, group: int) -> str:
        return self.prefixes[group]

    def partition_prefix(self, partition: int) -> str:
        return self.prefixes[partition % self.groups]

    # --- tasks (in their group) ------------------------------------------------------

    def task(self, task_id: str) -> str:
        return f"{self.prefixes[self.task_group(task_id)]}task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.prefixes[self.task_group(task_id)]}events:{task_id}"

    def task_index(self, group: int) -> str:
        """The group's task ids for listing (sorted set, ordered by member: ids start
        with their creation time; trimmed to the retention period by submit.lua)."""
        return f"{self.prefixes[group]}tasks"

    def queue(self, capability: str, priority: str, group: int = 0) -> str:
        return f"{self.prefixes[group]}queue:{capability}:{priority}"

    def queues(self, capability: str, group: int = 0) -> list[str]:
        """The capability's streams in a group, highest priority first (the order
        nodes read them)."""
        return [self.queue(capability, p, group) for p in PRIORITIES]

    def delayed(self, group: int = 0) -> str:
        return f"{self.prefixes[group]}delayed"

    def dlq(self, capability: str, group: int = 0) -> str:
        return f"{self.prefixes[group]}dlq:{capability}"

    def idempotency(self, key: str, group: int | None = None) -> str:
        """An idempotency key lives in its task's group: the key's own group
        (``key_group``), or for a task addressed to an agent, the partition's."""
        return f"{self.prefixes[self.key_group(key) if group is None else group]}idem:{key}"

    def capability(self, name: str, group: int = 0) -> str:
        return f"{self.prefixes[group]}capability:{name}"

    def stats(self, group: int = 0) -> str:
        return f"{self.prefixes[group]}stats"

    def inbox(self, client_id: str, group: int = 0) -> str:
        return f"{self.prefixes[group]}inbox:{client_id}"

    def cancel_channel(self, group: int = 0) -> str:
        return f"{self.prefixes[group]}cancel"

    # --- agent partitions (in the partition's group) ---------------------------------

    def mailbox(self, agent_type: str, partition: int) -> str:
        return f"{self.partition_prefix(partition)}mailbox:{agent_type}:{partition}"

    def lease(self, agent_type: str, partition: int) -> str:
        return f"{self.partition_prefix(partition)}lease:{agent_type}:{partition}"

    def lease_tokens(self, group: int = 0) -> str:
        return f"{self.prefixes[group]}lease_tokens"

    def state(self, agent_type: str, partition: int) -> str:
        return f"{self.partition_prefix(partition)}state:{agent_type}:{partition}"

    # --- control (group 0's tag) -----------------------------------------------------

    def hosts(self, capability: str) -> str:
        return f"{self.prefix}hosts:{capability}"

    @property
    def capabilities(self) -> str:
        return f"{self.prefix}capabilities"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    @property
    def dead_nodes(self) -> str:
        return f"{self.prefix}dead_nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    @property
    def config(self) -> str:
        return f"{self.prefix}config"

    @property
    def agent_types(self) -> str:
        return f"{self.prefix}agent_types"

    def agent_hosts(self, agent_type: str) -> str:
        return f"{self.prefix}agent_hosts:{agent_type}"

    def active(self, node_id: str) -> str:
        return f"{self.prefix}active:{node_id}"

    def subscribers(self, topic: str) -> str:
        return f"{self.prefix}subscribers:{topic}"

    def ownership(self, group: int = 0) -> str:
        """Each group's lease script logs the changes of its partitions here."""
        return f"{self.prefixes[group]}ownership"

    @property
    def broadcast_channel(self) -> str:
        return f"{self.prefix}broadcast"

    @property
    def api_keys(self) -> str:
        """The gateway's API keys: one hash, field = key id (see shoal.apikeys)."""
        return f"{self.prefix}apikeys"

    def ratelimit(self, name: str, key: str) -> str:
        """One token bucket (see shoal.coordination.ratelimit). In the control group:
        a bucket is one key, so any slot would do; the control tag keeps every
        namespace's buckets under its own ``{namespace}``."""
        return f"{self.prefix}ratelimit:{name}:{key}"

    def ratewindow(self, name: str, key: str) -> str:
        """One sliding window log (see shoal.coordination.ratelimit); control group."""
        return f"{self.prefix}ratewindow:{name}:{key}"

    def llm_quota(self, provider: str, kind: str) -> tuple[str, str, str]:
        """A provider's quota window of one kind ("requests"/"tokens"): its log,
        amounts and total (see shoal.llm.quota). One script updates every kind of
        a provider at once, so all share the control tag (one slot on a Cluster)."""
        return (
            f"{self.prefix}llmquota:{provider}:{kind}",
            f"{self.prefix}llmquota_amounts:{provider}:{kind}",
            f"{self.prefix}llmquota_total:{provider}:{kind}",
        )

    # --- locks (control group; see shoal.coordination.lock) ---------------------------

    def lock(self, name: str) -> tuple[str, str, str]:
        """A lock's holder, fencing counter and wake-up list: one script touches all
        three, so they share the control tag (one slot on a Cluster)."""
        base = f"{self.prefix}lock"
        return f"{base}:{name}", f"{base}_fence:{name}", f"{base}_wake:{name}"

    # --- the service registry (control group; see shoal.registry) --------------------

    @property
    def services(self) -> str:
        return f"{self.prefix}services"

    def service(self, name: str) -> str:
        """A service's instances; the registry script builds its other keys
        (service_ttl:, service_health:) from the same prefix. The prober of a
        service is elected on the lock leader:prober:<name> (shoal.probes)."""
        return f"{self.prefix}service:{name}"

    @property
    def service_probes(self) -> str:
        """Probed services: name -> msgpack probe settings (see shoal.probes)."""
        return f"{self.prefix}service_probes"

    def service_load(self, name: str) -> str:
        return f"{self.prefix}service_load:{name}"

    @property
    def services_channel(self) -> str:
        return f"{self.prefix}services_changed"

    # --- the two-level cache (control group; see shoal.coordination.cache) -----------

    def cache(self, name: str, key: str) -> tuple[str, str]:
        """A cache entry and its fill lease. get_many/set_many touch many entries in
        one script, and each write publishes on ``cache_channel`` from the script:
        all share the control tag (one slot on a Cluster)."""
        return f"{self.prefix}cache:{name}:{key}", f"{self.prefix}cache_fill:{name}:{key}"

    def cache_entry(self, name: str, key: str) -> str:
        return f"{self.prefix}cache:{name}:{key}"

    @property
    def cache_channel(self) -> str:
        return f"{self.prefix}cache_changed"

    # --- live configuration (control group; see shoal.coordination.config) ----------

    @property
    def live_config(self) -> tuple[str, str, str]:
        """The settings, their version counter and their history: config.lua writes
        all three in one call, so they share the control tag (one slot on a Cluster).
        (``config``, above, is the namespace's fixed layout, not these.)"""
        base = f"{self.prefix}live_config"
        return base, f"{base}_version", f"{base}_history"

    @property
    def live_config_channel(self) -> str:
        return f"{self.prefix}live_config_changed"

    # --- sagas (control group; see shoal.coordination.saga) -------------------------

    def saga(self, saga_id: str) -> tuple[str, str, str, str, str]:
        """A saga's record, its log, the index of sagas, the active sagas and the
        runners' wake-up stream: saga.lua writes them together, so they share the
        control tag."""
        return (
            f"{self.prefix}saga:{saga_id}", f"{self.prefix}saga_log:{saga_id}", self.sagas,
            self.sagas_active, self.saga_wake,
        )  # fmt: skip

    @property
    def sagas(self) -> str:
        return f"{self.prefix}sagas"

    @property
    def sagas_active(self) -> str:
        return f"{self.prefix}sagas_active"

    @property
    def saga_wake(self) -> str:
        return f"{self.prefix}saga_wake"
