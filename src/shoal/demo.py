"""``shoal demo``: why Shoal exists, in under a minute, on this machine alone.

It starts a 3-node cluster (``shoal.supervisor``), runs the bundled examples'
mixed workload — documents through the pipeline (stateless tasks fanning out to
stateful summariser agents) and chat turns to per-user agents that call other
capabilities — SIGKILLs one node in the middle, measures the takeover, and checks
every answer: a task that did not succeed, or succeeded with a wrong answer, makes
the demo fail. Nothing is simulated: the node is really killed, the work really
moves.

The measuring and checking live here; the rich rendering in ``shoal.demo_view``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from shoal import protocol
from shoal.client import Client, TaskHandle
from shoal.errors import ConfigurationError, ResultTimeout, TaskCancelled, TaskFailed
from shoal.protocol import TaskInfo
from shoal.supervisor import Supervisor

POLL_S = 0.05  # how often the takeover is looked at (the engine does not announce it)


@dataclass(frozen=True)
class DemoConfig:
    """The workload: its size is what a 2-core laptop runs in ~15 s on 3 nodes."""

    documents: int = 600
    users: int = 16
    turns: int = 16
    in_flight: int = 32  # documents submitted and not finished, at most
    kill_at: float = 0.3  # kill a node when this share of the work is done
    timeout: float = 60.0  # give up waiting on the workload this long after it began
    app: str = "shoal.examples"  # the module providing the workload's capabilities

    def __post_init__(self) -> None:
        if self.documents < 1 or self.users < 0 or self.turns < 0:
            raise ConfigurationError("documents must be >= 1, users and turns >= 0")
        if not 0 < self.kill_at < 1:
            raise ConfigurationError(f"kill_at must be within (0, 1), got {self.kill_at}")
        if self.in_flight < 1 or self.timeout <= 0:
            raise ConfigurationError("in_flight must be >= 1 and timeout > 0")

    @property
    def total(self) -> int:
        return self.documents + self.users * self.turns


@dataclass
class Outcome:
    """One top-level task of the workload, as the demo saw it end."""

    task_id: str
    kind: str  # "document" or "chat"
    status: str  # succeeded, failed, lost
    latency_s: float
    node: str | None = None
    wrong: str = ""  # why the answer is wrong, if it is


@dataclass
class Takeover:
    """What happened to a killed node's work, with times since the SIGKILL."""

    victim: str
    pid: int
    running_tasks: dict[str, str] = field(default_factory=dict)  # id -> capability, running
    active_agents: list[str] = field(default_factory=list)
    partitions: dict[str, int] = field(default_factory=dict)  # agent type -> count it held
    killed_at_ms: int = 0
    finished_before_kill: int = 0  # of running_tasks: ended in the instant before the kill
    declared_dead_s: float | None = None
    partitions_moved_s: float | None = None
    tasks_done_s: float | None = None
    moved_to: dict[str, str] = field(default_factory=dict)  # task id -> node that finished it
    agents_to: dict[str, str] = field(default_factory=dict)  # agent -> node it answered from next
    partitions_to: dict[str, int] = field(default_factory=dict)  # node -> partitions now

    @property
    def seconds(self) -> float | None:
        """Until every piece of its work had a new home (None: not within the wait)."""
        times = [self.declared_dead_s, self.partitions_moved_s]
        times += [self.tasks_done_s] if self.running_tasks else []
        return None if any(t is None for t in times) else max(t for t in times if t is not None)


@dataclass
class DemoReport:
    outcomes: list[Outcome]
    takeover: Takeover | None
    duplicates: int  # late outcomes refused, all capabilities (sub-tasks too)
    retried: int  # top-level tasks that needed more than one attempt
    by_node: dict[str, Counter[str]]  # node -> kind -> top-level tasks it finished
    agents_by_node: dict[str, tuple[int, int]]  # node -> (partitions, active agents) at the end
    seconds: float

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def wrong(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.wrong]

    @property
    def passed(self) -> bool:
        """Every task succeeded with the right answer: nothing lost, nothing wrong."""
        return all(o.status == "succeeded" and not o.wrong for o in self.outcomes)

    def latency(self, quantile: float) -> float:
        times = sorted(o.latency_s for o in self.outcomes if o.status == "succeeded")
        if not times:
            return 0.0
        return times[min(len(times) - 1, int(quantile * len(times)))]


class Workload:
    """Runs the documents and chats, records each outcome, tells the view."""

    def __init__(
        self,
        client: Client,
        config: DemoConfig,
        on_outcome: Callable[[Outcome], None],
    ) -> None:
        self.client, self.config = client, config
        self._on_outcome = on_outcome
        self.outcomes: list[Outcome] = []
        self.running: dict[str, TaskHandle] = {}  # top-level tasks not finished yet
        # chat agent id -> (when, node) of each answered turn: where the agent lived
        self.chat_nodes: dict[str, list[tuple[float, str]]] = {}
        self.deadline = time.monotonic() + config.timeout
        self.examples = _examples(config.app)
        self._documents_done = 0
        self._document_ended = asyncio.Condition()

    @property
    def done(self) -> int:
        return len(self.outcomes)

    async def run(self) -> None:
        workload = self.examples["workload"]
        documents = workload.documents(self.config.documents)
        script = workload.chat_script(self.config.users, self.config.turns)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._documents(documents))
            for user in dict.fromkeys(u for u, _ in script):
                lines = [text for u, text in script if u == user]
                group.create_task(self._conversation(user, lines))

    async def _documents(self, documents: list[tuple[str, str]]) -> None:
        slots = asyncio.Semaphore(self.config.in_flight)

        async def one(doc_id: str, text: str) -> None:
            async with slots:
                started = time.monotonic()
                handle = await self.client.submit("process_document", doc_id=doc_id, text=text)
                await self._finish(handle, "document", started, self._check_document(text))
            async with self._document_ended:
                self._documents_done += 1
                self._document_ended.notify_all()

        async with asyncio.TaskGroup() as group:
            for doc_id, text in documents:
                group.create_task(one(doc_id, text))

    async def _conversation(self, user: str, lines: list[str]) -> None:
        """One user's turns in order, each after the previous answer (as a person
        types), spread over the run: turn t waits until (t-1)/turns of the documents
        are done, so conversations are under way whenever the node is killed."""
        for turn, text in enumerate(lines, start=1):
            await self._documents_reach((turn - 1) / len(lines))
            started = time.monotonic()
            handle = await self.client.submit("chat", agent=f"chat/{user}", text=text)
            outcome = await self._finish(handle, "chat", started, _check_chat(user, turn))
            if outcome.node:
                self.chat_nodes.setdefault(f"chat/{user}", []).append(
                    (time.monotonic(), outcome.node)
                )

    async def _documents_reach(self, share: float) -> None:
        """Until that share of the documents ended (or the deadline: a document that
        never ends must not keep the chats from being submitted and counted)."""
        wanted = share * self.config.documents
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                async with self._document_ended:
                    await self._document_ended.wait_for(lambda: self._documents_done >= wanted)

    async def _finish(
        self,
        handle: TaskHandle,
        kind: str,
        started: float,
        check: Callable[[Any], str],
    ) -> Outcome:
        self.running[handle.id] = handle
        status, result, wrong = "succeeded", None, ""
        try:
            result = await handle.result(timeout=max(0.1, self.deadline - time.monotonic()))
            wrong = check(result)
        except ResultTimeout:
            status = "lost"
        except (TaskFailed, TaskCancelled) as exc:
            status, wrong = "failed", str(exc)
        finally:
            self.running.pop(handle.id, None)
        node = result.get("node") if isinstance(result, dict) else None
        outcome = Outcome(handle.id, kind, status, time.monotonic() - started, node, wrong)
        self.outcomes.append(outcome)
        self._on_outcome(outcome)
        return outcome

    def _check_document(self, text: str) -> Callable[[Any], str]:
        expected = self.examples["pipeline"].expected_summary(text)

        def check(result: Any) -> str:
            if not isinstance(result, dict) or result.get("summary") != expected:
                return f"summary differs from the expected one: {result!r:.200}"
            return ""

        return check


def _check_chat(user: str, turn: int) -> Callable[[Any], str]:
    """A turn counted twice (its state change applied twice) shows as a skipped number."""

    def check(result: Any) -> str:
        if not isinstance(result, dict) or not result.get("reply"):
            return f"no reply: {result!r:.200}"
        if result.get("user") != user or result.get("turn") != turn:
            return (
                f"expected {user} turn {turn}, got {result.get('user')} turn {result.get('turn')}"
            )
        return ""

    return check


def _examples(app: str) -> dict[str, Any]:
    """The workload's modules: ``<app>.workload`` and ``<app>.pipeline``."""
    try:
        return {name: importlib.import_module(f"{app}.{name}") for name in ("workload", "pipeline")}
    except ImportError as exc:
        raise ConfigurationError(
            f"the demo needs {app}.workload and {app}.pipeline: {exc}"
        ) from None


# --- the kill and the takeover -----------------------------------------------------------


async def kill_when(
    workload: Workload,
    supervisor: Supervisor,
    on_kill: Callable[[Takeover], None],
) -> Takeover:
    """Wait until ``kill_at`` of the work is done, snapshot the busiest node's work,
    SIGKILL it, then follow its work to its new homes."""
    client = workload.client
    await _until(lambda: _ready_to_kill(workload), workload.deadline)
    nodes = [n for n in supervisor.children if n != "gateway"]
    victim = _busiest_node(await _running(workload), nodes)
    takeover = await _snapshot(client, victim)
    # the directory lists active agents as nodes publish them (not at once): add the
    # chat agents whose last answer came from the victim
    last = {agent: turns[-1][1] for agent, turns in workload.chat_nodes.items()}
    takeover.active_agents = sorted(
        set(takeover.active_agents) | {a for a, node in last.items() if node == victim}
    )
    # last, as close to the kill as can be; one that ends before it is told apart later
    running = await _running(workload)
    takeover.running_tasks = {s.id: s.capability for s in running if s.node == victim}
    takeover.pid = supervisor.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    takeover.killed_at_ms = protocol.now_ms()
    on_kill(takeover)
    await _follow_takeover(client, takeover, killed, workload.deadline)
    takeover.agents_to = await _new_homes(workload, takeover, killed)
    return takeover


async def _new_homes(workload: Workload, takeover: Takeover, killed: float) -> dict[str, str]:
    """Where each chat agent of the victim answered first after the kill (waits for
    the workload to give each of them a turn, within the deadline)."""
    moved = [a for a in takeover.active_agents if a in workload.chat_nodes]

    async def answered() -> bool:
        return all(workload.chat_nodes[a][-1][0] > killed for a in moved) or workload.done == (
            workload.config.total
        )

    await _until(answered, workload.deadline)
    homes = {}
    for agent in moved:
        after = [node for at, node in workload.chat_nodes[agent] if at > killed]
        if after:
            homes[agent] = after[0]
    return homes


async def _ready_to_kill(workload: Workload) -> bool:
    return workload.done >= workload.config.kill_at * workload.config.total


async def _until(probe: Callable[[], Awaitable[bool]], deadline: float) -> bool:
    """Look every POLL_S until ``probe`` is true (other processes change the engine;
    nothing announces it) or the deadline passes."""
    while not await probe():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def _running(workload: Workload) -> list[TaskInfo]:
    """The workload's tasks running on a node right now."""
    handles = list(workload.running.values())
    infos = await asyncio.gather(*(h.status() for h in handles), return_exceptions=True)
    return [i for i in infos if isinstance(i, TaskInfo) and i.status == "running"]


def _busiest_node(running: list[TaskInfo], nodes: list[str]) -> str:
    """The node running the most of the workload's tasks: killing it shows the most
    work moving."""
    load = Counter(i.node for i in running if i.node in nodes)
    return max(sorted(nodes), key=lambda n: load[n])


async def _snapshot(client: Client, victim: str) -> Takeover:
    """The victim's active agents and the partitions it holds, before the kill."""
    takeover = Takeover(victim=victim, pid=0)
    agents = await client.agents(active=True, limit=10_000)
    takeover.active_agents = sorted(a.id for a in agents if a.node == victim)
    for agent_type in (await client.cluster()).agent_types:
        if agent_type.owners.get(victim):
            takeover.partitions[agent_type.name] = agent_type.owners[victim]
    return takeover


async def _follow_takeover(
    client: Client, takeover: Takeover, killed: float, deadline: float
) -> None:
    """Record when the victim was declared dead, when its partitions had new owners,
    and when the tasks it was running had finished on another node."""
    victim = takeover.victim
    while time.monotonic() < deadline:
        state = await client.cluster()
        now = time.monotonic() - killed
        if takeover.declared_dead_s is None and all(
            n.state == "dead" for n in state.nodes if n.id == victim
        ):
            takeover.declared_dead_s = now
        if takeover.partitions_moved_s is None and _partitions_moved(state.agent_types, victim):
            takeover.partitions_moved_s = now
            takeover.partitions_to = _owners(state.agent_types, takeover.partitions)
        if takeover.tasks_done_s is None and await _tasks_moved(client, takeover):
            takeover.tasks_done_s = now
        if takeover.seconds is not None:
            return
        await asyncio.sleep(POLL_S)  # the engine does not announce a takeover: look again


def _partitions_moved(agent_types: Any, victim: str) -> bool:
    return all(not t.owners.get(victim) and not t.unowned for t in agent_types)


def _owners(agent_types: Any, moved: dict[str, int]) -> dict[str, int]:
    owners: Counter[str] = Counter()
    for t in agent_types:
        if t.name in moved:
            owners.update(t.owners)
    return dict(owners)


async def _tasks_moved(client: Client, takeover: Takeover) -> bool:
    """Whether every task it was running has ended; where each ended is recorded (one
    that ended on the victim itself finished in the instant before the kill)."""
    for task_id in takeover.running_tasks:
        if task_id in takeover.moved_to:
            continue
        info = await client.status(task_id)
        if not info.done:
            return False
        before = info.node == takeover.victim and (info.finished_at or 0) <= takeover.killed_at_ms
        if before:
            takeover.finished_before_kill += 1
        takeover.moved_to[task_id] = info.node or "-"
    return True


# --- the whole run ---------------------------------------------------------------------


async def run_demo(
    supervisor: Supervisor,
    config: DemoConfig,
    on_outcome: Callable[[Outcome], None],
    on_kill: Callable[[Takeover], None],
) -> DemoReport:
    """The workload with a kill in the middle, then the counts that judge it."""
    started = time.monotonic()
    async with Client(settings=supervisor.settings) as client:
        workload = Workload(client, config, on_outcome)
        killer = asyncio.create_task(kill_when(workload, supervisor, on_kill))
        try:
            await workload.run()
            takeover: Takeover | None = await asyncio.wait_for(
                killer, max(1.0, workload.deadline - time.monotonic())
            )
        except TimeoutError:
            takeover = None  # the report says the takeover was not seen in time
        finally:
            killer.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await killer
        return await _report(client, workload, takeover, time.monotonic() - started)


async def _report(
    client: Client, workload: Workload, takeover: Takeover | None, seconds: float
) -> DemoReport:
    state = await client.cluster()
    retried = 0
    ids = [o.task_id for o in workload.outcomes if o.status == "succeeded"]
    for start in range(0, len(ids), 200):
        infos = await asyncio.gather(*(client.status(i) for i in ids[start : start + 200]))
        retried += sum(1 for info in infos if info.attempts > 1)
    by_node: dict[str, Counter[str]] = {}
    for outcome in workload.outcomes:
        if outcome.node:
            by_node.setdefault(outcome.node, Counter())[outcome.kind] += 1
    return DemoReport(
        outcomes=workload.outcomes, takeover=takeover,
        duplicates=sum(q.duplicates for q in state.queues), retried=retried,
        by_node=by_node,
        agents_by_node={n.id: (n.partitions, n.active_agents) for n in state.nodes},
        seconds=seconds,
    )  # fmt: skip


def demo_namespace() -> str:
    """A fresh namespace per run: the counts are this run's alone."""
    return f"demo-{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:4]}"
