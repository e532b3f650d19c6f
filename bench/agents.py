"""Agent plane: many agents, request round trips, long conversations.

    python -m bench.agents --agents [N] [--nodes 1|2]     # default N = 1,000,000
    python -m bench.agents --request-rtt [-k 1000]
    python -m bench.agents --conversations [M] [--turns 5] [--io-s 1.0]

With none of the three flags, all three run. A run starts its own embedded engine;
each measurement uses a fresh namespace and its own node processes
(bench/agents_app.py), prints JSON and writes it to
bench/results/: agents-many-<N>-<nodes>node[-pipeline].json, agents-request-rtt.json,
agents-conversations-<M>.json. Progress goes to stderr. ``--profile-nodes DIR``
runs the node processes under pyinstrument (text reports DIR/<node>.txt).

--agents: N distinct agents (``bench_counter/<i>``) each get one message from the
client (``Client.send`` from many concurrent senders; ``--send-mode pipeline``
puts the same send-script calls in pipelines instead, to take the client's
per-call cost out); each writes state {"n": 1}. Messages/s from the first send
until every state is in the engine (the state hashes' HLEN over all partitions),
then the engine's memory per agent once the agents went idle (deactivated:
``--idle-after``): INFO used_memory after minus before, over N, with what it is
made of (state hashes, leftover mailbox streams, the directory hashes).

--request-rtt: a Pinger agent on one node process asks a Ponger agent on another
node process ``k`` times in a row (``ctx.request``) and times each round trip;
then the benchmark client asks the Ponger ``k`` times (``Client.request``).

--conversations: M agents on 2 nodes each run ``--turns`` turns; a turn awaits
``--io-s`` seconds of simulated I/O, then sends the next turn's message to
itself. Time until every agent finished its last turn, against the ideal
turns * io_s, and the node processes' RSS (psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil

from bench.common import REPO, code_version, emit, machine, percentile, private_engine, save
from shoal import Client, protocol
from shoal.routing import assignment, partition_of

COUNTER = "bench_counter"


def log(message: str) -> None:
    print(f"[agents {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- node processes ----------------------------------------------------------------


@dataclass
class NodeSpec:
    name: str
    types: list[str]
    concurrency: int = 256
    max_active_agents: int = 10_000
    idle_after: float = 300.0
    profile_dir: str | None = None  # run the node under pyinstrument, text report here

    def argv(self) -> list[str]:
        profiler = []
        if self.profile_dir:
            out = os.path.join(os.path.abspath(self.profile_dir), f"{self.name}.txt")
            profiler = ["-m", "pyinstrument", "-i", "0.001", "-r", "text", "-o", out]
        return [
            sys.executable, *profiler, "-m", "bench.agents_app", "--types", ",".join(self.types),
            "--name", self.name, "--concurrency", str(self.concurrency),
            "--max-active-agents", str(self.max_active_agents),
            "--idle-after", str(self.idle_after), "--log-level", "warning",
        ]  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "types": self.types,
            "concurrency": self.concurrency,
            "max_active_agents": self.max_active_agents,
            "idle_after_s": self.idle_after,
        }


@contextlib.contextmanager
def agent_nodes(
    url: str, namespace: str, specs: list[NodeSpec]
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """One ``bench.agents_app`` node process per spec; SIGTERM (then kill) at the end."""
    env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": namespace}
    procs = [subprocess.Popen(spec.argv(), cwd=REPO, env=env) for spec in specs]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_ready(
    client: Client,
    specs: list[NodeSpec],
    procs: list[subprocess.Popen[bytes]],
    timeout: float = 90.0,
) -> None:
    """Until every partition of every hosted type is leased by the node rendezvous
    hashing gives it to (so no hand-over happens during the measurement)."""
    partitions = await client.partitions()
    hosts: dict[str, list[str]] = {}
    for spec in specs:
        for agent_type in spec.types:
            hosts.setdefault(agent_type, []).append(spec.name)
    expected = {
        (agent_type, p): owner
        for agent_type, names in hosts.items()
        for p, owner in assignment(partitions, dict.fromkeys(names, 1.0)).items()
    }
    wanted = sorted(expected)
    deadline = time.monotonic() + timeout
    while True:
        pipe = client.redis.pipeline(transaction=False)
        for agent_type, p in wanted:
            pipe.get(client.keys.lease(agent_type, p))
        leases = await pipe.execute()
        owners = {
            part: raw.decode().rsplit(" ", 1)[0] if raw else None
            for part, raw in zip(wanted, leases, strict=True)
        }
        types = await client.agent_types()
        if owners == expected and hosts.keys() <= types.keys():
            return
        if exited := [s.name for s, p in zip(specs, procs, strict=True) if p.poll() is not None]:
            raise RuntimeError(f"node process(es) exited before they were ready: {exited}")
        if time.monotonic() > deadline:
            settled = sum(owners[p] == expected[p] for p in wanted)
            raise RuntimeError(f"nodes not ready after {timeout}s: {settled}/{len(wanted)} leases")
        await asyncio.sleep(0.1)  # nodes acquire leases once per heartbeat interval


def node_rss(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    return [psutil.Process(p.pid).memory_info().rss for p in procs]


def node_cpu(procs: list[subprocess.Popen[bytes]]) -> list[float]:
    out = []
    for p in procs:
        times = psutil.Process(p.pid).cpu_times()
        out.append(times.user + times.system)
    return out


async def engine_info(client: Client, section: str) -> dict[str, Any]:
    info: dict[str, Any] = await client.redis.info(section)
    return info


async def engine_cpu(client: Client) -> float:
    cpu = await engine_info(client, "cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


async def node_records(client: Client, names: list[str]) -> dict[str, dict[str, str]]:
    pipe = client.redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(client.keys.node(name))
    rows = await pipe.execute()
    return {
        name: {k.decode(): v.decode() for k, v in row.items()}
        for name, row in zip(names, rows, strict=True)
    }


# --- 1. many agents, one message each -----------------------------------------------


async def _state_count(client: Client, agent_type: str, partitions: int) -> int:
    pipe = client.redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.hlen(client.keys.state(agent_type, p))
    return sum(await pipe.execute())


async def _send_all(client: Client, n: int, mode: str, concurrency: int, sent: list[int]) -> None:
    """Send one message to each of bench_counter/0 .. /n-1; ``sent[0]`` counts."""
    if mode == "send":
        numbers = iter(range(n))

        async def sender() -> None:
            for i in numbers:
                await client.send(f"{COUNTER}/{i}", 1)
                sent[0] += 1

        await asyncio.gather(*(sender() for _ in range(concurrency)))
        return
    # pipeline: the send script Client.send runs, queued in pipelines of CHUNK calls
    chunk = 1000
    partitions = await client.partitions()
    await client.send(f"{COUNTER}/0", 1)  # checks the type as send does; loads the script
    sent[0] = 1
    head: list[str | int | bytes] = [client.keys.prefix, client.settings.queue_max_length]
    payload = protocol.encode(1)
    starts = iter(range(1, n, chunk))

    async def piper() -> None:
        for first in starts:
            pipe = client.redis.pipeline(transaction=False)
            for i in range(first, min(n, first + chunk)):
                agent_id = f"{COUNTER}/{i}"
                mbox = client.keys.mailbox(COUNTER, partition_of(agent_id, partitions))
                client.scripts.send.queue(
                    pipe, [mbox], [*head, "k", "msg", "a", agent_id, "d", payload]
                )
            replies = await pipe.execute()
            if not all(replies):
                raise RuntimeError("a mailbox was full")
            sent[0] += len(replies)

    await asyncio.gather(*(piper() for _ in range(max(1, min(concurrency, 4)))))


async def _memory_breakdown(
    client: Client, partitions: int, names: list[str], sample: int = 8
) -> dict[str, Any]:
    r = client.redis
    step = max(1, partitions // sample)
    sampled = list(range(0, partitions, step))[:sample]
    pipe = r.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(client.keys.mailbox(COUNTER, p))
    for p in sampled:
        pipe.memory_usage(client.keys.state(COUNTER, p), samples=0)
        pipe.memory_usage(client.keys.mailbox(COUNTER, p), samples=0)
        pipe.hlen(client.keys.state(COUNTER, p))
    for name in names:
        pipe.hlen(client.keys.active(name))
    pipe.object("encoding", client.keys.state(COUNTER, 0))
    pipe.dbsize()
    replies = await pipe.execute()
    xlens, rest = replies[:partitions], replies[partitions:]
    state_bytes = [rest[3 * i] or 0 for i in range(len(sampled))]
    mailbox_bytes = [rest[3 * i + 1] or 0 for i in range(len(sampled))]
    sampled_fields = [rest[3 * i + 2] for i in range(len(sampled))]
    tail = rest[3 * len(sampled) :]
    active = dict(zip(names, tail[: len(names)], strict=True))
    encoding, dbsize = tail[len(names)], tail[len(names) + 1]
    mean_state = sum(state_bytes) / len(sampled)
    mean_mailbox = sum(mailbox_bytes) / len(sampled)
    return {
        "state_hashes": {
            "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
            "sampled_partitions": sampled,
            "memory_usage_bytes_sampled": state_bytes,
            "fields_sampled": sampled_fields,
            "bytes_per_field": round(sum(state_bytes) / max(1, sum(sampled_fields)), 1),
            "estimated_total_bytes": round(mean_state * partitions),
        },
        "mailboxes": {
            "entries_left_total": sum(xlens),
            "memory_usage_bytes_sampled": mailbox_bytes,
            "estimated_total_bytes": round(mean_mailbox * partitions),
        },
        "active_directory_entries": active,
        "keys_in_engine": dbsize,
    }


_MEMORY_FIELDS = (
    "used_memory", "used_memory_dataset", "used_memory_overhead", "used_memory_rss",
    "mem_fragmentation_ratio", "mem_aof_buffer", "mem_clients_normal",
)  # fmt: skip


async def _memory(client: Client) -> dict[str, Any]:
    info = await engine_info(client, "memory")
    return {k: info.get(k) for k in _MEMORY_FIELDS}


async def _wait_idle(
    client: Client, names: list[str], turns: int, timeout: float
) -> tuple[float, bool]:
    """Until the nodes' heartbeats count ``turns`` turns and then no active agents,
    and the directory hashes they publish are empty (twice, a directory round apart)."""
    start = time.perf_counter()
    last_log, quiet_since = 0.0, None
    while time.perf_counter() - start < timeout:
        records = await node_records(client, names)
        counted = sum(int(rec.get("turns", "0")) for rec in records.values())
        active = [int(rec.get("active_agents", "0")) for rec in records.values()]
        pipe = client.redis.pipeline(transaction=False)
        for name in names:
            pipe.hlen(client.keys.active(name))
        listed = await pipe.execute()
        now = time.perf_counter()
        if counted >= turns and not any(active) and not any(listed):
            quiet_since = quiet_since or now
            if now - quiet_since >= 2.0:
                return now - start, True
        else:
            quiet_since = None
        if now - last_log > 5:
            last_log = now
            log(f"waiting for idle: turns {counted:,}, active {active}, directory {listed}")
        await asyncio.sleep(0.5)
    return time.perf_counter() - start, False


async def _many(
    url: str, namespace: str, n: int, specs: list[NodeSpec], procs: list[subprocess.Popen[bytes]],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    names = [s.name for s in specs]
    # Two clients: the senders keep every connection of one client's command pool
    # busy, and a poll queued on that pool waits until the sending ends (redis-py's
    # BlockingConnectionPool is not fair), so progress and memory are read on another.
    async with (
        Client(url, namespace=namespace) as client,
        Client(url, namespace=namespace) as monitor,
    ):
        await wait_ready(monitor, specs, procs)
        partitions = await monitor.partitions()
        await asyncio.sleep(1.0)  # let the nodes' first directory publish etc. settle
        before = await _memory(monitor)
        cpu_engine0, cpu_nodes0, cpu_client0 = (
            await engine_cpu(monitor),
            node_cpu(procs),
            time.process_time(),
        )
        sent = [0]
        start = time.perf_counter()
        sending = asyncio.ensure_future(
            _send_all(client, n, args.send_mode, args.send_concurrency, sent)
        )
        sent_at: list[float] = []
        sending.add_done_callback(lambda _: sent_at.append(time.perf_counter()))
        written, last_log, last_written, last_t = 0, start, 0, start
        while written < n:
            await asyncio.sleep(0.25)
            if sending.done():
                sending.result()  # raises a send error
            written = await _state_count(monitor, COUNTER, partitions)
            now = time.perf_counter()
            if now - last_log >= 2.0:
                rate = (written - last_written) / (now - last_t)
                log(
                    f"{now - start:7.1f}s sent {sent[0]:,}/{n:,} written {written:,} "
                    f"({rate:,.0f}/s now, {written / (now - start):,.0f}/s overall)"
                )
                last_log, last_written, last_t = now, written, now
        done = time.perf_counter()
        await sending
        cpu = {
            "engine_s": round(await engine_cpu(monitor) - cpu_engine0, 2),
            "nodes_s": [round(b - a, 2) for a, b in zip(cpu_nodes0, node_cpu(procs), strict=True)],
            "client_s": round(time.process_time() - cpu_client0, 2),
        }
        written_mem = await _memory(monitor)
        log(f"all {n:,} states written in {done - start:.1f}s; waiting for the agents to go idle")
        idle_s, went_idle = await _wait_idle(monitor, names, n, args.idle_wait)
        records = await node_records(monitor, names)
        idle = await _memory(monitor)
        breakdown = await _memory_breakdown(monitor, partitions, names)
        rss = node_rss(procs)
    seconds = done - start
    per_agent = (idle["used_memory"] - before["used_memory"]) / n
    return {
        "n": n,
        "send_mode": args.send_mode,
        "send_concurrency": args.send_concurrency,
        "partitions": partitions,
        "send_s": round(sent_at[0] - start, 3),
        "seconds": round(seconds, 3),
        "messages_per_s": round(n / seconds),
        "cpu_s": cpu,
        "turns_per_node": {name: int(rec.get("turns", 0)) for name, rec in records.items()},
        "went_idle": went_idle,
        "idle_wait_s": round(idle_s, 1),
        "engine_memory": {"before": before, "all_written": written_mem, "idle": idle},
        "engine_bytes_per_agent_written": round(
            (written_mem["used_memory"] - before["used_memory"]) / n, 1
        ),
        "engine_bytes_per_idle_agent": round(per_agent, 1),
        "target_bytes_per_idle_agent": 300,
        "breakdown": breakdown,
        "node_rss_bytes": dict(zip(names, rss, strict=True)),
    }


def run_many(url: str, n: int, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-agents-{time.monotonic_ns()}"
    specs = [
        NodeSpec(
            f"many-{i}",
            [COUNTER],
            concurrency=args.concurrency,
            idle_after=args.idle_after,
            profile_dir=args.profile_nodes,
        )
        for i in range(nodes)
    ]
    log(f"many agents: {n:,} agents, {nodes} node(s), send mode {args.send_mode}")
    with agent_nodes(url, namespace, specs) as procs:
        result = asyncio.run(_many(url, namespace, n, specs, procs, args))
    return {
        "workload": "many_agents", "nodes": nodes,
        "node_config": [s.describe() for s in specs], **result,
    }  # fmt: skip


# --- 2. request round trips ---------------------------------------------------------


def _summary(samples_s: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 0.50), 3),
        "p90_ms": round(percentile(ms, 0.90), 3),
        "p99_ms": round(percentile(ms, 0.99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(sum(ms) / len(ms), 3),
    }


async def _rtt(
    url: str, namespace: str, k: int, specs: list[NodeSpec], procs: list[subprocess.Popen[bytes]]
) -> dict[str, Any]:
    async with Client(url, namespace=namespace) as client:
        await wait_ready(client, specs, procs)
        pinger, ponger = "pinger/a", "ponger/x"
        warm = await client.call("ping_many", agent=pinger, target=ponger, k=50, result_timeout=120)
        assert len(warm) == 50
        log(f"request rtt: agent -> agent, {k} sequential requests")
        agent_samples: list[float] = await client.call(
            "ping_many", agent=pinger, target=ponger, k=k, result_timeout=30 + k * 0.1
        )
        log(f"request rtt: client -> agent, {k} sequential requests")
        for i in range(50):
            await client.request(ponger, i)
        client_samples = []
        for i in range(k):
            start = time.perf_counter()
            reply = await client.request(ponger, i, timeout=10)
            client_samples.append(time.perf_counter() - start)
            assert reply == i
    return {
        "agent_to_agent": {
            "from": f"{pinger} on {specs[0].name}", "to": f"{ponger} on {specs[1].name}",
            **_summary(agent_samples), "target_p50_ms": 2.0,
        },
        "client_to_agent": {"to": f"{ponger} on {specs[1].name}", **_summary(client_samples)},
    }  # fmt: skip


def run_rtt(url: str, k: int, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-rtt-{time.monotonic_ns()}"
    specs = [
        NodeSpec("rtt-pinger", ["pinger"], profile_dir=args.profile_nodes),
        NodeSpec("rtt-ponger", ["ponger"], profile_dir=args.profile_nodes),
    ]
    with agent_nodes(url, namespace, specs) as procs:
        result = asyncio.run(_rtt(url, namespace, k, specs, procs))
    return {"workload": "request_rtt", "node_config": [s.describe() for s in specs], **result}


# --- 3. long conversations ----------------------------------------------------------


class RssSampler:
    """Samples the node processes' RSS every ``every`` seconds from a thread."""

    def __init__(self, procs: list[subprocess.Popen[bytes]], every: float = 0.25) -> None:
        self._procs = [psutil.Process(p.pid) for p in procs]
        self._every = every
        self.peak = [0] * len(procs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, proc in enumerate(self._procs):
                with contextlib.suppress(psutil.Error):
                    self.peak[i] = max(self.peak[i], proc.memory_info().rss)
            self._stop.wait(self._every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# Counts the conversations' states by their last finished turn inside the engine
# (a state is {"turn": t}: one exact byte string per t), so polling costs the
# engine a few milliseconds and the client nothing; KEYS are the state hashes.
_COUNT_TURNS = """
local counts = {}
for i = 1, #ARGV do counts[ARGV[i]] = 0 end
for _, key in ipairs(KEYS) do
  for _, v in ipairs(redis.call('HVALS', key)) do
    if counts[v] ~= nil then counts[v] = counts[v] + 1 end
  end
end
local out = {}
for i = 1, #ARGV do out[i] = counts[ARGV[i]] end
return out
"""


async def _finished(client: Client, partitions: int, turns: int) -> tuple[int, dict[int, int]]:
    keys = [client.keys.state("conversation", p) for p in range(partitions)]
    states = [protocol.encode({"turn": t}) for t in range(1, turns + 1)]
    counts = await client.redis.eval(_COUNT_TURNS, len(keys), *keys, *states)
    by_turn = {t: c for t, c in zip(range(1, turns + 1), counts, strict=True) if c}
    return by_turn.get(turns, 0), by_turn


async def _conversations(
    url: str, namespace: str, m: int, specs: list[NodeSpec], procs: list[subprocess.Popen[bytes]],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    turns, io_s = args.turns, args.io_s
    async with (
        Client(url, namespace=namespace) as client,
        Client(url, namespace=namespace) as monitor,
    ):
        await wait_ready(monitor, specs, procs)
        partitions = await monitor.partitions()
        await asyncio.sleep(1.0)
        rss_before = node_rss(procs)
        first = {"turn": 1, "turns": turns, "io_s": io_s}
        cpu_engine0, cpu_nodes0, cpu_client0 = (
            await engine_cpu(monitor),
            node_cpu(procs),
            time.process_time(),
        )
        all_reached: dict[int, float] = {}  # turn -> when every agent had finished it
        with RssSampler(procs) as sampler:
            start = time.perf_counter()
            numbers = iter(range(m))

            async def sender() -> None:
                for i in numbers:
                    await client.send(f"conversation/{i}", first)

            await asyncio.gather(*(sender() for _ in range(args.send_concurrency)))
            sent = time.perf_counter()
            log(f"conversations: {m:,} started in {sent - start:.2f}s")
            finished, last_log = 0, start
            while finished < m:
                await asyncio.sleep(0.1)
                finished, by_turn = await _finished(monitor, partitions, turns)
                now = time.perf_counter()
                for t in range(1, turns + 1):
                    if t not in all_reached and sum(c for u, c in by_turn.items() if u >= t) == m:
                        all_reached[t] = round(now - start, 2)
                if now - last_log >= 1.0:
                    last_log = now
                    turns_now = dict(sorted(by_turn.items()))
                    log(f"{now - start:6.1f}s agents by their last finished turn: {turns_now}")
                if now - start > args.conversation_timeout:
                    break
            done = time.perf_counter()
            rss_end = node_rss(procs)
        peak = sampler.peak
        cpu = {
            "engine_s": round(await engine_cpu(monitor) - cpu_engine0, 2),
            "nodes_s": [round(b - a, 2) for a, b in zip(cpu_nodes0, node_cpu(procs), strict=True)],
            "client_s": round(time.process_time() - cpu_client0, 2),
        }
    seconds = done - start
    ideal = turns * io_s
    names = [s.name for s in specs]
    return {
        "conversations": m,
        "finished": finished,
        "turns_each": turns,
        "io_s_per_turn": io_s,
        "send_first_messages_s": round(sent - start, 3),
        "seconds": round(seconds, 3),
        "ideal_s": ideal,
        "overhead_s": round(seconds - ideal, 3),
        "turns_per_s": round(finished * turns / seconds),
        "every_agent_finished_turn_at_s": all_reached,
        "cpu_s": cpu,
        "node_rss_bytes": {
            name: {"before": b, "peak": p, "end": e}
            for name, b, p, e in zip(names, rss_before, peak, rss_end, strict=True)
        },
        "node_rss_peak_mb": [round(p / 2**20, 1) for p in peak],
        "node_rss_growth_bytes_per_conversation": round(
            sum(p - b for p, b in zip(peak, rss_before, strict=True)) / m
        ),
    }


def run_conversations(url: str, m: int, args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"bench-conv-{time.monotonic_ns()}"
    concurrency = args.concurrency_conversations or m
    specs = [
        NodeSpec(f"conv-{i}", ["conversation"], concurrency=concurrency,
                 max_active_agents=max(10_000, m), profile_dir=args.profile_nodes)
        for i in range(2)
    ]  # fmt: skip
    log(f"conversations: {m:,} on 2 nodes, concurrency {concurrency} each")
    with agent_nodes(url, namespace, specs) as procs:
        result = asyncio.run(_conversations(url, namespace, m, specs, procs, args))
    return {
        "workload": "conversations", "nodes": 2,
        "node_config": [s.describe() for s in specs], **result,
    }  # fmt: skip


# --- main ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agents",
        type=int,
        nargs="?",
        const=1_000_000,
        default=None,
        help="run the many-agents measurement with N agents (default 1,000,000)",
    )
    parser.add_argument(
        "--nodes", type=int, choices=(1, 2), default=1, help="node processes for --agents"
    )
    parser.add_argument("--send-mode", choices=("send", "pipeline"), default="send")
    parser.add_argument(
        "--send-concurrency", type=int, default=256, help="concurrent Client.send calls"
    )
    parser.add_argument("--concurrency", type=int, default=256, help="node concurrency (--agents)")
    parser.add_argument(
        "--idle-after",
        type=float,
        default=5.0,
        help="nodes deactivate agents idle this long (--agents)",
    )
    parser.add_argument(
        "--idle-wait", type=float, default=120.0, help="longest wait for the agents to go idle"
    )
    parser.add_argument("--request-rtt", action="store_true")
    parser.add_argument("-k", type=int, default=1000, help="sequential requests (--request-rtt)")
    parser.add_argument("--conversations", type=int, nargs="?", const=10_000, default=None)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--io-s", type=float, default=1.0)
    parser.add_argument(
        "--concurrency-conversations",
        type=int,
        default=None,
        help="node concurrency for --conversations (default: M)",
    )
    parser.add_argument("--conversation-timeout", type=float, default=300.0)
    parser.add_argument(
        "--profile-nodes",
        metavar="DIR",
        default=None,
        help="run the nodes under pyinstrument; text reports in DIR/<node>.txt",
    )
    args = parser.parse_args()
    if args.agents is None and not args.request_rtt and args.conversations is None:
        args.agents, args.request_rtt, args.conversations = 1_000_000, True, 10_000
    code = code_version()  # the node processes import src/ as it is now
    with private_engine() as url:
        if args.agents is not None:
            result = {"benchmark": "agents", "machine": machine(), "code": code,
                      **run_many(url, args.agents, args.nodes, args)}  # fmt: skip
            mode = "" if args.send_mode == "send" else f"-{args.send_mode}"
            save(f"agents-many-{args.agents}-{args.nodes}node{mode}", result)
            emit(result)
        if args.request_rtt:
            result = {
                "benchmark": "agents",
                "machine": machine(),
                "code": code,
                **run_rtt(url, args.k, args),
            }
            save("agents-request-rtt", result)
            emit(result)
        if args.conversations is not None:
            result = {"benchmark": "agents", "machine": machine(), "code": code,
                      **run_conversations(url, args.conversations, args)}  # fmt: skip
            save(f"agents-conversations-{args.conversations}", result)
            emit(result)


if __name__ == "__main__":
    main()
