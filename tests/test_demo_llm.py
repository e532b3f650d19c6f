"""`shoal demo` and models: without an endpoint it says so and runs the non-LLM
workload (no model is ever faked); with one (the real test model server) it also
asks the research assistant and streams the answer; a failing endpoint is reported
without touching the non-LLM verdict."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.demo_llm import NOT_CONFIGURED, QUESTION
from shoal.llm.client import ENV_BASE_URL, ENV_MODEL
from shoal.testing.llm_server import LLMServer
from tests.conftest import REPO
from tests.test_demo import embedded_env
from tests.test_example_research import RULES

pytestmark = pytest.mark.slow
SMALL = ("--documents", "12", "--users", "2", "--turns", "2")


async def demo_with(env: dict[str, str], tmp_path: Path) -> tuple[int, dict[str, object], str]:
    """A small `shoal demo --json` with ``env``: exit code, report, what it showed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", "demo", "--port", "0", "--json", *SMALL,
        "--data-dir", str(tmp_path),
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None, err
    return proc.returncode, json.loads(out), err.decode()


async def test_without_an_endpoint_the_demo_says_so_and_runs_the_rest(tmp_path: Path) -> None:
    code, report, err = await demo_with(embedded_env(), tmp_path)
    assert code == 0, err
    assert NOT_CONFIGURED in " ".join(err.split()), "one clear line, before the workload"
    assert report["passed"] is True and report["llm"] == {
        "configured": False, "ok": False, "error": None, "model": None, "answer_chars": 0,
        "first_token_s": None, "seconds": 0.0, "token_events": 0, "completion_tokens": 0,
        "tool_calls": [],
    }  # fmt: skip


async def test_with_an_endpoint_the_research_assistant_answers_streaming(
    tmp_path: Path,
) -> None:
    with LLMServer(rules=RULES) as model:
        env = {**embedded_env(), ENV_BASE_URL: model.url, ENV_MODEL: "test"}
        code, report, err = await demo_with(env, tmp_path)
        answered = model.stats.answered
    assert code == 0, err
    assert NOT_CONFIGURED not in " ".join(err.split())
    llm = report["llm"]
    assert isinstance(llm, dict) and llm["ok"] is True, err
    assert llm["tool_calls"] == ["researcher", "researcher", "writer"]
    assert llm["first_token_s"] is not None and llm["token_events"] > 10
    assert answered == 1 + 3 + 2 * 2 + 1, "the probe, planner, two researchers, writer"
    # the answer was streamed to the screen as it arrived
    assert f"asking the planner: {QUESTION}" in " ".join(err.split())
    assert "[leases] Leases and node death" in err
    assert "LLM answer arrived" in err


async def test_a_failing_endpoint_is_reported_and_the_verdict_stands(tmp_path: Path) -> None:
    with LLMServer(api_key="right-key") as model:
        env = {**embedded_env(), ENV_BASE_URL: model.url, ENV_MODEL: "test",
               "SHOAL_LLM_API_KEY": "wrong-key"}  # fmt: skip
        code, report, err = await demo_with(env, tmp_path)
    assert code == 0, "the non-LLM workload passed: the model is outside Shoal"
    llm = report["llm"]
    assert report["passed"] is True and isinstance(llm, dict) and llm["ok"] is False
    assert str(llm["error"]).startswith("LLMAuthError"), llm
    assert "LLM part failed: LLMAuthError" in err and "wrong-key" not in err + json.dumps(llm)
    assert "Traceback" not in err
