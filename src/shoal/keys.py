"""The whole key schema, in one place.

Every key of a namespace starts with ``shoal:{<namespace>}:``. The braces are a
Redis Cluster hash tag: all keys of one namespace live in one hash slot, so the Lua
scripts (which build task keys from ids inside the script, from the prefix passed
as an argument) are valid on Cluster too. Spreading a namespace over shards is a
later step (issue 5); only this module and the scripts' prefix argument change then.

| key                         | type        | holds                                        |
|-----------------------------|-------------|----------------------------------------------|
| task:<id>                   | hash        | the task record (protocol.TaskInfo reads it) |
| events:<id>                 | stream      | the task's events; 'done' ends it if the     |
|                             |             | task emitted events or a client follows it   |
| queue:<capability>:<prio>   | stream      | ids of queued tasks; consumer group "nodes"  |
| delayed                     | sorted set  | task id -> due time (ms) for delays/retries  |
| dlq:<capability>            | stream      | dead tasks: id, reason                       |
| idem:<key>                  | string      | task id for an idempotency key (with TTL)    |
| capability:<name>           | hash        | per-capability settings published by nodes   |
| hosts:<capability>          | sorted set  | node id -> last heartbeat (ms)               |
| capabilities                | set         | every capability any node ever hosted        |
| nodes                       | sorted set  | live node id -> last heartbeat (ms)          |
| node:<id>                   | hash        | node description, load, state                |
| dead_nodes                  | sorted set  | node id -> when declared dead (last hour)    |
| stats                       | hash        | counters, e.g. duplicates:<capability>       |
| inbox:<client id>           | list        | ids of finished tasks a client waits for     |
| cancel                      | pub/sub     | ids of tasks whose cancellation was asked    |
| config                      | hash        | namespace settings fixed at creation         |
|                             |             | (partitions)                                 |
| agent_types                 | hash        | agent type -> its description (msgpack:      |
|                             |             | capabilities, handlers, subscriptions)       |
| agent_hosts:<type>          | sorted set  | node id -> last heartbeat, nodes hosting it  |
| mailbox:<type>:<p>          | stream      | partition p's messages and addressed tasks,  |
|                             |             | in arrival order; deleted once processed     |
| lease:<type>:<p>            | string      | '<node id> <token>' of the partition's owner |
|                             |             | (PX: expires unless renewed)                 |
| lease_tokens                | hash        | '<type>:<p>' -> last fencing token issued    |
| state:<type>:<p>            | hash        | agent id -> msgpack state, for partition p   |
| active:<node>               | hash        | agent id -> msgpack [activated, last message]|
|                             |             | of the agents active on that node            |
| subscribers:<topic>         | set         | agent types subscribed to the topic          |
| ownership                   | stream      | partition ownership changes (capped)         |
| broadcast                   | pub/sub     | messages for every active agent of a type    |
"""

from __future__ import annotations

import re

from shoal.errors import ConfigurationError

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


class Keys:
    """Key names for one namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"shoal:{{{namespace}}}:"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    def events(self, task_id: str) -> str:
        return f"{self.prefix}events:{task_id}"

    def queue(self, capability: str, priority: str) -> str:
        return f"{self.prefix}queue:{capability}:{priority}"

    def queues(self, capability: str) -> list[str]:
        """The capability's streams, highest priority first (the order nodes read them)."""
        return [self.queue(capability, p) for p in PRIORITIES]

    @property
    def delayed(self) -> str:
        return f"{self.prefix}delayed"

    def dlq(self, capability: str) -> str:
        return f"{self.prefix}dlq:{capability}"

    def idempotency(self, key: str) -> str:
        return f"{self.prefix}idem:{key}"

    def capability(self, name: str) -> str:
        return f"{self.prefix}capability:{name}"

    def hosts(self, capability: str) -> str:
        return f"{self.prefix}hosts:{capability}"

    @property
    def capabilities(self) -> str:
        return f"{self.prefix}capabilities"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def dead_nodes(self) -> str:
        return f"{self.prefix}dead_nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{node_id}"

    def inbox(self, client_id: str) -> str:
        return f"{self.prefix}inbox:{client_id}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}cancel"

    # --- the agent plane ----------------------------------------------------------

    @property
    def config(self) -> str:
        return f"{self.prefix}config"

    @property
    def agent_types(self) -> str:
        return f"{self.prefix}agent_types"

    def agent_hosts(self, agent_type: str) -> str:
        return f"{self.prefix}agent_hosts:{agent_type}"

    def mailbox(self, agent_type: str, partition: int) -> str:
        return f"{self.prefix}mailbox:{agent_type}:{partition}"

    def lease(self, agent_type: str, partition: int) -> str:
        return f"{self.prefix}lease:{agent_type}:{partition}"

    @property
    def lease_tokens(self) -> str:
        return f"{self.prefix}lease_tokens"

    def state(self, agent_type: str, partition: int) -> str:
        return f"{self.prefix}state:{agent_type}:{partition}"

    def active(self, node_id: str) -> str:
        return f"{self.prefix}active:{node_id}"

    def subscribers(self, topic: str) -> str:
        return f"{self.prefix}subscribers:{topic}"

    @property
    def ownership(self) -> str:
        return f"{self.prefix}ownership"

    @property
    def broadcast_channel(self) -> str:
        return f"{self.prefix}broadcast"
