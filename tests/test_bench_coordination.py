"""bench.coordination still runs and still prints what docs/benchmarks.md is made
from: every part, a few hundred operations. The numbers are not checked (a smoke run
on a busy machine proves nothing about them); the shape is, and that the loops did
what they claim (the local loop hit locally, the limiter refused when it should)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_the_coordination_benchmark_reports_every_part() -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO / "src"), str(REPO),
                                               os.environ.get("PYTHONPATH")]))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.coordination", "--quick"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": pythonpath},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["benchmark"] == "coordination"
    lock = result["lock"]
    assert lock["acquire_release"]["n"] == 200 and lock["acquire_release"]["p99_us"] > 0
    assert lock["contended"]["acquisitions_per_s"] > 0
    decisions = [row for row in result["limiter"] if "decisions_per_s" in row]
    shares = {(row["limiter"], row["callers"]): row["allowed_share"] for row in decisions}
    assert shares[("token_bucket, refuses", 4)] == 0.0
    assert shares[("token_bucket, allows", 4)] == shares[("sliding_window, allows", 4)] == 1.0
    cache = result["cache"]
    assert cache["local"]["stats"]["local_misses"] == 0
    assert cache["invalidation"]["n"] == 50
    assert [row["what"] for row in cache["rows"]] == [
        "local hit (LRU)", "remote hit (engine)", "invalidation visible in another process"
    ]  # fmt: skip
    assert "| cache |" in done.stderr  # the docs' tables
