"""bench.balancing still runs and still prints what docs/benchmarks.md is made from:
one tiny configuration, a few hundred picks. The numbers are not checked (a
smoke run on a busy machine proves nothing about them); the shape is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

QUICKEST = ["--strategies", "least_outstanding", "--breakers", "on", "--no-baseline",
            "--duration", "1.5", "--callers", "4", "--picks", "300"]  # fmt: skip


def test_the_balancing_benchmark_reports_every_phase_and_the_pick_overhead() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO),
                                               os.environ.get("PYTHONPATH")]))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.balancing", *QUICKEST],
        cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "balancing"
    (run,) = result["runs"]
    assert run["strategy"] == "least_outstanding" and run["breakers"] and run["retries"]
    assert run["calls"] > 0 and 0 <= run["error_rate"] <= 1
    assert {"p50_ms", "p99_ms", "max_ms", "calls_per_s", "attempts_per_call"} <= run.keys()
    assert [p["phase"] for p in run["phases"]] == ["healthy", "b degraded", "c dead"]
    for phase in run["phases"]:
        assert set(phase["sent_share"]) == {"a", "b", "c"}
    picks = result["pick_overhead"]
    assert picks["picks"] == 300 and picks["worst_p99_us"] > 0
    assert {r["strategy"] for r in picks["pool_pick"]} >= {"least_outstanding", "round_robin"}
    assert picks["profile"]["self_time_share_by_function"]
    assert "| strategy | breakers |" in done.stderr  # the readable table
