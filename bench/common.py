"""Shared pieces of the benchmarks: a private engine, node processes, JSON output."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.engine import EmbeddedEngine

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def private_engine() -> Iterator[str]:
    """A fresh embedded engine in a temporary directory; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        engine = EmbeddedEngine(tmp)
        record = engine.ensure()
        try:
            yield record.url
        finally:
            engine.stop()


@contextlib.contextmanager
def node_processes(
    url: str, namespace: str, count: int, concurrency: int = 256
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` separate ``shoal node`` processes hosting bench.noop_app."""
    env = {**os.environ, "SHOAL_REDIS_URL": url, "SHOAL_NAMESPACE": namespace}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "shoal.cli", "node", "--app", "bench.noop_app",
             "--concurrency", str(concurrency), "--name", f"bench-{namespace}-{i}",
             "--log-level", "warning"],
            cwd=REPO, env=env,
        )
        for i in range(count)
    ]  # fmt: skip
    try:
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def emit(result: dict[str, Any]) -> None:
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    sys.stdout.flush()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]
