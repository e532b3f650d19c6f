"""The worker node: pull tasks up to free slots, run them, record results in batches.

The loop is a pull model: a node asks the engine for at most as many tasks as it
has free slots (fetch.lua reads high before normal before low and starts what it
read in the same script), so load balances by itself. When every queue is empty
the node blocks on XREAD from each stream's last id — woken the moment a task is
added, without consuming anything. Results and events are written by one flusher
that drains everything finished since its last round trip in one pipeline, so the
engine sees batches under load and single writes when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import msgspec
import redis

from shoal import __version__, protocol
from shoal.admission import Admission
from shoal.agent import Agent, CapabilitySpec, TaskContext
from shoal.channels import ShardSubscription
from shoal.client import Client
from shoal.coordination.config import ConfigView
from shoal.coordination.saga_runner import MAX_SAGAS, SagaRunner
from shoal.engine import translate
from shoal.errors import ConfigurationError, ShoalError
from shoal.execution import Attempt, Job, Outcome
from shoal.hosting import AgentHost
from shoal.keys import CONSUMER_GROUP, PRIORITIES
from shoal.live_settings import LogLevels, capability_limits, checked_values, retry_spec
from shoal.liveness import Heartbeat, deregister, register
from shoal.observability.hooks import NodeTelemetry
from shoal.observability.logs import set_process_node
from shoal.probes import Prober
from shoal.protocol import AgentTypeInfo, ErrorInfo
from shoal.recorder import Recorder
from shoal.recovery import Reaper
from shoal.resilience import Backoff
from shoal.settings import Settings

log = logging.getLogger("shoal.node")

RELEASE_INTERVAL_S = 0.25  # longest gap between two looks at due delayed tasks
RELEASE_BATCH = 1000
FETCH_WARN_EVERY_S = 5.0  # at most one warning this often for failing group fetches
IDLE_BLOCK_MS = 1000  # upper bound of one blocking wait for work (then re-check stop)
CANCEL_LISTEN_S = 0.5  # how often the cancel listener looks up to see if it should end
CONFIG_LOOK_S = 0.5  # how often the config loop looks up to see if it should end
CANCEL_SWEEP_S = 2.0  # how often running tasks' cancel flags are read (missed messages)
RECANCEL_AFTER_S = 5.0  # an attempt still running this long after its cancel gets another
# /healthz fails when the watchdog (which turns at least once a second) has not
# turned for this long: the loop is blocked, e.g. by a handler calling blocking code.
LOOP_BLOCKED_AFTER_S = 15.0
EXIT_FORCED = 130  # exit code of a node stopped by a second signal


@dataclass
class NodeConfig:
    """How a node runs; validated at construction."""

    concurrency: int = 64
    name: str | None = None
    grace_period: float = 30.0
    weight: float = 1.0
    zone: str = ""
    heartbeat_interval: float = 1.0
    dead_after: float = 3.0
    stall_after: float = 10.0  # the watchdog reports a node without progress this long
    max_active_agents: int = 10_000  # beyond this, the least recently used idle ones go
    idle_after: float = 300.0  # an agent without a message this long is deactivated
    lease_time: float | None = None  # partition leases; default: dead_after
    metrics_port: int | None = None  # serve /metrics here (0: a free port, published)
    metrics_host: str = "127.0.0.1"  # loopback by default: metrics name the cluster's work
    probe_services: bool = True  # take part in electing the prober of each probed service
    run_sagas: bool = True  # drive sagas (a SagaRunner beside the task slots)
    max_sagas: int = MAX_SAGAS  # at most this many sagas driven at once

    def __post_init__(self) -> None:
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigurationError(f"concurrency must be >= 1, got {self.concurrency!r}")
        if self.grace_period < 0:
            raise ConfigurationError(f"grace_period must be >= 0, got {self.grace_period!r}")
        if self.weight <= 0:
            raise ConfigurationError(f"weight must be > 0, got {self.weight!r}")
        if self.heartbeat_interval <= 0:
            raise ConfigurationError("heartbeat_interval must be > 0 seconds")
        if self.dead_after < 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"dead_after ({self.dead_after}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s), or one late heartbeat would declare a node dead"
            )

        if self.max_active_agents < 1:
            raise ConfigurationError(
                f"max_active_agents must be >= 1, got {self.max_active_agents!r}"
            )
        if self.idle_after <= 0:
            raise ConfigurationError(f"idle_after must be > 0 seconds, got {self.idle_after!r}")
        if self.lease_time is None:
            self.lease_time = self.dead_after
        if self.lease_time < 2 * self.heartbeat_interval:
            raise ConfigurationError(
                f"lease_time ({self.lease_time}s) must be at least twice heartbeat_interval "
                f"({self.heartbeat_interval}s): leases are renewed once per interval"
            )
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port must be 0..65535, got {self.metrics_port!r}")

    def node_id(self) -> str:
        return self.name or f"{socket.gethostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Node:
    """Hosts agent types and runs their capabilities' tasks."""

    def __init__(
        self,
        agents: list[type[Agent]],
        settings: Settings | None = None,
        config: NodeConfig | None = None,
    ) -> None:
        from shoal.app import capability_table

        self.settings = settings or Settings.from_env()
        self.config = config or NodeConfig()
        self.node_id = self.config.node_id()
        table = capability_table(agents)
        self._instances = {agent: agent() for agent in set(table.values())}
        self._specs: dict[str, tuple[CapabilitySpec, Agent]] = {
            name: (agent.capabilities()[name], self._instances[agent])
            for name, agent in table.items()
        }
        self._code_specs = {name: spec for name, (spec, _) in self._specs.items()}
        self.client = Client(settings=self.settings)
        # live configuration: what it limits, and the version applied (shown in the
        # node's record and metrics, so operators and tests can wait for it)
        self._recheck = asyncio.Event()  # a limited capability may start tasks again
        self.admission = Admission(self.client, self._recheck.set)
        self._log_levels = LogLevels()
        self.config_version = 0
        self._config_seen = 0  # the view's update count applied (versions can go back)
        self._agent_types = sorted(
            (a for a in set(agents) if a.is_addressable()), key=lambda a: a.agent_type
        )
        self.agents = AgentHost(self, self._agent_types) if self._agent_types else None
        self._running: dict[str, Attempt] = {}
        self._cancels_asked: dict[str, float] = {}  # task id -> when it was last cancelled
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()  # stop pulling work, drain
        self._closing = asyncio.Event()  # drained: background loops end by themselves
        self._serving = asyncio.Event()  # cleared while the node may have been declared dead
        # the blocking reads for work (one per key group) and the wait on them
        self._idle_reads: dict[int, asyncio.Future[Any]] = {}
        self._idle_streams: dict[int, set[str]] = {}  # what each of those reads watches
        self.fetch_calls = 0  # fetch script calls made (tests count useless ones)
        self._idle_wait: asyncio.Future[Any] | None = None
        self._turn = 0  # rotates which capability is read first (see _queue_order)
        self._group_turn = 0  # rotates which key group is read first
        self._lives = 0  # +1 each time the node learns it was declared dead
        self._fetch_warned = 0.0  # when a failed group fetch was last logged
        self._executor = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="shoal")
        self._heartbeat: Heartbeat | None = None
        self._registered = False
        self._last_progress = time.monotonic()
        self.stalled = ""  # why the watchdog thinks the node is stuck, or ""
        self.recorder: Recorder
        self._loop_tick: float | None = None  # the watchdog's last turn (None: not begun)
        self.telemetry = NodeTelemetry(
            self.node_id, self.config.metrics_host, self.config.metrics_port, self._load,
            self.health, self.readiness,
        )  # fmt: skip

    @property
    def capabilities(self) -> list[str]:
        return sorted(self._specs)

    @property
    def keys(self) -> Any:
        return self.client.keys

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # --- lifecycle --------------------------------------------------------------

    def stop(self) -> None:
        """Ask the node to drain and stop (call on the node's loop, e.g. a signal handler)."""
        self._stopping.set()
        self._serving.set()  # a paused fetch loop must see the stop too
        self._slot_freed.set()  # and so must one waiting for a free slot
        # call_soon: a read's first step (already scheduled) runs first, so the
        # cancel never hits a coroutine that has not started (which would warn).
        loop = asyncio.get_running_loop()
        if self._idle_wait is not None:
            loop.call_soon(self._idle_wait.cancel)
        for read in self._idle_reads.values():
            loop.call_soon(read.cancel)

    async def run(self) -> None:
        """Register, consume until stop() is called, then drain and deregister."""
        self.loop = asyncio.get_running_loop()
        self.recorder = Recorder(self.client, self.loop)
        self._reaper = Reaper(self.client, self.node_id, self.config.dead_after)
        self.telemetry.start()
        try:
            await self.client.connect()
            config = await self.client.config.watch()
            seen, version = config.changes, config.version
            self._apply_config(config)  # before registering: _publish writes its defaults
            await self._register()
            self._config_seen, self.config_version = seen, version
            self._start_heartbeat()
            if self.agents is not None:
                await self.agents.start()
            log.info("node %s joined, hosting %s", self.node_id, ", ".join(self.capabilities))
            # Background loops end when _closing is set rather than by cancellation:
            # asyncio.wait_for on 3.11 (used inside redis-py) can swallow a cancel.
            async with asyncio.TaskGroup() as group:
                group.create_task(self.recorder.run(self._closing))
                group.create_task(self._release_loop())
                group.create_task(self._cancel_listener())
                group.create_task(self._cancel_sweep())
                group.create_task(self._reaper.run(self._closing))
                group.create_task(self._watchdog())
                group.create_task(self._config_loop(config))
                if self.config.probe_services:
                    group.create_task(Prober(self.client, self.node_id).run(self._closing))
                if self.config.run_sagas:
                    sagas = SagaRunner(self.client, self.node_id, max_sagas=self.config.max_sagas)
                    group.create_task(sagas.run(self._stopping))
                if self.agents is not None:
                    group.create_task(self.agents.run(self._closing))
                try:
                    await self._fetch_loop()
                    await self._drain()
                finally:
                    self._closing.set()
                    self.recorder.wake()
        finally:
            if self._heartbeat is not None:
                self._heartbeat.stop()
            if self._registered:  # never remove a registration that is not ours
                with contextlib.suppress(ShoalError):
                    await deregister(
                        self.client, self.node_id, self.capabilities,
                        [a.agent_type for a in self._agent_types],
                    )  # fmt: skip
                log.info("node %s left (drained, deregistered)", self.node_id)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self.admission.close()
            self._log_levels.restore()
            await self.client.close()
            await self.telemetry.stop()

    def _description(self) -> dict[str, Any]:
        return {
            "id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "version": __version__, "capabilities": ",".join(self.capabilities),
            "concurrency": self.config.concurrency, "weight": self.config.weight,
            "zone": self.config.zone, "started_at": protocol.now_ms(),
            "heartbeat_interval": self.config.heartbeat_interval,
            "dead_after": self.config.dead_after,
            "agent_types": ",".join(a.agent_type for a in self._agent_types),
            "metrics_port": self.telemetry.metrics_port or "",
        }  # fmt: skip

    async def _register(self) -> None:
        await self._publish()
        if taken := await self._reaper.reclaim_own_name(socket.gethostname()):
            log.warning(
                "node %s: took over %d task(s) an earlier process of this name left running",
                self.node_id, len(taken.requeued) + len(taken.dead_lettered),
            )  # fmt: skip
        await register(self.client, self.node_id, self._description())
        self._registered = True
        self._serving.set()

    async def _publish(self) -> None:
        """What the namespace must know of this node's code: its queues (streams and
        consumer groups), its capabilities' settings, its agent types and their
        topics. Idempotent: done at start and again on rejoining (the engine may
        have lost it, e.g. a Cluster shard restarted without its data)."""
        r = self.client.redis
        async with self.client.errors():
            previous = await self._previous_topics()
            groups = range(self.keys.groups)
            await self._create_consumer_groups(groups)
            pipe = r.pipeline(transaction=False)
            for name, (spec, _) in self._specs.items():
                pipe.sadd(self.keys.capabilities, name)
                fields = _capability_fields(spec)
                stale = [f for f in ("max_attempts", "timeout", "queue_max") if f not in fields]
                for group in groups:  # the scripts of each group read their group's copy
                    pipe.hset(self.keys.capability(name, group), mapping=fields)
                    if stale:
                        pipe.hdel(self.keys.capability(name, group), *stale)
            for agent_type in self._agent_types:
                name = agent_type.agent_type
                pipe.hset(self.keys.agent_types, name, _type_description(agent_type))
                for topic in agent_type.subscriptions():
                    pipe.sadd(self.keys.subscribers(topic), name)
                for topic in previous.get(name, set()) - agent_type.subscriptions().keys():
                    pipe.srem(self.keys.subscribers(topic), name)  # the type dropped it
            await pipe.execute()

    async def _create_consumer_groups(self, groups: Iterable[int]) -> None:
        """The queues' streams and their consumer group (kept if they exist)."""
        for group in groups:
            for cap in self._specs:
                for queue in self.keys.queues(cap, group):
                    with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: exists
                        await self.client.redis.xgroup_create(
                            queue, CONSUMER_GROUP, id="0", mkstream=True
                        )

    async def _previous_topics(self) -> dict[str, set[str]]:
        """The topics each hosted type subscribed to as last registered (by any node):
        a topic its code no longer subscribes to must stop receiving publications."""
        names = [a.agent_type for a in self._agent_types]
        if not names:
            return {}
        raw = await self.client.redis.hmget(self.keys.agent_types, names)
        return {
            name: set(msgspec.msgpack.decode(value, type=AgentTypeInfo).topics)
            for name, value in zip(names, raw, strict=True)
            if value
        }

    # --- live configuration (shoal.coordination.config, shoal.live_settings) ----------

    def _apply_config(self, config: ConfigView) -> bool:
        """Apply the settings as of ``config``: retry options (the specs attempts
        use), admission limits, log levels. Each value is checked first (an invalid
        one is skipped) and everything is computed before anything is changed, so
        a change is applied whole or not at all. True if a default the engine keeps
        for the fetch script (max_attempts) changed and must be published again."""
        values = checked_values(config.values)
        specs = {
            name: (retry_spec(code_spec, values), self._specs[name][1])
            for name, code_spec in self._code_specs.items()
        }
        limits = {name: capability_limits(spec, values) for name, spec in self._code_specs.items()}
        for name, lim in limits.items():
            if lim.burst is not None and lim.rate is None:
                log.warning("config: capability %s has a burst but no rate: it has no effect", name)
        republish = any(specs[n][0].max_attempts != self._specs[n][0].max_attempts for n in specs)
        self._specs.update(specs)
        self.admission.set_limits(limits)
        self._log_levels.apply(values)
        return republish

    async def _config_loop(self, config: ConfigView) -> None:
        """Apply each change of the settings as the client's watch sees it. The
        version shown as applied (``config_version``) moves only once a change is
        applied and the defaults it changed are published: waiting for it means
        the change is in force."""
        changed = asyncio.Event()

        def on_change(_: ConfigView) -> None:
            changed.set()

        config.on_change(on_change)
        target, pending, warned = self.config_version, False, 0.0
        try:
            while not self._closing.is_set():
                changed.clear()
                if config.changes != self._config_seen:
                    self._config_seen, version = config.changes, config.version
                    try:
                        pending = self._apply_config(config) or pending
                    except Exception:  # a bug here must not take the node down
                        log.exception("applying config version %d failed", version)
                        continue  # not again until the next change; not shown as applied
                    target = version
                if pending:
                    try:
                        await self._publish_defaults()
                        pending = False
                    except ShoalError as exc:
                        if time.monotonic() - warned > FETCH_WARN_EVERY_S:
                            warned = time.monotonic()
                            log.warning("publishing capability defaults failed (%s); retrying", exc)
                        await self._until(self._closing, timeout=CONFIG_LOOK_S)
                        continue
                if self.config_version != target:
                    self.config_version = target
                    log.info("node %s applied config version %d", self.node_id, target)
                await self._until(changed, timeout=CONFIG_LOOK_S)
        finally:
            config.remove_listener(on_change)

    async def _publish_defaults(self) -> None:
        """Each capability's max_attempts as configured now, in every group's copy of
        its settings, where fetch.lua reads it for tasks that set none."""
        async with self.client.errors():
            pipe = self.client.redis.pipeline(transaction=False)
            for name, (spec, _) in self._specs.items():
                for group in range(self.keys.groups):
                    key = self.keys.capability(name, group)
                    if spec.max_attempts is None:
                        pipe.hdel(key, "max_attempts")
                    else:
                        pipe.hset(key, "max_attempts", spec.max_attempts)
            await pipe.execute()

    def _start_heartbeat(self) -> None:
        def notify(state: str) -> None:
            self.loop.call_soon_threadsafe(self._on_liveness, state)

        self._heartbeat = Heartbeat(
            self.client.url, self.keys, self.node_id, self.config.heartbeat_interval,
            self.config.dead_after, self._load, notify,
        )  # fmt: skip
        self._heartbeat.start()

    def _load(self) -> dict[str, Any]:
        """What each heartbeat reports (read from the heartbeat thread)."""
        return {
            "in_flight": len(self._running),
            "free": max(0, self.config.concurrency - len(self._running)),
            "completed": self.recorder.recorded,
            "stalled": self.stalled,
            "config_version": self.config_version,
            **(self.agents.load() if self.agents is not None else {}),
        }

    def _on_liveness(self, state: str) -> None:
        """The heartbeat thread's news: stop taking work while the node may have been
        declared dead; if it was, give up its running work and register again."""
        if state == "silent":
            self._serving.clear()
        elif state == "ok":
            self._serving.set()
        elif state == "dead":
            self._serving.clear()
            self._lives += 1
            abandoned = self._abandon_running()
            log.warning(
                "node %s was declared dead; %d running task(s) now belong to survivors; "
                "registering again", self.node_id, abandoned,
            )  # fmt: skip
            task = asyncio.ensure_future(self._rejoin())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _abandon_running(self) -> int:
        attempts = list(self._running.values())
        for attempt in attempts:
            attempt.abandoned = True
            if attempt.task is not None:  # after its first step (see _cancel_running)
                asyncio.get_running_loop().call_soon(attempt.task.cancel)
        return len(attempts)

    async def _rejoin(self) -> None:
        """Register again after being declared dead — or after the engine forgot this
        node (its record is gone: a shard restarted without its data). In that case
        nobody took its started tasks over, so it does so itself first (a survivor
        that did leaves nothing to take), then publishes what the engine may have
        lost with the record, and registers."""
        backoff = Backoff()
        while not self._closing.is_set():
            try:
                await self._reaper.claim_own(",".join(self.capabilities))
                await self._publish()
                await register(self.client, self.node_id, self._description())
            except ShoalError as exc:
                log.warning("registering again failed: %s", exc)
                await self._until(self._closing, timeout=backoff.next_delay())
                continue
            if self._heartbeat is not None:
                self._heartbeat.reset()
            self._serving.set()
            log.info("node %s registered again", self.node_id)
            return

    async def _drain(self) -> None:
        """Stop pulling; let running tasks finish within the grace period, then hand
        the rest back to their queues at once (the attempt not counted). Agents
        finish the turns they started and release their partitions meanwhile."""
        if self.agents is not None:
            await asyncio.gather(self._drain_tasks(), self.agents.drain(self.config.grace_period))
        else:
            await self._drain_tasks()

    async def _drain_tasks(self) -> None:
        pending = {a.task for a in self._running.values() if a.task is not None}
        if pending:
            log.info(
                "draining %d running task(s), grace %.1fs", len(pending), self.config.grace_period
            )
            _, late = await asyncio.wait(pending, timeout=self.config.grace_period)
            for attempt in list(self._running.values()):
                if attempt.task is not None and attempt.task in late:
                    attempt.handed_back = True
                    attempt.task.cancel()
            if late:
                log.info("handing %d unfinished task(s) back to their queues", len(late))
                await asyncio.wait(late)
        await self.recorder.flush()

    # --- pulling work -------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        if not self._specs:  # only addressed agents with handlers: no queues to read
            await self._stopping.wait()
            return
        expired = protocol.encode(
            ErrorInfo(
                "shoal.errors.DeadlineExceeded", "the deadline passed before the task started"
            )
        )
        try:
            await self._fetch_until_stopped(expired)
        finally:
            for read in self._idle_reads.values():
                read.cancel()
            await asyncio.gather(*self._idle_reads.values(), return_exceptions=True)
            self._idle_reads.clear()
            self._idle_streams.clear()

    async def _fetch_until_stopped(self, expired: bytes) -> None:
        backoff = Backoff()
        while not self._stopping.is_set():
            if not self._serving.is_set():
                await self._serving.wait()
                continue
            free = self.config.concurrency - len(self._running)
            if free <= 0:
                self._slot_freed.clear()
                await self._until(self._slot_freed)
                continue
            forced = self._recheck.is_set()  # a limited capability may start more now
            self._recheck.clear()
            try:
                idle = await self._fetch_round(free, expired, forced)
            except ShoalError as exc:
                delay = backoff.next_delay()
                log.warning("fetching work failed: %s; retrying in %.2fs", exc, delay)
                await self._until(self._stopping, timeout=delay)
                continue
            backoff.reset()
            self._last_progress = time.monotonic()
            if len(idle) == self.keys.groups:
                await self._wait_for_work(idle)

    async def _fetch_round(
        self, free: int, expired: bytes, forced: bool = False
    ) -> dict[int, tuple[list[str], list[bytes]] | None]:
        """Fetch from the key groups in turn (each group's queues are in one slot)
        until ``free`` tasks started or every group was asked once; returns the
        groups that had nothing, with where to block on their streams. Limited
        capabilities start no more than their budgets (shoal.admission); ``forced``
        asks groups whose blocking read saw nothing new too (a budget opened)."""
        budgets = await self.admission.budgets(free)
        started: Counter[str] = Counter()
        try:
            return await self._fetch_groups(free, expired, forced, budgets, started)
        finally:
            # tokens taken for starts that did not happen go back to their buckets
            await self.admission.settle(started)

    async def _fetch_groups(
        self,
        free: int,
        expired: bytes,
        forced: bool,
        budgets: dict[str, int],
        started_caps: Counter[str],
    ) -> dict[int, tuple[list[str], list[bytes]] | None]:
        idle: dict[int, tuple[list[str], list[bytes]] | None] = {}
        failures: list[ShoalError] = []
        groups = self.keys.groups
        self._group_turn += 1
        for step in range(groups):
            group = (self._group_turn + step) % groups
            read = self._idle_reads.get(group)
            if read is not None and not read.done() and not forced:
                # empty at its last fetch, and its blocking read has seen nothing
                # new since: asking again would cost a round trip for nothing
                idle[group] = None
                continue
            queues = self._queue_order(group, budgets)
            if not queues:  # every capability is held back: nothing to ask for
                idle[group] = ([], [])
                continue
            lives = self._lives
            try:
                started, consumed, last_ids = await self._fetch(
                    group, queues, free, expired, budgets
                )
            except ShoalError as exc:
                failures.append(exc)
                await self._after_fetch_error(group, exc)
                continue  # the other groups (shards) may be fine
            if self._lives != lives:
                self._hand_back([Job.from_reply(row) for row in started])
                return idle  # declared dead while the fetch was on its way
            for row in started:
                job = Job.from_reply(row)
                if job.capability in budgets:
                    budgets[job.capability] -= 1
                started_caps[job.capability] += 1
                self._start(job)
            free -= len(started)
            if consumed == 0:
                idle[group] = (queues, last_ids)
            if free <= 0:
                break
        if failures and len(failures) + len(idle) >= groups:
            raise failures[0]  # no group gave work: back off
        return idle

    async def _after_fetch_error(self, group: int, exc: ShoalError) -> None:
        """A queue stream or its consumer group can vanish (a shard restarted without
        its data, a FLUSHALL): create them again, so the group is read again."""
        if "NOGROUP" in str(exc):
            log.warning("key group %d lost its queues; creating them again", group)
            with contextlib.suppress(ShoalError):
                async with self.client.errors():
                    await self._create_consumer_groups([group])
        elif time.monotonic() - self._fetch_warned > FETCH_WARN_EVERY_S:
            self._fetch_warned = time.monotonic()
            log.warning("fetching from key group %d failed: %s", group, exc)

    def _hand_back(self, jobs: list[Job]) -> None:
        """Tasks whose fetch reply arrived after this node learnt it was declared dead
        are not run: a survivor may run them already. Each goes back to its queue if
        the fetch ran after the takeover (it is still ours); if it ran before, the
        takeover re-queued it and the hand-back is refused as stale."""
        if jobs:
            log.warning(
                "handing back %d task(s) fetched before this node was declared dead", len(jobs)
            )
            for job in jobs:
                self.recorder.add_outcome(Outcome(job, "requeue"))

    def _queue_order(self, group: int, budgets: dict[str, int]) -> list[str]:
        """Priorities in order; within one, the capabilities take turns going first,
        so a busy capability cannot starve the others hosted by this node. Limited
        capabilities with a budget go before unlimited ones (the tokens taken for a
        rate-limited one are spent on it, not on a busy neighbour that takes the
        last free slot); those with no budget are left out: reading them would
        start nothing, and blocking on them would wake the node for nothing."""
        self._turn += 1
        caps = [cap for cap in self._specs if budgets.get(cap, 1) > 0]
        if not caps:
            return []
        shift = self._turn % len(caps)
        caps = caps[shift:] + caps[:shift]
        caps.sort(key=lambda cap: cap not in budgets)  # stable: the turns are kept
        return [self.keys.queue(cap, prio, group) for prio in PRIORITIES for cap in caps]

    async def _fetch(
        self,
        group: int,
        queues: list[str],
        count: int,
        expired: bytes,
        budgets: dict[str, int] | None = None,
    ) -> tuple[list[Any], int, list[bytes]]:
        args: list[Any] = [
            self.keys.group_prefix(group), CONSUMER_GROUP, self.node_id, count, protocol.now_ms(),
            int(self.settings.retention * 1000), expired,
        ]  # fmt: skip
        if budgets:
            args.append(len(budgets))
            for cap, budget in budgets.items():
                args += [cap, budget]
        self.fetch_calls += 1
        async with self.client.errors():
            started, consumed, last_ids = await self.client.scripts.fetch(
                queues, args, on=self.client.blocking
            )
        return started, int(consumed), last_ids

    async def _wait_for_work(self, idle: dict[int, tuple[list[str], list[bytes]] | None]) -> None:
        """Block until a queue of any group gets an entry past its last id (or stop).

        A blocking read covers one slot, so each group has its own; a read still
        waiting from an earlier round is kept (not cancelled: cancelling closes its
        connection), and the first one to return ends the wait."""
        if self._stopping.is_set():
            # stop() cancels the wait it finds; one begun after it would last a whole
            # block. Checked before any read starts: a read cancelled before its first
            # step leaves a coroutine never awaited.
            return
        for group, where in idle.items():
            if where is None:
                continue
            queues, last_ids = where
            if group in self._idle_reads and self._idle_streams.get(group) != set(queues):
                # the streams to watch changed (a capability's budget closed or
                # opened): the old read would wake the node for a paused capability
                # or miss one that may start again
                self._drop_idle_read(group)
            if queues and group not in self._idle_reads:
                streams = dict(zip(queues, last_ids, strict=True))
                self._idle_streams[group] = set(queues)
                self._idle_reads[group] = asyncio.ensure_future(
                    self.client.blocking.xread(streams, count=1, block=IDLE_BLOCK_MS)
                )
        # a budget that opens (a limited capability's task ended, its rate allows
        # again, the config changed) ends the wait too; with no stream to watch
        # (every capability held back) the loop still turns once per IDLE_BLOCK_MS
        recheck = asyncio.ensure_future(self._recheck.wait())
        timeout = None if self._idle_reads else IDLE_BLOCK_MS / 1000
        self._idle_wait = asyncio.ensure_future(
            asyncio.wait(
                [*self._idle_reads.values(), recheck],
                timeout=timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        )
        try:
            done, _ = await self._idle_wait  # stop() cancels it
        except asyncio.CancelledError:
            if not self._stopping.is_set():
                raise
            return
        finally:
            self._idle_wait = None
            recheck.cancel()
        for group, read in list(self._idle_reads.items()):
            if read in done:
                del self._idle_reads[group]
                self._idle_streams.pop(group, None)
                if not read.cancelled() and (exc := read.exception()) is not None:
                    if not isinstance(exc, redis.RedisError):
                        raise exc
                    log.warning("waiting for work failed: %s", translate(exc, self.client.url))
                    await self._until(self._stopping, timeout=0.5)

    def _drop_idle_read(self, group: int) -> None:
        """Cancel a group's blocking read (its connection is closed: only when the
        streams to watch change, not on every round)."""
        read = self._idle_reads.pop(group)
        self._idle_streams.pop(group, None)
        read.cancel()
        read.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _until(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        """Wait for ``event`` at most ``timeout`` seconds; True if it is set."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await event.wait()
        return event.is_set()

    # --- running ------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        spec, agent = self._specs[job.capability]
        ctx = TaskContext(
            self, job.task_id, job.capability, job.attempt, job.traceparent,
            self.recorder.flushed, job.token, submitted_by=job.submitted_by,
        )  # fmt: skip
        attempt = Attempt(job, spec, agent, ctx)
        self._running[job.task_id] = attempt
        self.admission.started(job.capability)
        attempt.task = asyncio.create_task(
            self._run_attempt(attempt), name=f"shoal-task-{job.task_id}"
        )

    async def _run_attempt(self, attempt: Attempt) -> None:
        try:
            outcome = await attempt.run(self._executor, self.node_id)
        except BaseException as exc:
            log.exception("task %s crashed the runner", attempt.job.task_id)
            outcome = attempt._failure(exc, self.node_id)
        finally:
            self._running.pop(attempt.job.task_id, None)
            self.admission.finished(attempt.job.capability)
            self._slot_freed.set()
        if outcome is not None:
            self.recorder.add_outcome(outcome)

    def emit_event(self, task_id: str, token: int, kind: str, data: Any) -> None:
        """Runtime hook for TaskContext: events go through the recorder."""
        self.recorder.emit_event(task_id, token, kind, data)

    # --- delayed tasks, cancellation, watchdog ----------------------------------------

    async def _release_loop(self) -> None:
        """Move due delayed tasks into their queues. Every node runs this; the script
        makes each release happen once."""
        backoff = Backoff()
        while not self._closing.is_set():
            try:
                released, next_due = await self._release_round()
                backoff.reset()
            except ShoalError as exc:
                log.warning("releasing delayed tasks failed: %s", exc)
                await self._until(self._closing, timeout=backoff.next_delay())
                continue
            if released:
                continue
            wait = RELEASE_INTERVAL_S
            if next_due >= 0:
                wait = min(wait, max(0.0, (next_due - protocol.now_ms()) / 1000))
            await self._until(self._closing, timeout=wait)  # until the next due task

    async def _release_round(self) -> tuple[bool, int]:
        """Release due tasks in every key group; (whether a group had a full batch,
        the earliest next due time, -1 if none)."""
        full, next_due = False, -1
        for group in range(self.keys.groups):
            args = [self.keys.group_prefix(group), protocol.now_ms(), RELEASE_BATCH]
            async with self.client.errors():
                released, due = await self.client.scripts.release([self.keys.delayed(group)], args)
            full = full or released >= RELEASE_BATCH
            if due >= 0 and (next_due < 0 or due < next_due):
                next_due = due
        return full, next_due

    async def _cancel_listener(self) -> None:
        """Cancel running handlers whose cancellation was asked (pub/sub; the record's
        'cancel' flag makes the outcome 'cancelled' even if a message is missed while
        the listener reconnects)."""
        backoff = Backoff()
        while not self._closing.is_set():
            channels = [self.keys.cancel_channel(g) for g in range(self.keys.groups)]
            subscription = ShardSubscription(self.client.blocking, channels)
            try:
                await subscription.open()
                backoff.reset()
                while not self._closing.is_set():
                    data = await subscription.next(timeout=CANCEL_LISTEN_S)
                    if data is not None:
                        self._cancel_running(data.decode())
            except redis.RedisError as exc:
                log.warning("cancel listener: %s; reconnecting", translate(exc, self.client.url))
                await self._until(self._closing, timeout=backoff.next_delay())
            finally:
                await subscription.close()

    def _cancel_running(self, task_id: str) -> None:
        """Cancel a running attempt; again only if it still runs RECANCEL_AFTER_S after
        (a handler may swallow one cancellation; a second at once would cut the
        cleanup of one that did not)."""
        attempt = self._running.get(task_id)
        if attempt is None and self.agents is not None:
            attempt = self.agents.running_tasks.get(task_id)
        if attempt is None or attempt.task is None:
            return
        now = time.monotonic()
        asked = self._cancels_asked.get(task_id)
        if asked is not None and now - asked < RECANCEL_AFTER_S:
            return
        self._cancels_asked[task_id] = now
        attempt.ctx.cancel_requested = True
        # Not task.cancel() at once: an attempt fetched a moment ago may not have run
        # its first step, and cancelling a task before that skips its whole body —
        # its outcome and its slot's release with it. The task's first step is already
        # in the loop's queue; this call comes after it, so the body has begun.
        asyncio.get_running_loop().call_soon(attempt.task.cancel)

    async def _cancel_sweep(self) -> None:
        """Every CANCEL_SWEEP_S, look at the 'cancel' flag of the tasks running here:
        a cancel published before the listener's subscription was in place (a node
        that just started) or while it reconnected is not missed, only later."""
        while not await self._until(self._closing, timeout=CANCEL_SWEEP_S):
            running = list(self._running)
            if self.agents is not None:
                running += list(self.agents.running_tasks)
            for gone in self._cancels_asked.keys() - set(running):
                del self._cancels_asked[gone]
            if not running:
                continue
            try:
                async with self.client.errors():
                    pipe = self.client.redis.pipeline(transaction=False)
                    for task_id in running:
                        pipe.hget(self.keys.task(task_id), "cancel")
                    flags = await pipe.execute()
            except ShoalError:
                continue  # the engine is away: the next round looks again
            for task_id, flag in zip(running, flags, strict=True):
                if flag == b"1":
                    self._cancel_running(task_id)

    async def _watchdog(self) -> None:
        """Judge the node by progress, not by its sockets: report (log and heartbeat)
        when it holds results it cannot record, or has free slots but has not
        managed to ask the engine for work, for longer than ``stall_after``."""
        limit = self.config.stall_after
        self._loop_tick = time.monotonic()
        while not await self._until(self._closing, timeout=min(1.0, limit / 2)):
            now, reason = time.monotonic(), ""
            self._loop_tick = now
            pending = self.recorder.pending_since
            if pending is not None and now - pending > limit:
                reason = f"holds unrecorded results for {now - pending:.0f}s"
            idle = now - self._last_progress
            free = self.config.concurrency - len(self._running)
            # (an idle node blocks up to IDLE_BLOCK_MS per fetch: that is progress too)
            fetching = bool(self._specs)  # a node of addressed agents only has no queues
            if not reason and fetching and free > 0 and self._serving.is_set() and idle > limit + 1:
                reason = f"has {free} free slot(s) but fetched nothing for {idle:.0f}s"
            if reason != self.stalled:
                if reason:
                    log.error("watchdog: node %s %s", self.node_id, reason)
                else:
                    log.info("watchdog: node %s makes progress again", self.node_id)
                self.stalled = reason

    def health(self) -> tuple[bool, str]:
        """Liveness (``/healthz``; read from the metrics thread): fails only when the
        event loop stops turning, which a restart cures. An engine outage or a stall
        is not a reason to restart (it would not help): that is ``readiness``."""
        if self._loop_tick is None:
            return True, "starting"
        blocked = time.monotonic() - self._loop_tick
        if blocked > LOOP_BLOCKED_AFTER_S:
            return False, f"event loop unresponsive for {blocked:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        """Readiness (``/readyz``): registered, taking work, and making progress."""
        if self._stopping.is_set():
            return False, "draining"
        if not self._registered:
            return False, "starting: not registered yet"
        if not self._serving.is_set():
            return False, "heartbeats are not getting through: not taking work"
        if self.stalled:
            return False, f"stalled: {self.stalled}"
        return True, "ok"


def _type_description(agent_type: type[Agent]) -> bytes:
    return protocol.encode(
        AgentTypeInfo(
            agent_type.agent_type,
            sorted(agent_type.capabilities()),
            agent_type.message_handler() is not None,
            sorted(agent_type.subscriptions()),
        )
    )


def _capability_fields(spec: CapabilitySpec) -> dict[str, Any]:
    fields: dict[str, Any] = {"handler": spec.method_name}
    if spec.max_attempts is not None:
        fields["max_attempts"] = spec.max_attempts
    if spec.timeout is not None:
        fields["timeout"] = repr(float(spec.timeout))
    if spec.max_queue_length is not None:
        fields["queue_max"] = spec.max_queue_length
    return fields


def run_node(agents: list[type[Agent]], settings: Settings, config: NodeConfig) -> None:
    """Run a node in this process. SIGINT/SIGTERM drains it; a second signal forces
    the exit at once (survivors then take its work over after ``dead_after``)."""

    async def main() -> None:
        node = Node(agents, settings, config)
        set_process_node(node.node_id)  # the one node of this process: its threads' lines too
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if node._stopping.is_set():
                log.warning("second %s: exiting at once, without draining", sig.name)
                logging.shutdown()
                os._exit(EXIT_FORCED)
            log.info("%s: draining (send it again to exit at once)", sig.name)
            node.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        await node.run()

    asyncio.run(main())
    # A sync handler that was handed back may still be running in a worker thread;
    # its task is queued elsewhere already, so do not wait for it to return.
    if any(t.name.startswith("shoal") and t.is_alive() for t in threading.enumerate()):
        logging.shutdown()
        os._exit(0)
