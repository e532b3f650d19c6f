"""Schemathesis against a running gateway: for every operation of its OpenAPI document,
generated requests (valid and invalid) never get a 5xx, and every answer has a
documented status, content type, headers and body shape. A node hosting tests.agents
runs the tasks; some requests name its real capabilities, a real task and a real
agent type, so the fuzz reaches past the 404s into the engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shoal import Settings
from shoal.gateway import create_app
from tests.conftest import REPO, node_env, node_process
from tests.gateways import bearer, gateway_process

pytestmark = pytest.mark.slow

SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = 25  # per operation, valid and invalid together: the whole file in well under 60 s
MAX_WAIT_S = 0.5  # `?wait=` and request timeouts are capped: the fuzz is about shapes
SERVICE = ("llm", "gpu-1")  # a registered instance: service name, instance id
SAFE_CAPABILITIES = ["echo", "add", "report", "permanent", "flaky", "sleepy", "always_fails"]


@dataclass
class Target:
    url: str
    headers: dict[str, str]
    task_id: str


@pytest.fixture(scope="module")
def target(engine_url: str) -> Iterator[Target]:
    """A gateway process and a node process on a fresh namespace, and an all-scopes
    key with room for the fuzz's pace (a key is required: the fuzz creates keys)."""
    namespace = Settings(url=engine_url, namespace=f"t-fuzz-{uuid.uuid4().hex[:8]}")
    created = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "keys", "create", "--name", f"fuzz-{uuid.uuid4().hex}",
         "--scopes", "read,submit,message,admin", "--rate", "100000", "--burst", "100000",
         "--json"],
        cwd=REPO, env=node_env(namespace), capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    headers = bearer(json.loads(created.stdout)["secret"])
    with node_process(namespace, "tests.agents"), gateway_process(namespace) as (url, _):
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            task_id = _run_one_task(http)
            _register_an_instance(http)
        yield Target(url, headers, task_id)


def _run_one_task(http: httpx.Client) -> str:
    """A finished task (the node is up once it ran), for the routes that take an id."""
    deadline = time.monotonic() + 30
    task_id = http.post("/v1/tasks", json={"capability": "echo", "args": {"value": 1}}).json()["id"]
    while time.monotonic() < deadline:  # each call long-polls: no sleep needed
        if http.get(f"/v1/tasks/{task_id}", params={"wait": 5}).json()["task"]["status"] == (
            "succeeded"
        ):
            return task_id
    raise AssertionError("the node did not run a task within 30 s")


def _register_an_instance(http: httpx.Client) -> None:
    """A static instance for the /v1/services routes to find (until the fuzz deletes it)."""
    body = {"url": "http://127.0.0.1:9", "id": SERVICE[1], "ttl": None}
    assert http.post(f"/v1/services/{SERVICE[0]}/instances", json=body).status_code == 201


def _real_values(case: Any, target: Target, capability: str) -> None:
    """Point a case at things that exist: a hosted capability, the finished task, a
    registered service instance."""
    if case.path_parameters:
        real = {"task_id": target.task_id, "capability": capability,
                "name": SERVICE[0], "instance_id": SERVICE[1]}  # fmt: skip
        for name, value in real.items():
            if name in case.path_parameters:
                case.path_parameters[name] = value
        if "agent_type" in case.path_parameters:
            case.path_parameters["agent_type"] = "toolbox"
    if isinstance(case.body, dict) and "capability" in case.body:
        case.body["capability"] = capability


def _bounded(case: Any) -> None:
    """No call may wait long: cap `?wait=` and an agent request's `timeout`."""
    if isinstance(case.query, dict) and isinstance(case.query.get("wait"), int | float):
        case.query["wait"] = min(case.query["wait"], MAX_WAIT_S)
    body = case.body if isinstance(case.body, dict) else {}
    if case.operation.path.endswith("/requests") and isinstance(body.get("timeout"), int | float):
        body["timeout"] = min(body["timeout"], MAX_WAIT_S)


@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_get_documented_answers_and_no_server_error(
    target: Target, label: str
) -> None:
    operation = OPERATIONS[label]
    cases = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    @given(case=cases, real=st.booleans(), capability=st.sampled_from(SAFE_CAPABILITIES))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case: Any, real: bool, capability: str) -> None:
        if real:
            _real_values(case, target, capability)
        _bounded(case)
        response = case.call_and_validate(
            base_url=target.url, headers=target.headers, checks=CHECKS, timeout=20
        )
        assert "Traceback" not in response.text

    fuzz()
