"""The client's side of the agent plane: addressing agents, messages, the directory.

An agent id ``type/key`` names a mailbox: ``mailbox:<type>:<p>`` with ``p`` the
partition of the id (routing.partition_of). Sending is one XADD there — durable at
once, whether or not a node owns the partition now. Requests carry this client's
inbox and a correlation id; the turn that handles one pushes the reply there when
it commits (the same inbox task outcomes arrive in). Publishing looks up the agent
types subscribed to the topic and sends to each type's agent keyed by ``source``.

Addressing is checked against the types nodes have registered (``agent_types``): an
unknown type, or one without the capability or handler asked for, fails at once
with the types and capabilities that do exist.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from redis.exceptions import NoScriptError

from shoal import protocol
from shoal.agent import validate_topic
from shoal.batching import Coalescer
from shoal.errors import (
    ConfigurationError,
    QueueFull,
    RequestFailed,
    RequestTimeout,
    SerializationError,
    UnknownAgentType,
)
from shoal.observability import tracing
from shoal.protocol import AgentId, AgentInfo, AgentTypeInfo, ErrorInfo
from shoal.routing import partition_of
from shoal.settings import DEFAULT_PARTITIONS, fixed_setting

if TYPE_CHECKING:
    from shoal.client import Client

TYPES_FRESH_S = 2.0  # how long the registered types are trusted before a re-read
SUBSCRIBERS_FRESH_S = 1.0
# Active agents are listed for nodes that heartbeated this recently (twice the default
# dead_after: a late node still shows; a dead one is reaped and its list deleted).
LIVE_WITHIN_MS = 6000


class AgentPlane:
    """Agent addressing for one client (used through Client's methods)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._partitions: int | None = None
        self._types: dict[str, AgentTypeInfo] = {}
        self._types_read = 0.0
        self._subscribers: dict[str, tuple[float, list[str]]] = {}
        # Sends made while one is on its way share the next pipeline: thousands of
        # agents sending at once cost a few round trips, not a queue for connections.
        self._sends = Coalescer(
            "sending messages", self._send_batch, give_up_after=client.settings.engine_timeout
        )

    # --- namespace facts ---------------------------------------------------------

    async def partitions(self) -> int:
        """The namespace's partition count, fixed by whoever used the namespace first."""
        if self._partitions is not None:
            return self._partitions
        client = self._client
        async with client.errors():
            count = await fixed_setting(
                client.redis, client.keys.config, client.settings.namespace, "partitions",
                "partitions", client.settings.partitions, DEFAULT_PARTITIONS, "agent partitions",
            )  # fmt: skip
        self._partitions = count
        return count

    async def agent_types(self, refresh: bool = False) -> dict[str, AgentTypeInfo]:
        """Agent types any node registered in this namespace."""
        if refresh or time.monotonic() - self._types_read > TYPES_FRESH_S:
            client = self._client
            async with client.errors():
                raw = await client.redis.hgetall(client.keys.agent_types)
            self._types = {
                name.decode(): msgspec.msgpack.decode(value, type=AgentTypeInfo)
                for name, value in raw.items()
            }
            self._types_read = time.monotonic()
        return self._types

    async def type_info(self, agent_type: str) -> AgentTypeInfo:
        types = await self.agent_types()
        if agent_type not in types:
            types = await self.agent_types(refresh=True)
        info = types.get(agent_type)
        if info is None:
            known = ", ".join(sorted(types)) or "none yet: start a node that hosts agent types"
            raise UnknownAgentType(
                f"no node has hosted agent type {agent_type!r} in namespace "
                f"{self._client.settings.namespace!r} (known types: {known})"
            )
        return info

    async def mailbox(self, agent_id: str) -> tuple[AgentId, str, int]:
        """Validate ``agent_id``; its parsed id, mailbox key and partition."""
        parsed = AgentId.parse(agent_id)
        partition = partition_of(str(parsed), await self.partitions())
        return parsed, self._client.keys.mailbox(parsed.type, partition), partition

    async def task_target(self, agent_id: str, capability: str) -> tuple[str, str, int]:
        """(mailbox key, agent id, key group) for a task addressed to an agent, checked."""
        parsed, mbox, partition = await self.mailbox(agent_id)
        info = await self.type_info(parsed.type)
        if capability not in info.capabilities:
            info = (await self.agent_types(refresh=True)).get(parsed.type, info)
        if capability not in info.capabilities:
            has = ", ".join(info.capabilities) or "none"
            raise UnknownAgentType(
                f"agent type {parsed.type!r} has no capability {capability!r} (it has: {has})"
            )
        return mbox, str(parsed), self._client.keys.partition_group(partition)

    # --- messages ------------------------------------------------------------------

    async def send(
        self,
        agent_id: str,
        message: Any,
        *,
        sender: str | None = None,
        traceparent: str | None = None,
        reply: tuple[str, str] | None = None,
    ) -> None:
        parsed, mbox, _ = await self.mailbox(agent_id)
        info = await self.type_info(parsed.type)
        if not info.handles_messages:
            raise UnknownAgentType(
                f"agent type {parsed.type!r} handles no messages: give it an on_message "
                "method or one marked @handler"
            )
        fields: dict[str, Any] = {"k": "msg", "a": str(parsed), "d": _encode_message(message)}
        if sender:
            fields["s"] = sender
        if traceparent:
            fields["t"] = tracing.carried_traceparent(traceparent)
        if reply:
            fields["r"], fields["c"] = reply
        await self._xadd(mbox, fields)

    async def request(
        self,
        agent_id: str,
        message: Any,
        *,
        timeout: float,
        sender: str | None = None,
        traceparent: str | None = None,
    ) -> Any:
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, got {timeout}")

        async def put(reply: tuple[str, str]) -> None:
            await self.send(agent_id, message, sender=sender, traceparent=traceparent, reply=reply)

        try:
            status, payload = await self._with_reply(put, timeout, await self._group_of(agent_id))
        except TimeoutError:
            raise RequestTimeout(
                f"agent {agent_id} did not reply within {timeout}s (the message stays "
                "delivered; a late reply is dropped)"
            ) from None
        if status == "replied":
            return protocol.decode(payload) if payload else None
        error = msgspec.msgpack.decode(payload, type=ErrorInfo) if payload else None
        raise RequestFailed(
            agent_id, error.type if error else "Unknown", error.message if error else "no error"
        )

    async def _group_of(self, agent_id: str) -> int:
        _, _, partition = await self.mailbox(agent_id)
        return self._client.keys.partition_group(partition)

    async def _with_reply(
        self, put: Callable[[tuple[str, str]], Awaitable[None]], timeout: float, group: int
    ) -> tuple[str, bytes]:
        """Put a message that asks for a reply (``put`` gets this client's inbox in
        the agent partition's key group — the turn that replies writes there — and a
        fresh correlation id) and wait up to ``timeout`` for the reply's status and
        payload; TimeoutError if none came."""
        client = self._client
        correlation = protocol.new_id()
        waiter = client._add_waiter(correlation)
        client._ensure_reader(group)
        try:
            await put((client.inbox(group), correlation))
            async with asyncio.timeout(timeout):
                status, payload = await waiter
                while not status:
                    # the inbox reader was interrupted (an engine blip): the reply may
                    # still come, so wait on
                    client._remove_waiter(correlation, waiter)
                    waiter = client._add_waiter(correlation)
                    status, payload = await waiter
            return status, payload
        finally:
            client._remove_waiter(correlation, waiter)

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        source: str,
        sender: str | None = None,
        traceparent: str | None = None,
    ) -> int:
        validate_topic(topic)
        types = await self._subscribed_types(topic)
        payload = _encode_message(message)
        for agent_type in types:
            agent_id = f"{agent_type}/{source}"
            _, mbox, _ = await self.mailbox(agent_id)  # validates the key part too
            fields: dict[str, Any] = {"k": "pub", "a": agent_id, "d": payload, "o": topic}
            if sender:
                fields["s"] = sender
            if traceparent:
                fields["t"] = tracing.carried_traceparent(traceparent)
            await self._xadd(mbox, fields)
        return len(types)

    async def broadcast(self, agent_type: str, message: Any, *, sender: str | None) -> None:
        protocol.validate_agent_type(agent_type)
        info = await self.type_info(agent_type)
        if not info.handles_messages:
            raise UnknownAgentType(f"agent type {agent_type!r} handles no messages")
        client = self._client
        data = protocol.encode([agent_type, _encode_message(message), sender])
        async with client.errors():
            await client.redis.spublish(client.keys.broadcast_channel, data)

    async def _xadd(self, mbox: str, fields: dict[str, Any]) -> None:
        client = self._client
        args: list[Any] = ["", client.settings.queue_max_length]  # no prefix: one key
        for name, value in fields.items():
            args += [name, value]
        added = await self._sends((mbox, args))
        if isinstance(added, Exception):
            async with client.errors():  # translated into Shoal's errors
                raise added
        if not added:
            raise QueueFull(
                f"mailbox {mbox} is full ({client.settings.queue_max_length} messages); the "
                "message was not sent: retry later, or raise SHOAL_QUEUE_MAX_LENGTH",
                accepted=[],
            )

    async def _send_batch(self, items: list[tuple[str, list[Any]]]) -> list[Any]:
        """One send-script call per message, all in one pipeline."""
        client = self._client
        async with client.errors():
            if len(items) == 1:
                return [await client.scripts.send([items[0][0]], items[0][1])]
            pipe = client.redis.pipeline(transaction=False)
            for mbox, args in items:
                client.scripts.send.queue(pipe, [mbox], args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            for index, reply in enumerate(replies):
                if isinstance(reply, NoScriptError):  # the engine restarted: load and rerun
                    mbox, args = items[index]
                    replies[index] = await client.scripts.send([mbox], args)
        return replies  # an error reply stays in its place: only its sender fails

    async def _subscribed_types(self, topic: str) -> list[str]:
        cached = self._subscribers.get(topic)
        if cached is not None and time.monotonic() - cached[0] < SUBSCRIBERS_FRESH_S:
            return cached[1]
        client = self._client
        async with client.errors():
            members = await client.redis.smembers(client.keys.subscribers(topic))
        types = sorted(m.decode() for m in members)
        self._subscribers[topic] = (time.monotonic(), types)
        return types

    # --- state and directory -------------------------------------------------------

    async def state(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's last saved state (None: it has none); UnknownAgentType for a
        type no node ever registered, as ``agent()``."""
        parsed, _, partition = await self.mailbox(agent_id)
        await self.type_info(parsed.type)
        client = self._client
        async with client.errors():
            raw = await client.redis.hget(client.keys.state(parsed.type, partition), str(parsed))
        return protocol.decode(raw) if raw else None

    async def delete(self, agent_id: str, timeout: float) -> bool:
        """Remove the agent's state in order: a 'del' message goes behind the ones
        already sent, and its turn (on the agent's owner) deletes the state. Waits
        for that turn; True if the agent had state."""
        parsed, mbox, _ = await self.mailbox(agent_id)
        await self.type_info(parsed.type)

        async def put(reply: tuple[str, str]) -> None:
            await self._xadd(mbox, {"k": "del", "a": str(parsed), "r": reply[0], "c": reply[1]})

        try:
            _, payload = await self._with_reply(put, timeout, await self._group_of(agent_id))
        except TimeoutError:
            raise RequestTimeout(
                f"{agent_id} was not deleted within {timeout}s: no node handled the "
                "deletion yet (it stays queued and happens when one does)"
            ) from None
        return bool(protocol.decode(payload)) if payload else False

    async def directory(
        self,
        agent_type: str | None = None,
        capability: str | None = None,
        active: bool | None = None,
        with_state: bool | None = None,
        limit: int = 1000,
    ) -> list[AgentInfo]:
        """Agents by type and/or capability; ``active``/``with_state`` filter on those
        facts (None: either). Active agents come from the nodes' published lists;
        agents with state from the state hashes (a scan: for inspection, not hot paths)."""
        if limit < 1:
            raise ConfigurationError(f"limit must be >= 1, got {limit}")
        types = await self.agent_types(refresh=True)
        wanted = set(types)
        if agent_type is not None:
            protocol.validate_agent_type(agent_type)
            wanted &= {agent_type}
        if capability is not None:
            wanted &= {name for name, info in types.items() if capability in info.capabilities}
        active_now = {info.id: info for info in await self._active(wanted)}
        await self._fill_state_sizes(active_now)
        found: dict[str, AgentInfo] = {}
        if active is not False:
            found.update(active_now)
        if active is not True and with_state is not False:
            # agents with saved state that are not active: a scan, bounded by limit
            for agent_id, (partition, size) in (await self._stored(wanted, limit)).items():
                if agent_id not in active_now:
                    parsed = AgentId.parse(agent_id)
                    found[agent_id] = AgentInfo(
                        agent_id, parsed.type, parsed.key, partition, state_size=size
                    )
        result = sorted(found.values(), key=lambda a: a.id)
        if with_state is not None:
            result = [a for a in result if bool(a.state_size) is with_state]
        return result[:limit]

    async def _fill_state_sizes(self, infos: dict[str, AgentInfo]) -> None:
        client = self._client
        if not infos:
            return
        async with client.errors():
            pipe = client.redis.pipeline(transaction=False)
            for info in infos.values():
                pipe.hstrlen(client.keys.state(info.type, info.partition), info.id)
            sizes = await pipe.execute()
        for (agent_id, info), size in zip(list(infos.items()), sizes, strict=True):
            infos[agent_id] = msgspec.structs.replace(info, state_size=int(size))

    async def _active(self, types: set[str]) -> list[AgentInfo]:
        client = self._client
        cutoff = protocol.now_ms() - LIVE_WITHIN_MS
        async with client.errors():
            nodes = await client.redis.zrangebyscore(client.keys.nodes, cutoff, "+inf")
            pipe = client.redis.pipeline(transaction=False)
            for node in nodes:
                pipe.hgetall(client.keys.active(node.decode()))
            lists = await pipe.execute()
        partitions = await self.partitions()
        out = []
        for node, entries in zip(nodes, lists, strict=True):
            for raw_id, raw in entries.items():
                agent_id = raw_id.decode()
                parsed = AgentId.parse(agent_id)
                if parsed.type not in types:
                    continue
                activated, last = protocol.decode(raw)
                out.append(
                    AgentInfo(
                        agent_id, parsed.type, parsed.key, partition_of(agent_id, partitions),
                        node=node.decode(), activated_at=activated, last_message_at=last,
                    )
                )  # fmt: skip
        return out

    async def _stored(self, types: set[str], limit: int) -> dict[str, tuple[int, int]]:
        """Agents with saved state: id -> (partition, state size), up to about ``limit``
        (more active ones may be among them, so the scan reads a little further)."""
        client = self._client
        partitions = await self.partitions()
        sizes: dict[str, tuple[int, int]] = {}
        async with client.errors():
            for agent_type in sorted(types):
                for partition in range(partitions):
                    key = client.keys.state(agent_type, partition)
                    async for field, value in client.redis.hscan_iter(key, count=1000):
                        sizes[field.decode()] = (partition, len(value))
                    if len(sizes) >= 2 * limit:
                        return sizes
        return sizes

    async def agent(self, agent_id: str) -> AgentInfo:
        """One agent's directory entry (it need not be active or have state)."""
        parsed, _, partition = await self.mailbox(agent_id)
        await self.type_info(parsed.type)
        client = self._client
        async with client.errors():
            size = await client.redis.hstrlen(
                client.keys.state(parsed.type, partition), str(parsed)
            )
        for info in await self._active({parsed.type}):
            if info.id == str(parsed):
                return msgspec.structs.replace(info, state_size=size)
        return AgentInfo(str(parsed), parsed.type, parsed.key, partition, state_size=size)


def _encode_message(message: Any) -> bytes:
    try:
        return protocol.encode(message)
    except (TypeError, OverflowError, ValueError) as exc:
        raise SerializationError(
            f"a message of type {type(message).__name__} cannot be sent ({exc}); messages "
            "are msgpack data (dicts, lists, str, numbers, bytes, bool, None)"
        ) from None
