"""``shoal services``: register, list, re-status and deregister the instances of the
external services agents call (the service registry, shoal.registry).

Thin, like every command: each calls ``client.registry`` and prints the answer.
Errors reach ``shoal.cli.main``, which prints them as one line with an exit code.

A command exits as soon as it has printed, so nothing is left to heartbeat what it
registered: an instance registered with a TTL would silently vanish TTL seconds
later. So ``register`` makes a *static* instance (it stays until deregistered)
unless ``--ttl`` is given, and then warns that something must heartbeat it.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from shoal.cli_options import AsJson, DataDir, Namespace, Redis, err, out, print_json
from shoal.cli_support import client as _client
from shoal.cli_support import run as _run
from shoal.client import Client
from shoal.errors import ConfigurationError
from shoal.probes import Probe, configure_probe, describe_probe
from shoal.registry import InstanceState, Registry, Status, UnknownService

services_app = typer.Typer(
    help="Register, list, re-status, probe and deregister instances of external services.",
    no_args_is_help=True,
)

ServiceName = Annotated[str, typer.Argument(help="Service name, e.g. llm.")]
InstanceId = Annotated[str, typer.Argument(help="Instance id (see: shoal services list).")]
Meta = Annotated[
    list[str] | None,
    typer.Option("--meta", help="Metadata key=value; repeat the option for more."),
]
Zone = Annotated[str | None, typer.Option(help="Only instances in this zone.")]
StatusFilter = Annotated[
    Status | None, typer.Option("--status", help="Only instances with this effective status.")
]

# How each state is coloured in the table: green serves, yellow is a warning, red is out.
COLOURS = {
    "up": "green", "degraded": "yellow", "starting": "cyan", "draining": "magenta",
    "down": "red", "closed": "green", "half_open": "yellow", "open": "red",
}  # fmt: skip


def parse_metadata(pairs: list[str] | None) -> dict[str, str]:
    """``--meta key=value`` options as a dict (a value may itself contain ``=``)."""
    metadata: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigurationError(
                f"--meta {pair!r} is not key=value (e.g. --meta model=qwen --meta gpu=a100)"
            )
        if key in metadata:
            raise ConfigurationError(f"--meta {key!r} is given twice")
        metadata[key] = value
    return metadata


def lifetime(ttl: float | None, static: bool) -> float | None:
    """The registration's TTL: None (static) unless ``--ttl`` is given."""
    if ttl is not None and static:
        raise ConfigurationError(
            "give --ttl SECONDS (the instance expires unless heartbeated) or --static "
            "(it stays until deregistered), not both"
        )
    return ttl


async def find(registry: Registry, service: str, instance_id: str) -> InstanceState:
    """One instance as it is stored now, with its health."""
    for state in await registry.instances(service):
        if state.id == instance_id:
            return state
    raise UnknownService(f"service {service!r} has no instance {instance_id!r}")


# --- register ----------------------------------------------------------------------


@services_app.command("register")
def register(
    name: ServiceName,
    url: Annotated[
        str, typer.Argument(help="Base URL, http(s)://host:port/path (port, path optional).")
    ],
    instance_id: Annotated[
        str | None, typer.Option("--id", help="Instance id (default: host:port of the URL).")
    ] = None,
    zone: Annotated[str, typer.Option(help="Zone / rack / region label.")] = "",
    weight: Annotated[float, typer.Option(help="Relative capacity, in (0, 1000].")] = 1.0,
    meta: Meta = None,
    status: Annotated[Status, typer.Option(help="Its status to begin with.")] = Status.UP,
    ttl: Annotated[
        float | None,
        typer.Option(help="Expire this many seconds after the last heartbeat (1..86400)."),
    ] = None,
    static: Annotated[
        bool, typer.Option("--static", help="Stay until deregistered (the default without --ttl).")
    ] = False,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Register (or update) an instance of a service; running it again heartbeats it.

    Static by default: this command exits at once, so nothing would heartbeat an
    instance registered with --ttl, and it would disappear when its TTL ran out."""
    metadata, seconds = parse_metadata(meta), lifetime(ttl, static)

    async def go() -> InstanceState:
        async with _client(redis, namespace, data_dir) as client:
            instance = await client.registry.register(
                name, url, id=instance_id, zone=zone, weight=weight, metadata=metadata,
                status=status, ttl=seconds,
            )  # fmt: skip
            return await find(client.registry, name, instance.id)

    state = _run(go())
    if seconds is not None:
        err.print(
            f"warning: {name} instance {state.id} disappears {seconds:g}s from now unless "
            "something heartbeats it (running this command again does); use --static for "
            "one that stays until deregistered",
            markup=False,
        )
    if as_json:
        print_json(state.describe())
        return
    lasts = "static" if seconds is None else f"ttl {seconds:g}s"
    out.print(f"registered {name} instance {state.id}: {state.url}", markup=False)
    out.print(
        f"  zone {state.instance.zone or '-'}, weight {state.instance.weight:g}, "
        f"status {state.instance.status}, {lasts}, metadata {_metadata(state)}",
        markup=False,
    )


# --- list --------------------------------------------------------------------------


@services_app.command("list")
def list_services(
    name: Annotated[
        str | None, typer.Argument(help="Service name (default: every service).")
    ] = None,
    zone: Zone = None,
    status: StatusFilter = None,
    meta: Meta = None,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """List registered instances with their effective status, breaker, probe and expiry."""
    wanted = parse_metadata(meta)

    async def go() -> list[tuple[int, InstanceState]]:
        async with _client(redis, namespace, data_dir) as client:
            found = await _read_all(client, name)
        return [(now, s) for now, s in found if s.matches(zone, status, wanted)]

    rows = _run(go())
    if as_json:
        print_json([state.describe() for _, state in rows])
    elif rows:
        out.print(_table(rows))
    else:
        out.print(_nothing(name, zone, status, wanted), markup=False)


async def _read_all(client: Client, name: str | None) -> list[tuple[int, InstanceState]]:
    """Every instance of ``name`` (an error if it has none), or of every service."""
    registry = client.registry
    names = [name] if name is not None else await registry.services()
    found: list[tuple[int, InstanceState]] = []
    for service in names:
        now, states = await registry.read(service)
        found += [(now, s) for s in states]
    if name is not None and not found:
        known = ", ".join(await registry.services()) or "none"
        raise UnknownService(
            f"no instance of service {name!r} is registered in namespace "
            f"{client.settings.namespace!r} (services: {known})"
        )
    return found


def _nothing(
    name: str | None, zone: str | None, status: Status | None, wanted: dict[str, str]
) -> str:
    filters = [
        *([f"zone {zone}"] if zone is not None else []),
        *([f"status {status}"] if status is not None else []),
        *(f"{k}={v}" for k, v in wanted.items()),
    ]
    if filters:
        return f"no instances match {', '.join(filters)}"
    if name is None:
        return "no services registered (register one: shoal services register NAME URL)"
    return f"no instances of {name}"


def _table(rows: list[tuple[int, InstanceState]]) -> Table:
    columns = ("service", "instance", "url", "zone", "weight", "status", "breaker", "probe")
    table = Table(*columns, "expires in", "metadata")
    for now, state in rows:
        i = state.instance
        table.add_row(
            Text(i.service), Text(i.id), Text(i.url), Text(i.zone or "-"), f"{i.weight:g}",
            _coloured(state.status), _coloured(state.breaker),
            _coloured(state.health.probe or "-"), _expires_in(state, now),
            Text(_metadata(state)),
        )  # fmt: skip
    return table


def _coloured(value: str) -> Text:
    return Text(value, style=COLOURS.get(value, ""))


def _expires_in(state: InstanceState, now_ms: int) -> str:
    if state.expires_at is None:
        return "static"
    return f"{max(0.0, (state.expires_at - now_ms) / 1000):.1f}s"


def _metadata(state: InstanceState) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(state.instance.metadata.items())) or "-"


# --- deregister and status ------------------------------------------------------------


@services_app.command("deregister")
def deregister(
    name: ServiceName,
    instance_id: InstanceId,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Remove an instance: callers stop picking it within a second (exit 1 if unknown)."""

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            if not await client.registry.deregister(name, instance_id):
                raise UnknownService(
                    f"service {name!r} has no instance {instance_id!r} in namespace "
                    f"{client.settings.namespace!r}: nothing to deregister (see: shoal "
                    f"services list {name})"
                )

    _run(go())
    if as_json:
        print_json({"service": name, "id": instance_id, "deregistered": True})
        return
    out.print(f"deregistered {name} instance {instance_id}", markup=False)


@services_app.command("status")
def set_status(
    name: ServiceName,
    instance_id: InstanceId,
    status: Annotated[Status, typer.Argument(help="The instance's new status.")],
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Set an instance's status: e.g. draining before a replica stops, up once it serves.

    starting, draining and down take it out of rotation; degraded keeps it as a
    last resort."""

    async def go() -> InstanceState:
        async with _client(redis, namespace, data_dir) as client:
            await client.registry.set_status(name, instance_id, status)
            return await find(client.registry, name, instance_id)

    state = _run(go())
    if as_json:
        print_json(state.describe())
        return
    rotation = "in rotation" if state.in_rotation else "out of rotation"
    out.print(
        f"{name} instance {instance_id} is now {status} (effective status {state.status}: "
        f"{rotation})",
        markup=False,
    )


@services_app.command("probe")
def probe(
    name: ServiceName,
    path: Annotated[str, typer.Option(help="The path to GET on each instance.")] = "/health",
    interval: Annotated[float, typer.Option(help="Seconds between probes.")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Seconds a probe may take.")] = 0.5,
    fall: Annotated[int, typer.Option(help="Failures in a row that mark it down.")] = 3,
    rise: Annotated[int, typer.Option(help="Successes in a row that bring it back.")] = 2,
    off: Annotated[bool, typer.Option("--off", help="Stop probing the service.")] = False,
    as_json: AsJson = False,
    redis: Redis = None,
    namespace: Namespace = None,
    data_dir: DataDir = None,
) -> None:
    """Probe a service's instances actively: the nodes elect one prober for it, which
    GETs each instance's URL + PATH every INTERVAL; FALL failures in a row take an
    instance out of every caller's rotation, RISE successes bring it back."""
    settings = None if off else Probe(path, interval, timeout, fall, rise)

    async def go() -> None:
        async with _client(redis, namespace, data_dir) as client:
            await configure_probe(client, name, settings)

    _run(go())
    if as_json:
        print_json(
            {"service": name, "probe": None if settings is None else describe_probe(settings)}
        )
    elif settings is None:
        out.print(f"{name}: not probed any more", markup=False)
    else:
        out.print(
            f"{name}: probed by one node's prober — GET <url>{settings.path} every "
            f"{settings.interval:g}s (timeout {settings.timeout:g}s); down after {settings.fall} "
            f"failures in a row, up after {settings.rise} successes",
            markup=False,
        )
