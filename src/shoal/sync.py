"""A blocking wrapper around the async Client, for scripts and notebooks.

It runs a private event loop in a daemon thread and forwards each call there, so
the same connection and the same inbox reader serve every call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from shoal.client import Client, DeadLetter, TaskHandle
from shoal.protocol import AgentInfo, Event, TaskInfo

T = TypeVar("T")


class SyncTaskHandle:
    """Blocking twin of TaskHandle."""

    def __init__(self, client: SyncClient, handle: TaskHandle) -> None:
        self._client = client
        self._handle = handle
        self.id = handle.id
        self.is_new = handle.is_new

    def __repr__(self) -> str:
        return f"SyncTaskHandle({self.id!r})"

    def status(self) -> TaskInfo:
        return self._client._run(self._handle.status())

    def result(self, timeout: float | None = None, *, with_traceback: bool = False) -> Any:
        return self._client._run(self._handle.result(timeout, with_traceback=with_traceback))

    def cancel(self) -> str:
        return self._client._run(self._handle.cancel())

    def events(self, after: str | None = None) -> Iterator[Event]:
        iterator = self._handle.events(after)

        async def next_event() -> Event:
            return await anext(iterator)

        while True:
            try:
                yield self._client._run(next_event())
            except StopAsyncIteration:
                return


class SyncClient:
    """``with shoal.connect() as c: c.call("summarize", text=...)``."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="shoal-sync", daemon=True
        )
        self._thread.start()
        self._run(client.connect())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def client(self) -> Client:
        return self._client

    def submit(self, capability: str, /, **kwargs: Any) -> SyncTaskHandle:
        return SyncTaskHandle(self, self._run(self._client.submit(capability, **kwargs)))

    def submit_many(
        self, capability: str, arguments: Iterable[Mapping[str, Any]], /, **options: Any
    ) -> list[SyncTaskHandle]:
        handles = self._run(self._client.submit_many(capability, list(arguments), **options))
        return [SyncTaskHandle(self, h) for h in handles]

    def call(self, capability: str, /, **kwargs: Any) -> Any:
        return self._run(self._client.call(capability, **kwargs))

    def task(self, task_id: str) -> SyncTaskHandle:
        return SyncTaskHandle(self, self._client.task(task_id))

    def status(self, task_id: str) -> TaskInfo:
        return self._run(self._client.status(task_id))

    def cancel(self, task_id: str) -> str:
        return self._run(self._client.cancel(task_id))

    def result(
        self, task_id: str, timeout: float | None = None, *, with_traceback: bool = False
    ) -> Any:
        return self._run(self._client.result(task_id, timeout, with_traceback=with_traceback))

    def events(self, task_id: str, after: str | None = None) -> Iterator[Event]:
        return self.task(task_id).events(after)

    def event_history(self, task_id: str, after: str | None = None) -> list[Event]:
        return self._run(self._client.event_history(task_id, after))

    def hosts(self, capability: str) -> list[str]:
        return self._run(self._client.hosts(capability))

    def wait_for_hosts(self, capability: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        return self._run(self._client.wait_for_hosts(capability, count, timeout))

    def dead_letters(self, capability: str, limit: int = 100) -> list[DeadLetter]:
        return self._run(self._client.dead_letters(capability, limit))

    def send(self, agent_id: str, message: Any) -> None:
        self._run(self._client.send(agent_id, message))

    def request(self, agent_id: str, message: Any, *, timeout: float = 30.0) -> Any:
        return self._run(self._client.request(agent_id, message, timeout=timeout))

    def publish(self, topic: str, message: Any, *, source: str) -> int:
        return self._run(self._client.publish(topic, message, source=source))

    def agent_state(self, agent_id: str) -> dict[str, Any] | None:
        return self._run(self._client.agent_state(agent_id))

    def delete_agent(self, agent_id: str, *, timeout: float = 30.0) -> bool:
        return self._run(self._client.delete_agent(agent_id, timeout=timeout))

    def agents(self, agent_type: str | None = None, **filters: Any) -> list[AgentInfo]:
        return self._run(self._client.agents(agent_type, **filters))

    def agent(self, agent_id: str) -> AgentInfo:
        return self._run(self._client.agent(agent_id))

    def redrive(self, capability: str, task_ids: Iterable[str] | None = None) -> list[str]:
        return self._run(self._client.redrive(capability, task_ids))


def connect(
    url: str | None = None, *, namespace: str | None = None, data_dir: str | None = None
) -> SyncClient:
    """A connected blocking client (see Client for how the engine is found)."""
    return SyncClient(Client(url, namespace=namespace, data_dir=data_dir))
