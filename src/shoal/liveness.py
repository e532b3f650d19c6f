"""Node liveness: the heartbeat, sent from a thread of its own.

Why a thread (and not a task on the node's event loop): a handler that blocks the
loop (a sync call by mistake, a long CPU-bound step) would starve a heartbeat task,
and survivors would take a healthy node's work away. A thread keeps beating while
the loop is blocked; a sync handler hogging the GIL cannot starve it either,
because CPython hands the GIL to a waiting thread every few milliseconds
(sys.getswitchinterval()). It uses its own synchronous connection, so it does not
depend on the loop's connection pool either. (Only a C extension that holds the GIL
for seconds could starve it; a separate process would survive even that, at the
price of a process per node — not worth it.)

The thread also watches the node's own deadline: if no heartbeat got through for
``dead_after`` seconds, survivors may be taking the node's work over, so the node is
told to stop taking work (``silent``); when the engine answers again, it learns
whether it was declared dead meanwhile (``dead``: its running work belongs to others
now, and it re-registers) or not (``ok``: it carries on).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
import redis

from shoal.engine import open_sync_connection
from shoal.keys import Keys
from shoal.scripts import load_source

log = logging.getLogger("shoal.liveness")

LoadProbe = Callable[[], dict[str, Any]]
Notify = Callable[[str], None]  # called with "silent", "dead" or "ok"


class Heartbeat:
    """Beats every ``interval`` seconds until stopped; reports state changes."""

    def __init__(
        self,
        url: str,
        keys: Keys,
        node_id: str,
        interval: float,
        dead_after: float,
        load: LoadProbe,
        notify: Notify,
    ) -> None:
        self._url = url
        self._keys = keys
        self._node_id = node_id
        self._interval = interval
        self._dead_after = dead_after
        self._load = load
        self._notify = notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-heartbeat", daemon=True)
        self._process = psutil.Process(os.getpid())
        self._state = "ok"
        self.last_ok = time.monotonic()

    def start(self) -> None:
        self._process.cpu_percent(None)  # prime: the first reading is meaningless
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 5)

    def _run(self) -> None:
        conn = open_sync_connection(self._url, timeout=max(self._interval, 0.5))
        beat = conn.register_script(load_source("beat"))
        try:
            while not self._stop.wait(self._interval):
                self._beat_once(beat)
        finally:
            conn.close()

    def _beat_once(self, beat: Any) -> None:
        try:
            answer = beat(keys=[self._keys.nodes], args=self._args())
        except redis.RedisError as exc:
            silent_for = time.monotonic() - self.last_ok
            if silent_for > self._dead_after:
                self._change("silent", f"no heartbeat got through for {silent_for:.1f}s: {exc}")
            return
        if answer in (b"dead", b"unknown"):
            self._change("dead", "a survivor declared this node dead")
            return
        self.last_ok = time.monotonic()
        self._change("ok", "heartbeats get through again")

    def _args(self) -> list[Any]:
        load = self._load()
        load["cpu"] = self._process.cpu_percent(None)
        load["rss"] = self._process.memory_info().rss
        flat: list[Any] = [self._keys.prefix, self._node_id, int(time.time() * 1000)]
        for field, value in load.items():
            flat += [field, value]
        return flat

    def _change(self, state: str, reason: str) -> None:
        if state == self._state:
            return
        log.warning("node %s: %s", self._node_id, reason)
        self._state = state
        self._notify(state)

    def reset(self) -> None:
        """After the node re-registered: beats count as healthy again."""
        self.last_ok = time.monotonic()
        self._state = "ok"


async def register(client: Any, node_id: str, description: dict[str, Any]) -> None:
    """Enter the node into the live set (state 'alive', first heartbeat now)."""
    keys, now = client.keys, int(time.time() * 1000)
    async with client.errors():
        pipe = client.redis.pipeline(transaction=True)
        pipe.delete(keys.node(node_id))
        pipe.hset(keys.node(node_id), mapping={**description, "state": "alive", "heartbeat": now})
        pipe.zadd(keys.nodes, {node_id: now})
        pipe.zrem(keys.dead_nodes, node_id)
        for cap in _csv(description["capabilities"]):
            pipe.zadd(keys.hosts(cap), {node_id: now})
        for agent_type in _csv(description.get("agent_types", "")):
            pipe.zadd(keys.agent_hosts(agent_type), {node_id: now})
        await pipe.execute()


def _csv(value: Any) -> list[str]:
    return [part for part in str(value).split(",") if part]


async def deregister(
    client: Any, node_id: str, capabilities: list[str], agent_types: Sequence[str] = ()
) -> None:
    """Leave the live set (after draining): no survivor needs to reap this node."""
    keys = client.keys
    async with client.errors():
        pipe = client.redis.pipeline(transaction=True)
        pipe.zrem(keys.nodes, node_id)
        for cap in capabilities:
            pipe.zrem(keys.hosts(cap), node_id)
        for agent_type in agent_types:
            pipe.zrem(keys.agent_hosts(agent_type), node_id)
        pipe.delete(keys.active(node_id))
        pipe.delete(keys.node(node_id))
        await pipe.execute()
