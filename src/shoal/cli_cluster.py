"""``shoal up``, ``shoal down``, ``shoal logs`` and ``shoal demo``: a whole cluster on
this machine with one command. The work is in shoal.supervisor and shoal.demo; these
functions parse flags, print, and turn signals into a clean stop."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import psutil
import typer
from rich.table import Table

from shoal.agent import Agent
from shoal.cli_options import AsJson, DataDir, LogLevel, Namespace, Redis, err, out, print_line
from shoal.demo import DemoConfig
from shoal.errors import ConfigurationError
from shoal.logtail import LogFollower, last_lines
from shoal.settings import Settings
from shoal.supervisor import (
    GATEWAY,
    LOG_DIR,
    POLL_S,
    STATE_DIR,
    STOP_MARGIN_S,
    SUPERVISOR_LOG,
    ClusterFailed,
    ClusterSpec,
    ClusterState,
    Supervisor,
    check_port_free,
    describe,
    pid_alive,
    read_tail,
)

if TYPE_CHECKING:
    from rich.console import Console

    from shoal.demo_llm import LLMReport

DETACH_TIMEOUT_S = 90.0


def register(app: typer.Typer) -> None:
    app.command()(up)
    app.command()(down)
    app.command()(logs)
    app.command()(demo)


def _data_dir(data_dir: Path | None) -> Path:
    return Settings.from_env(data_dir=data_dir).data_dir


# --- up ----------------------------------------------------------------------------------


def up(
    nodes: Annotated[int, typer.Option(help="Node processes to run.", min=0)] = 2,
    app_module: Annotated[
        str,
        typer.Option(
            "--app",
            "-a",
            envvar="SHOAL_UP_APP",
            help="Module with the Agent classes the nodes host.",
        ),
    ] = "shoal.examples",
    host: Annotated[str, typer.Option(help="Address the gateway binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Gateway port (0: any free one).", min=0)] = 8000,
    no_gateway: Annotated[
        bool, typer.Option("--no-gateway", help="Run nodes only, no gateway.")
    ] = False,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure", help="Let the gateway serve a non-loopback address without API keys."
        ),
    ] = False,
    grace: Annotated[
        float, typer.Option(help="Seconds nodes get to finish their work on stop.", min=0)
    ] = 30.0,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Run in the background (shoal down stops it).")
    ] = False,
    show_logs: Annotated[
        bool,
        typer.Option(
            "--logs/--no-logs", envvar="SHOAL_UP_LOGS", help="Print the children's logs here."
        ),
    ] = True,
    as_json: AsJson = False,
    log_level: LogLevel = None,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Run a cluster here: engine, gateway with dashboard, and --nodes nodes.

    The engine is the embedded one unless --redis; a node or gateway that crashes is
    restarted. Ctrl-C (or shoal down, with --detach) drains and stops it all.
    """
    settings = Settings.from_env(redis, namespace, data_dir)
    spec = ClusterSpec(
        app=app_module, nodes=nodes, host=host, port=port, gateway=not no_gateway,
        insecure=insecure, grace=grace, redis=settings.url, namespace=settings.namespace,
        data_dir=settings.data_dir, log_level=log_level,
    )  # fmt: skip
    _check_app(app_module)
    if detach:
        state = _start_detached(spec)
        _print_up(state, spec, as_json, detached=True)
        return
    _run_foreground(spec, show_logs, as_json)


def _check_app(module: str) -> None:
    """A bad --app fails here, once, rather than in every node in a restart loop."""
    from shoal.app import load_agents

    load_agents(module)


def _run_foreground(spec: ClusterSpec, show_logs: bool, as_json: bool) -> None:
    supervisor = Supervisor(spec, say=lambda line: err.print(f"[bold]up[/bold]  {line}"))
    follower = LogFollower(supervisor.log_files(), from_start=True)  # each run: new files
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while starting: like Ctrl-C
    try:
        with err.status(f"starting the engine, a gateway and {spec.nodes} node(s)…"):
            state = supervisor.start()  # stops what it started if interrupted
    finally:
        signal.signal(signal.SIGTERM, previous)
    _print_up(state, spec, as_json, detached=False)
    stop = _StopOnSignal(supervisor)
    try:
        while not stop.requested.wait(POLL_S):
            supervisor.poll()
            if show_logs:
                _print_lines(follower.read_new())
    finally:
        err.print("[bold]up[/bold]  stopping: nodes drain their work (Ctrl-C again: at once)")
        supervisor.stop(force=stop.count > 1)
        stop.close()
        if show_logs:
            _print_lines(follower.read_new())
        err.print("[bold]up[/bold]  stopped")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class _StopOnSignal:
    """SIGINT/SIGTERM ask for a clean stop; a second one kills the children at once."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.requested = threading.Event()
        self.count = 0
        self._supervisor = supervisor
        self._previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        self.requested.set()
        if self.count > 1:
            for child in self._supervisor.children.values():
                child.signal(signal.SIGKILL)

    def close(self) -> None:
        """Put the previous handlers back (once the stop is over)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _print_lines(lines: list[tuple[str, str]]) -> None:
    width = max((len(name) for name, _ in lines), default=0)
    for name, line in lines:
        out.print(f"[cyan]{name:<{width}}[/cyan] | {line}", markup=True, highlight=False)


def _print_up(state: ClusterState, spec: ClusterSpec, as_json: bool, detached: bool) -> None:
    info = describe(state, spec.data_dir)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(show_header=False, box=None, title="Shoal is up", title_justify="left")
    if info["dashboard"]:
        table.add_row("dashboard", info["dashboard"])
        table.add_row("HTTP API", info["api"])
    table.add_row("engine", info["engine"])
    table.add_row("namespace", info["namespace"])
    table.add_row("nodes", f"{len(info['nodes'])} hosting {state.app}")
    table.add_row("logs", f"{info['logs']}  (shoal logs -f)")
    out.print(table)
    out.print("Submit a first task:")
    for line in _first_task_hints(state, spec):
        out.print(f"  {line}", markup=False, highlight=False)
    out.print("shoal down stops it." if detached else "Ctrl-C stops it.")


def _first_task_hints(state: ClusterState, spec: ClusterSpec) -> list[str]:
    from shoal.app import capability_table, load_agents

    env = "" if spec.namespace == "default" else f"SHOAL_NAMESPACE={spec.namespace} "
    data = "" if spec.data_dir == Path(".shoal") else f" --data-dir {spec.data_dir}"
    if state.app == "shoal.examples":
        hints = [
            f"{env}shoal call process_document doc_id=first "
            f'text="Shoal runs agents. It survives failures."{data}',
            f'{env}shoal call chat --agent chat/ada text="my name is Ada"{data}',
        ]
    else:
        agents = load_agents(state.app)
        entry = _conversation_entry(agents)
        if entry is not None:  # an LLM app: talk to it
            hints = [f'{env}shoal chat {entry}/first "Hello!"{data}']
        else:
            table = capability_table(agents)
            hints = [
                f"{env}shoal call {_call_example(n, table[n])}{data}" for n in sorted(table)[:1]
            ]
    if state.gateway_url:
        capability = "process_document" if state.app == "shoal.examples" else "CAPABILITY"
        hints.append(
            f"curl -s -X POST '{state.gateway_url}/v1/tasks?wait=10' -H 'content-type: "
            f'application/json\' -d \'{{"capability": "{capability}", "args": {{...}}}}\''
        )
    return hints


def _conversation_entry(agents: list[type[Agent]]) -> str | None:
    """The LLM agent type a user talks to: one no other LLM agent calls as a tool
    (the planner of the research example), else the first; None without any."""
    from shoal.llm.agent import LLMAgent

    llm = [a for a in agents if issubclass(a, LLMAgent)]
    asked = {t.agent_type for a in llm for t in a.tools if t.agent_type}
    entry = [a for a in llm if a.agent_type not in asked] or llm
    return entry[0].agent_type if entry else None


def _call_example(name: str, agent: type[Agent]) -> str:
    """``NAME a=... b=...`` from the handler's parameters."""
    method = getattr(agent, agent.capabilities()[name].method_name)
    params = [p for p in inspect.signature(method).parameters.values() if p.name != "self"]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    return " ".join([name, *(f"{p}=..." for p in required)])


def _start_detached(spec: ClusterSpec) -> ClusterState:
    """Run ``shoal up`` again as a background process and wait until it is up."""
    argv = [sys.executable, "-m", "shoal.cli", "up", "--no-logs",
            "--nodes", str(spec.nodes), "--app", spec.app, "--host", spec.host,
            "--port", str(spec.port), "--grace", str(spec.grace),
            "--namespace", spec.namespace, "--data-dir", str(spec.data_dir),
            *(["--no-gateway"] if not spec.gateway else []),
            *(["--insecure"] if spec.insecure else []),
            *(["--log-level", spec.log_level] if spec.log_level else [])]  # fmt: skip
    env = dict(os.environ)
    if spec.redis:
        env["SHOAL_REDIS_URL"] = spec.redis  # not on the command line: ps shows that
    running = ClusterState.read(spec.state_dir)
    if running is not None:
        raise ConfigurationError(
            f"a cluster is already running from {spec.state_dir} (supervisor pid "
            f"{running.pid}); stop it with: shoal down"
        )
    (spec.state_dir / LOG_DIR).mkdir(parents=True, exist_ok=True)
    log_path = spec.state_dir / LOG_DIR / SUPERVISOR_LOG
    if log_path.exists():
        log_path.replace(log_path.with_name(log_path.name + ".1"))
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )  # fmt: skip
    with err.status("starting in the background…"):
        return _wait_detached(proc, spec, log_path)


def _wait_detached(
    proc: subprocess.Popen[bytes], spec: ClusterSpec, log_path: Path
) -> ClusterState:
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    while True:
        state = ClusterState.read(spec.state_dir)
        if state is not None and state.pid == proc.pid and state.ready:
            return state
        code = proc.poll()
        if code is not None:
            tail = "\n".join(read_tail(log_path, 20))
            raise ClusterFailed(f"shoal up exited with code {code}; its log ({log_path}):\n{tail}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise ClusterFailed(f"not up within {DETACH_TIMEOUT_S:.0f}s; see {log_path}")
        time.sleep(POLL_S)  # the background supervisor writes its state when ready


# --- down --------------------------------------------------------------------------------


def down(
    timeout: Annotated[
        float | None,
        typer.Option(help="Seconds to wait for a clean stop before killing (default: grace+10)."),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Stop the cluster `shoal up --detach` started here.

    Nodes drain their work first; the embedded engine stops too if up started it.
    """
    state_dir = _data_dir(data_dir) / STATE_DIR
    state = ClusterState.read(state_dir)
    if state is None:
        out.print(f"no cluster is up from {state_dir.parent}")
        return
    os.kill(state.pid, signal.SIGTERM)
    limit = timeout if timeout is not None else state.grace + STOP_MARGIN_S + 5
    with err.status(f"stopping (supervisor pid {state.pid}; nodes drain their work)…"):
        clean = _wait_gone(state.pid, limit)
    leftovers = [c for c in state.children if pid_alive(c.pid)]
    for child in leftovers if not clean else []:
        os.kill(child.pid, signal.SIGKILL)
    if not clean:
        os.kill(state.pid, signal.SIGKILL)
        names = ", ".join(c.name for c in leftovers) or "none"
        err.print(f"not stopped within {limit:.0f}s: killed the supervisor and {names}")
        raise typer.Exit(1)
    out.print("stopped")


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False
    return True


# --- logs --------------------------------------------------------------------------------


def logs(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Which: gateway, node-1, …, supervisor (default: all)."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines of each to show.", min=0)] = 20,
    data_dir: DataDir = None,
) -> None:
    """Show the logs of the cluster `shoal up` runs (or ran) here."""
    log_dir = _data_dir(data_dir) / STATE_DIR / LOG_DIR
    files = {p.stem: p for p in sorted(log_dir.glob("*.log"), key=_log_order)}
    if not files:
        raise ConfigurationError(f"no logs in {log_dir}: start a cluster with shoal up")
    unknown = sorted(set(names or ()) - files.keys())
    if unknown:
        raise ConfigurationError(
            f"no log named {', '.join(unknown)} in {log_dir}; there are: {', '.join(files)}"
        )
    chosen = {n: files[n] for n in names} if names else files
    _print_lines(last_lines(chosen, lines))
    if not follow:
        return
    follower = LogFollower(chosen)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(POLL_S):
            _print_lines(follower.read_new())
    finally:
        signal.signal(signal.SIGINT, previous)


def _log_order(path: Path) -> tuple[int, str]:
    """supervisor, gateway, then the nodes in number order."""
    name = path.stem
    rank = {"supervisor": 0, GATEWAY: 1}.get(name, 2)
    number = name.rpartition("-")[2]
    return rank, number.zfill(6) if number.isdigit() else name


# --- demo --------------------------------------------------------------------------------


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the cluster running after (Ctrl-C stops it).")
    ] = False,
    nodes: Annotated[int, typer.Option(help="Nodes (one of them is killed).", min=2)] = 3,
    documents: Annotated[
        int, typer.Option(help="Documents through the pipeline.", min=1)
    ] = DemoConfig.documents,
    users: Annotated[
        int, typer.Option(help="Chat users, each an agent.", min=0)
    ] = DemoConfig.users,
    turns: Annotated[int, typer.Option(help="Chat turns per user.", min=0)] = DemoConfig.turns,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds the workload may take before unfinished tasks count as lost.", min=1
        ),
    ] = DemoConfig.timeout,
    port: Annotated[
        int, typer.Option(help="Gateway/dashboard port (taken: any free one).", min=0)
    ] = 8000,
    as_json: AsJson = False,
    app_module: Annotated[
        str,
        typer.Option(
            "--app", envvar="SHOAL_DEMO_APP", hidden=True, help="Module with the workload's agents."
        ),
    ] = "shoal.examples",
    redis: Redis = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            "-n",
            envvar="SHOAL_DEMO_NAMESPACE",  # not SHOAL_NAMESPACE: never a working namespace
            help="Key namespace (default: a fresh demo-… one, so the counts are this run's).",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Run a 3-node cluster, SIGKILL a node midway, and check that nothing was lost.

    Documents through the pipeline and chats with per-user agents; the summary shows
    how work spread, the takeover and the latency. Exit code 0 only if every task
    succeeded with the right answer.
    """
    from shoal.demo import demo_namespace, run_demo
    from shoal.demo_llm import NOT_CONFIGURED, LLMReport, endpoint
    from shoal.demo_view import LiveView, print_llm, print_report, report_data

    config = DemoConfig(documents=documents, users=users, turns=turns, timeout=timeout,
                        app=app_module)  # fmt: skip
    settings = Settings.from_env(redis, namespace or demo_namespace(), data_dir)
    spec = ClusterSpec(
        app=app_module, nodes=nodes, port=port if _port_free(port) else 0, grace=2.0,
        redis=settings.url, namespace=settings.namespace, data_dir=settings.data_dir,
        restart=False, run_name="demo",
    )  # fmt: skip
    _check_app(app_module)
    console = err if as_json else out
    supervisor = Supervisor(spec, say=lambda line: console.print(f"[dim]{line}[/dim]"))
    with err.status(f"starting an engine, a gateway and {nodes} nodes…"):
        state = supervisor.start()  # in the main thread: children die with it (see Child)
    try:
        console.print(
            f"cluster up: {', '.join(n for n in supervisor.children if n != GATEWAY)}, "
            f"dashboard {state.gateway_url}/, engine {state.engine}, namespace {spec.namespace}"
        )
        if endpoint() is None:
            console.print(f"[yellow]{NOT_CONFIGURED}[/yellow]", highlight=False)
        with LiveView(console, config) as view:
            report = asyncio.run(run_demo(supervisor, config, view.outcome, view.killed))
        dashboard = f"{state.gateway_url}/"
        if not as_json:
            print_report(console, report, dashboard, keep)  # the verdict, then the LLM part
        llm = _demo_llm(console, supervisor) if endpoint() else LLMReport(configured=False)
        print_llm(console, llm)
        if as_json:
            print_line({**report_data(report, dashboard), "llm": llm.data()})  # one line
        if keep:
            _keep_running(supervisor, dashboard)
    finally:
        supervisor.stop()
    if not report.passed:
        raise typer.Exit(1)


def _demo_llm(console: Console, supervisor: Supervisor) -> LLMReport:
    """The research assistant against the configured model, its answer streamed here."""
    from shoal.demo_llm import run_llm_part
    from shoal.demo_view import print_llm_start

    print_llm_start(console)

    def show(text: str) -> None:
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)

    return asyncio.run(run_llm_part(supervisor.settings, show))


def _port_free(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port)
    except ConfigurationError:
        return False
    return True


def _keep_running(supervisor: Supervisor, dashboard: str) -> None:
    """Until Ctrl-C/SIGTERM, then stop (a second signal kills the children at once)."""
    err.print(f"the cluster stays up: {dashboard}  (Ctrl-C stops it)")
    stop = _StopOnSignal(supervisor)
    try:
        while not stop.requested.wait(POLL_S):
            supervisor.poll()
        supervisor.stop(force=stop.count > 1)
    finally:
        stop.close()
