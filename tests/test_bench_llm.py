"""bench.llm still runs and still prints what docs/benchmarks.md is made from: a
few conversations directly and through two node processes. The latencies are not
checked (a smoke run on a busy machine proves nothing about them); the shape is,
and so is every answer: streamed and returned whole, in order, through Shoal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

QUICKEST = ["--quick", "--conversations", "20", "--turns", "2", "--token-delay", "0.01"]


def test_the_llm_benchmark_streams_every_answer_right_directly_and_through_shoal() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO),
                                               os.environ.get("PYTHONPATH")]))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.llm", *QUICKEST],
        cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "llm"
    assert result["setup"]["conversations"] == 20 and result["setup"]["nodes"] == 2
    for path in ("direct", "shoal"):
        run = result[path]
        assert run["turns"] == 40 and run["right"] == 40, (path, run)
        assert run["errors"] == {}
        assert run["server_requests"] == 40  # one model call per turn, none retried
        assert run["tokens"] == 40 * len(result["setup"]["answer"].split())
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"] <= run["turn_ms"]["p99"]
        assert run["turns_per_s"] > 0 and run["tokens_per_s"] > 0
        assert set(run["ttft_ms_by_turn"]) == {"0", "1"}
    assert result["shoal"]["warmup_right"] == 20
    assert len(result["shoal"]["partitions_per_node"]) == 2  # measured once balanced
    assert result["shoal"]["node_cpu_s"] > 0
    assert set(result["added_by_shoal"]) == {"ttft_p50_ms", "ttft_p99_ms", "turn_p50_ms",
                                             "turn_p99_ms"}  # fmt: skip
    # the quota phase: no period over the quota, every caller served (after waiting)
    quota = result["quota"]
    assert quota["right"] == quota["turns"] == 40 and quota["errors"] == {}
    assert 0 < quota["max_requests_in_a_period"] <= quota["setup"]["rpm"]
    assert 0 < quota["max_tokens_in_a_period"] <= quota["setup"]["tpm"]
    assert quota["requests"] == 40 and quota["samples"] > 10
    assert "| added by Shoal |" in done.stderr and "| quota per " in done.stderr  # the tables
