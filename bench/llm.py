"""LLM agents (issue 10): the time to first token Shoal adds to a streamed model
answer, and the throughput of many concurrent conversations, against the test
model server (``shoal.testing.llm_server``, a process) with a per-token delay.

    python -m bench.llm [--conversations 1000] [--turns 3] [--token-delay 0.02] \\
        [--save [NAME]]                                   # the full run: ~1-2 min
    python -m bench.llm --quick                           # a smoke run, ~20 s
    python -m bench.llm --table bench/results/llm-<date>.json   # docs' tables

**Direct baseline**: ``--conversations`` concurrent conversations of ``--turns``
turns each call the server directly with ``LLMClient.stream`` from this process
(the conversation's memory re-sent each turn, as an agent does). Time to first
token (TTFT) is from the call to the first content delta; a turn is the whole
answer.

**Through Shoal**: the same conversations, each an addressed ``LLMAgent``
(``bench.llm_app``: ``bench_chat/<id>``) hosted by ``--nodes`` ``shoal node``
processes on a private engine. The client submits each turn and follows its
task's events with ``follow_answer``: TTFT is from submit to the first token
event the client reads; a turn ends when the task has ended and its result is
read. Every answer is checked, streamed and returned ("You said: <message>").
**TTFT added by Shoal** is the Shoal p50/p99 minus the direct p50/p99.

Both phases use an HTTP pool of ``--conversations`` connections (httpx's default
of 100 would queue streams inside the nodes). Before each phase a few warm-up
turns run (not measured); the Shoal phase starts once the nodes have shared the
agent partitions out (nodes started together hand partitions over in the first
seconds, and a turn then waits ~1 s for its partition). With ``--profile``
(default on for full runs), ``py-spy record`` samples node 0 during the Shoal
phase; the JSON has its self time by function (``--profile-out``: the stacks).

**Quota adherence** (``--no-quota`` skips it): on the same nodes, 100
conversations x 3 turns of a second agent type (``bench_quota_chat``) whose model
route is a ``ProviderPool`` with one provider under cluster-wide quotas set well
below what the load would use: 120 requests and 3,000 tokens per 10 s (a
scaled-down "minute", ``quota_period``; --quick: 20 x 2, 12 and 1,000 per 2 s).
The server's counters (``/_stats``) are sampled every 50 ms; the JSON has the most
requests and tokens it saw in any period against the quota (the windows are
measured conservatively: up to one sample longer), the mean per period, and the
turn times, which include the callers' waits for room (up to 300 s: none may
give up).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    REPO,
    code_version,
    emit,
    machine,
    node_processes,
    percentile,
    private_engine,
    process_cpu,
    save,
    server_stats,
)
from bench.llm_app import MAX_TOKENS, MODEL, BenchChat, BenchQuotaChat, http_client
from shoal import Client, Settings
from shoal.llm import LLMAgent, LLMClient, follow_answer
from shoal.llm.client import ENV_BASE_URL

CAPABILITY = BenchChat.chat_capability
QUICK = {"conversations": 50, "turns": 2}
WARMUP_CONVERSATIONS = 20
TURN_TIMEOUT_S = 300.0
SERVER_START_S = 20.0
BALANCE_TIMEOUT_S = 60.0
# The quota phase: a load above a provider's quota (rpm/tpm per ``period`` seconds,
# a scaled-down "minute" so the phase is short), the server's counters sampled.
QUOTA = {"conversations": 100, "turns": 3, "rpm": 120, "tpm": 3000, "period": 10.0}
QUOTA_QUICK = {"conversations": 20, "turns": 2, "rpm": 12, "tpm": 1000, "period": 2.0}
SAMPLE_S = 0.05


def message(conversation: int, turn: int) -> str:
    return f"turn {turn} of conversation {conversation} please"


def expected(said: str) -> str:
    return f"You said: {said}"


# --- the model server ------------------------------------------------------------------


@contextlib.contextmanager
def model_server(token_delay: float, first_token_delay: float) -> Iterator[str]:
    """The test model server as a process; yields its base URL (…/v1)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal.testing.llm_server", "--port", "0",
         "--token-delay", str(token_delay), "--first-token-delay", str(first_token_delay)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "READY <port>", or "" when it died
        if not line.startswith("READY "):
            raise RuntimeError(f"the model server did not start (said {line!r})")
        yield f"http://127.0.0.1:{int(line.split()[1])}/v1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SERVER_START_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_counts(base_url: str) -> dict[str, int]:
    """The server's request and token counters (``GET /_stats``)."""
    stats = httpx.get(base_url.removesuffix("/v1") + "/_stats", timeout=10).json()
    return {k: int(stats[k]) for k in ("requests", "answered", "completion_tokens")}


# --- measuring -------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    index: int  # the turn's place in its conversation (0: the first)
    ttft_s: float | None  # None: no token came
    turn_s: float
    tokens: int
    right: bool
    error: str | None = None


def _error(exc: BaseException) -> str:
    """An error as counted in the JSON: its kind and what it says (a failed task
    without its id, so that one cause counts once)."""
    return f"{type(exc).__name__}: {re.sub(r'task [0-9a-f]{16,} ', 'task ', str(exc))}"[:300]


def summarize(turns: list[Turn], elapsed: float) -> dict[str, Any]:
    """Percentiles of TTFT and turn time (ms), throughput, and the answers' check."""
    ttft = sorted(t.ttft_s * 1000 for t in turns if t.ttft_s is not None)
    whole = sorted(t.turn_s * 1000 for t in turns)
    tokens = sum(t.tokens for t in turns)
    errors = collections.Counter(t.error for t in turns if t.error)

    def pct(values: list[float], q: float) -> float:
        return round(percentile(values, q), 1)

    by_turn = {}
    for index in sorted({t.index for t in turns}):
        of = sorted(t.ttft_s * 1000 for t in turns if t.index == index and t.ttft_s is not None)
        by_turn[str(index)] = {"p50": pct(of, 0.5), "p99": pct(of, 0.99)}
    return {
        "turns": len(turns),
        "right": sum(t.right for t in turns),
        "errors": dict(errors),
        "ttft_ms": {"p50": pct(ttft, 0.5), "p90": pct(ttft, 0.9), "p99": pct(ttft, 0.99),
                    "max": pct(ttft, 1.0)},
        "ttft_ms_by_turn": by_turn,
        "turn_ms": {"p50": pct(whole, 0.5), "p90": pct(whole, 0.9), "p99": pct(whole, 0.99),
                    "max": pct(whole, 1.0)},
        "elapsed_s": round(elapsed, 2),
        "turns_per_s": round(len(turns) / elapsed, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / elapsed, 1),
    }  # fmt: skip


# --- direct baseline -------------------------------------------------------------------


async def _direct_conversation(llm: LLMClient, i: int, turns: int, out: list[Turn]) -> None:
    history: list[dict[str, str]] = []
    system = {"role": "system", "content": BenchChat.system_prompt}
    for turn in range(turns):
        said = message(i, turn)
        user = {"role": "user", "content": said}
        started, first, tokens, text = time.perf_counter(), None, 0, ""
        try:
            async for delta in llm.stream(
                [system, *history, user], key=str(i), temperature=0, max_tokens=MAX_TOKENS
            ):
                if delta.content:
                    first = first or time.perf_counter()
                    tokens += 1
                    text += delta.content
        except Exception as exc:  # counted, shown in the JSON: a benchmark reports
            out.append(Turn(turn, None, time.perf_counter() - started, tokens, False, _error(exc)))
            return
        ended = time.perf_counter()
        ttft = None if first is None else first - started
        out.append(Turn(turn, ttft, ended - started, tokens, text == expected(said)))
        history += [user, {"role": "assistant", "content": text}]


async def run_direct(base_url: str, conversations: int, turns: int) -> dict[str, Any]:
    async with http_client(conversations) as http:
        llm = LLMClient(base_url, model=MODEL, http_client=http)
        warm: list[Turn] = []
        await asyncio.gather(
            *(_direct_conversation(llm, -1 - k, 1, warm) for k in range(WARMUP_CONVERSATIONS))
        )
        before, cpu = server_counts(base_url), time.process_time()
        out: list[Turn] = []
        started = time.perf_counter()
        await asyncio.gather(
            *(_direct_conversation(llm, i, turns, out) for i in range(conversations))
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
    after = server_counts(base_url)
    return {**summarize(out, elapsed), "client_cpu_s": round(cpu, 2),
            "server_requests": after["requests"] - before["requests"]}  # fmt: skip


# --- through Shoal ---------------------------------------------------------------------


async def _shoal_turn(
    client: Client, kind: type[LLMAgent], agent: str, index: int, said: str
) -> Turn:
    started, first, tokens, text = time.perf_counter(), None, 0, ""
    try:
        handle = await client.submit(kind.chat_capability, agent=agent, message=said)
        async for piece in follow_answer(client, handle.id):
            if piece.text:
                first = first or time.perf_counter()
                tokens += 1
            text = text[: len(text) - piece.rewind] + piece.text
        result = await handle.result(timeout=TURN_TIMEOUT_S)
    except Exception as exc:  # counted, shown in the JSON: a benchmark reports
        return Turn(index, None, time.perf_counter() - started, tokens, False, _error(exc))
    ended = time.perf_counter()
    ttft = None if first is None else first - started
    return Turn(index, ttft, ended - started, tokens, result == text == expected(said))


async def _shoal_conversation(
    client: Client, name: str, i: int, turns: int, out: list[Turn], kind: type[LLMAgent] = BenchChat
) -> None:
    for turn in range(turns):
        agent = f"{kind.agent_type}/{name}"
        done = await _shoal_turn(client, kind, agent, turn, message(i, turn))
        out.append(done)
        if done.error:
            return


async def lease_owners(client: Client, agent_type: str) -> dict[str, int]:
    """How many of the agent type's partitions each node holds a lease on."""
    partitions = await client.partitions()
    pipe = client.redis.pipeline(transaction=False)
    for p in range(partitions):
        pipe.get(client.keys.lease(agent_type, p))
    owners = collections.Counter(
        raw.decode().split()[0] if raw else "(free)" for raw in await pipe.execute()
    )
    return dict(sorted(owners.items()))


async def balanced(client: Client, nodes: int, agent_type: str) -> dict[str, int]:
    """Wait until the nodes have shared the partitions out (every one leased, to
    ``nodes`` nodes, the same for a second): node processes start together, the
    first takes every free partition and hands the others' share over when it sees
    them — conversations measured before that would wait out the handover."""
    seen: list[dict[str, int]] = []
    async with asyncio.timeout(BALANCE_TIMEOUT_S):
        while True:
            owners = await lease_owners(client, agent_type)
            seen = [*seen[-4:], owners]
            stable = len(seen) == 5 and all(o == owners for o in seen)
            if stable and len(owners) == nodes and "(free)" not in owners:
                return owners
            await asyncio.sleep(0.2)  # leases move on the keepers' rounds (1 s)


async def _shoal_phase(
    engine_url: str,
    namespace: str,
    base_url: str,
    args: argparse.Namespace,
    procs: list[subprocess.Popen[bytes]],
    profile: NodeProfile,
) -> dict[str, Any]:
    conversations, turns = args.conversations, args.turns
    settings = Settings(url=engine_url, namespace=namespace)
    async with Client(settings=settings) as client:
        await client.wait_for_hosts(CAPABILITY, count=args.nodes, timeout=60)
        owners = await balanced(client, args.nodes, BenchChat.agent_type)
        warm: list[Turn] = []
        await asyncio.gather(
            *(_shoal_conversation(client, f"warm{k}", k, 1, warm)
              for k in range(WARMUP_CONVERSATIONS))
        )  # fmt: skip
        before, cpu = server_counts(base_url), time.process_time()
        node_cpu, engine_cpu = process_cpu(procs), server_stats(engine_url).cpu_s
        out: list[Turn] = []
        profile.start()
        started = time.perf_counter()
        await asyncio.gather(
            *(_shoal_conversation(client, f"c{i}", i, turns, out) for i in range(conversations))
        )
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu
        node_cpu = process_cpu(procs) - node_cpu
        engine_cpu = server_stats(engine_url).cpu_s - engine_cpu
        await asyncio.to_thread(profile.stop)
        after = server_counts(base_url)
        quota = await _quota_phase(client, base_url, args) if args.quota else None
    return {**summarize(out, elapsed), "client_cpu_s": round(cpu, 2), "quota": quota,
            "node_cpu_s": round(node_cpu, 2), "engine_cpu_s": round(engine_cpu, 2),
            "server_requests": after["requests"] - before["requests"],
            "warmup_right": sum(t.right for t in warm),
            "partitions_per_node": sorted(owners.values())}  # fmt: skip


# --- quota adherence -----------------------------------------------------------------------


async def _sample(base_url: str, out: list[tuple[float, int, int]], stop: asyncio.Event) -> None:
    """(time, requests, prompt + completion tokens) of the server every SAMPLE_S."""
    url = base_url.removesuffix("/v1") + "/_stats"
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            stats = (await http.get(url)).json()
            used = int(stats["prompt_tokens"]) + int(stats["completion_tokens"])
            out.append((time.perf_counter(), int(stats["requests"]), used))
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)


def window_max(samples: list[tuple[float, int, int]], field: int, window: float) -> int:
    """The most of counter ``field`` (1: requests, 2: tokens) counted within any
    ``window`` seconds. Conservative: each window is measured from the last sample
    at least ``window`` before its end, so it may be up to SAMPLE_S longer."""
    best, j = 0, 0
    for t, *_ in samples:
        while j + 1 < len(samples) and samples[j + 1][0] <= t - window:
            j += 1
        end = next(s for s in reversed(samples) if s[0] <= t)
        best = max(best, end[field] - samples[j][field])
    return best


async def _quota_phase(client: Client, base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Conversations of the quota-bound agent type; the server's request and token
    rate over any quota period (and any second) against the quota."""
    q = args.quota_setup
    await balanced(client, args.nodes, BenchQuotaChat.agent_type)
    samples: list[tuple[float, int, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(base_url, samples, stop))
    out: list[Turn] = []
    started = time.perf_counter()
    await asyncio.gather(
        *(_shoal_conversation(client, f"q{i}", i, q["turns"], out, BenchQuotaChat)
          for i in range(q["conversations"]))
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    stop.set()
    await sampler
    turns = summarize(out, elapsed)
    requests, tokens = (samples[-1][k] - samples[0][k] for k in (1, 2))
    most_requests = window_max(samples, 1, q["period"])
    most_tokens = window_max(samples, 2, q["period"])
    return {
        "setup": q,
        "turns": turns["turns"], "right": turns["right"], "errors": turns["errors"],
        "turn_ms": turns["turn_ms"], "elapsed_s": turns["elapsed_s"],
        "requests": requests, "tokens": tokens,
        "max_requests_in_a_period": most_requests,
        "max_tokens_in_a_period": most_tokens,
        "requests_vs_rpm_pct": round(100 * most_requests / q["rpm"], 1),
        "tokens_vs_tpm_pct": round(100 * most_tokens / q["tpm"], 1),
        "max_requests_in_1s": window_max(samples, 1, 1.0),
        "mean_requests_per_period": round(requests / elapsed * q["period"], 1),
        "mean_tokens_per_period": round(tokens / elapsed * q["period"], 1),
        "samples": len(samples),
    }  # fmt: skip


def run_shoal(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The Shoal phase on a private engine and ``args.nodes`` node processes (node 0
    sampled by py-spy with ``args.profile``)."""
    namespace = f"bench-llm-{time.monotonic_ns()}"
    q = args.quota_setup
    env = {ENV_BASE_URL: base_url, "BENCH_LLM_CONNECTIONS": str(args.conversations),
           "BENCH_LLM_RPM": str(q["rpm"]), "BENCH_LLM_TPM": str(q["tpm"]),
           "BENCH_LLM_QUOTA_PERIOD": str(q["period"])}  # fmt: skip
    concurrency = args.concurrency or args.conversations + WARMUP_CONVERSATIONS
    with (
        private_engine() as url,
        node_processes(url, namespace, args.nodes, concurrency, env, app="bench.llm_app") as procs,
        tempfile.TemporaryDirectory(prefix="shoal-bench-llm-") as tmp,
    ):
        out = args.profile_out or Path(tmp) / "node0.txt"
        profile = NodeProfile(procs[0].pid, out, args.profile)
        try:
            result = asyncio.run(_shoal_phase(url, namespace, base_url, args, procs, profile))
        finally:
            profile.stop()
        result["node_concurrency"] = concurrency
    result["profile_node0"] = profile.summary
    return result


# --- profile -------------------------------------------------------------------------------


class NodeProfile:
    """``py-spy record`` of a node process from ``start()`` to ``stop()`` (raw,
    collapsed stacks; py-spy samples from outside, ``--nonblocking``: the node is
    never paused); ``stop()`` gives self time by function."""

    def __init__(self, pid: int, out: Path, enabled: bool) -> None:
        self.pid, self.out, self.enabled = pid, out, enabled
        self.spy: subprocess.Popen[bytes] | None = None
        self.summary: dict[str, Any] | None = None

    def start(self) -> None:
        if not self.enabled:
            return
        found = shutil.which("py-spy", path=os.pathsep.join(
            [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))  # fmt: skip
        if found is None:
            self.summary = {"error": "py-spy is not installed"}
            return
        self.spy = subprocess.Popen(
            [found, "record", "--pid", str(self.pid), "--format", "raw", "--output",
             str(self.out), "--rate", "200", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.spy is None:
            return
        self.spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self.spy.wait(60)
        except subprocess.TimeoutExpired:
            self.spy.kill()
            self.spy.wait()
        self.spy = None
        self.summary = _collapsed_summary(self.out)


def _collapsed_summary(path: Path, top: int = 15) -> dict[str, Any]:
    """Self time (leaf frames) and inclusive time of Shoal's and the libraries'
    functions, as shares of the node's samples."""
    if not path.exists():
        return {"error": "py-spy wrote nothing (ptrace not permitted?)"}
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for name in set(frames):
            inclusive[name] += n
    if not total:
        return {"error": "no samples"}
    return {
        "samples": total,
        "self_share": {k: round(v / total, 3) for k, v in own.most_common(top)},
        "inclusive_share": {k: round(v / total, 3) for k, v in inclusive.most_common(top * 3)
                            if "shoal/" in k or "bench/" in k},
    }  # fmt: skip


def _frame(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (file path after site-packages/src)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for cut in ("site-packages/", "/src/", "/lib/python3"):
        if cut in where:
            where = where.split(cut, 1)[1]
            break
    return f"{name} ({where})"


# --- output ------------------------------------------------------------------------------


def added(direct: dict[str, Any], shoal: dict[str, Any]) -> dict[str, float]:
    """Shoal's TTFT and turn time minus the direct ones, per percentile (ms)."""
    out = {}
    for metric in ("ttft_ms", "turn_ms"):
        for q in ("p50", "p99"):
            out[f"{metric.removesuffix('_ms')}_{q}_ms"] = round(
                shoal[metric][q] - direct[metric][q], 1
            )
    return out


def quota_table(quota: dict[str, Any]) -> str:
    """The quota phase: the most the server saw in any quota period vs the quota."""
    q = quota["setup"]
    period = f"{q['period']:g} s"
    most_requests = f"{quota['max_requests_in_a_period']} ({quota['requests_vs_rpm_pct']:.0f} %)"
    most_tokens = f"{quota['max_tokens_in_a_period']} ({quota['tokens_vs_tpm_pct']:.0f} %)"
    turn = quota["turn_ms"]
    return "\n".join([
        f"| quota phase ({q['conversations']} x {q['turns']} turns) | requests | tokens |",
        "|---|---|---|",
        f"| quota per {period} | {q['rpm']} | {q['tpm']} |",
        f"| most in any {period} (server's counters) | {most_requests} | {most_tokens} |",
        f"| mean per {period} | {quota['mean_requests_per_period']} "
        f"| {quota['mean_tokens_per_period']} |",
        f"| turns right / errors | {quota['right']}/{quota['turns']} | {len(quota['errors'])} |",
        f"| turn p50 / p99 / max ms (quota waits included) "
        f"| {turn['p50']:.0f} / {turn['p99']:.0f} / {turn['max']:.0f} | |",
    ])  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The tables of docs/benchmarks.md (``--table FILE``; also on stderr after a run)."""
    rows = [
        "| path | turns right | TTFT p50 ms | TTFT p90 | TTFT p99 | turn p50 ms | turn p99 "
        "| turns/s | tokens/s | client CPU s | nodes CPU s | engine CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("direct", "shoal"):
        r = result[name]
        rows.append(
            f"| {name} | {r['right']}/{r['turns']} | {r['ttft_ms']['p50']:.0f} "
            f"| {r['ttft_ms']['p90']:.0f} | {r['ttft_ms']['p99']:.0f} | {r['turn_ms']['p50']:.0f} "
            f"| {r['turn_ms']['p99']:.0f} | {r['turns_per_s']:.0f} | {r['tokens_per_s']:,.0f} "
            f"| {r['client_cpu_s']} | {r.get('node_cpu_s', '-')} | {r.get('engine_cpu_s', '-')} |"
        )
    a = result["added_by_shoal"]
    rows += [
        "",
        "| added by Shoal | p50 ms | p99 ms |",
        "|---|---|---|",
        f"| time to first token | {a['ttft_p50_ms']:.0f} | {a['ttft_p99_ms']:.0f} |",
        f"| whole turn | {a['turn_p50_ms']:.0f} | {a['turn_p99_ms']:.0f} |",
    ]
    if result.get("quota"):
        rows += ["", quota_table(result["quota"])]
    profile = result["shoal"].get("profile_node0") or {}
    if "self_share" in profile:
        rows += ["", "| node 0, self time by function (py-spy) | share |", "|---|---|"]
        rows += [f"| `{name}` | {share:.1%} |" for name, share in profile["self_share"].items()]
    return "\n".join(rows) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, help="concurrent conversations (1000)")
    parser.add_argument("--turns", type=int, help="turns per conversation (3)")
    parser.add_argument("--nodes", type=int, default=2, help="shoal node processes")
    parser.add_argument("--concurrency", type=int, help="each node's --concurrency "
                        "(default: conversations + warm-up ones)")  # fmt: skip
    parser.add_argument("--token-delay", type=float, default=0.02, help="seconds per token")
    parser.add_argument("--first-token-delay", type=float, default=0.0,
                        help="extra seconds before the first token")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 50 conversations x 2 turns, no profile")  # fmt: skip
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="py-spy node 0 during the Shoal phase (default: on, "
                        "off with --quick)")  # fmt: skip
    parser.add_argument("--quota", action=argparse.BooleanOptionalAction, default=True,
                        help="run the quota phase (default: on)")  # fmt: skip
    parser.add_argument("--profile-out", type=Path, metavar="FILE",
                        help="keep node 0's py-spy stacks (collapsed) in FILE")  # fmt: skip
    parser.add_argument("--save", nargs="?", const=f"llm-{time.strftime('%Y-%m-%d')}",
                        metavar="NAME", help="also write bench/results/NAME.json "
                        "(default NAME: llm-<date>)")  # fmt: skip
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="print the Markdown tables of a saved run and exit")  # fmt: skip
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    args.conversations = args.conversations or quick.get("conversations", 1000)
    args.turns = args.turns or quick.get("turns", 3)
    args.profile = (not args.quick) if args.profile is None else args.profile
    args.quota_setup = QUOTA_QUICK if args.quick else QUOTA
    if args.conversations < 1 or args.turns < 1 or args.nodes < 1 or args.token_delay < 0:
        parser.error("--conversations, --turns and --nodes must be >= 1, --token-delay >= 0")
    return args


def main() -> None:
    args = parse_args()
    if args.table:
        sys.stdout.write(markdown(json.loads(args.table.read_text())))
        return
    load_avg = os.getloadavg()[0]  # anything else on the machine shows here
    with model_server(args.token_delay, args.first_token_delay) as base_url:
        print(f"direct: {args.conversations} x {args.turns}", file=sys.stderr, flush=True)
        direct = asyncio.run(run_direct(base_url, args.conversations, args.turns))
        print(f"shoal: {args.nodes} nodes", file=sys.stderr, flush=True)
        shoal = run_shoal(base_url, args)
    result: dict[str, Any] = {
        "benchmark": "llm",
        "machine": machine(),
        "code": code_version(),
        "load_avg_1m_before": load_avg,
        "setup": {"conversations": args.conversations, "turns": args.turns, "nodes": args.nodes,
                  "token_delay_s": args.token_delay, "first_token_delay_s": args.first_token_delay,
                  "answer": expected(message(0, 0)), "warmup_conversations": WARMUP_CONVERSATIONS},
        "direct": direct,
        "shoal": shoal,
        "added_by_shoal": added(direct, shoal),
        "quota": shoal.pop("quota"),
    }  # fmt: skip
    sys.stderr.write("\n" + markdown(result))
    if args.save:
        save(args.save, result)
    emit(result)


if __name__ == "__main__":
    main()
