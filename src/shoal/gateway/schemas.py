"""The shapes of the HTTP API.

Request bodies are pydantic models: FastAPI validates them (422 naming the field)
and documents them. Responses are Shoal's own msgspec structs (TaskInfo,
ClusterState ...), encoded by msgspec and documented from their msgspec JSON
schema (see ``openapi_components``): one definition per shape, so the document
cannot drift from what the API sends.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from shoal.agent import TASK_OPTIONS
from shoal.apikeys import ApiKey, CreatedKey
from shoal.client import DeadLetter
from shoal.cluster import ClusterState
from shoal.coordination.config import ConfigChange, ConfigDeleted, ConfigEntry, ConfigSnapshot
from shoal.coordination.ratelimit import MAX_BURST, MAX_RATE, MIN_RATE
from shoal.coordination.saga import SagaInfo
from shoal.gateway.problems import ErrorResponse
from shoal.options import MAX_SECONDS
from shoal.protocol import AgentInfo, AgentTypeInfo, ErrorInfo, Event, TaskInfo
from shoal.registry import MAX_METADATA, MAX_TTL_S, MAX_WEIGHT, MIN_TTL_S, Status
from shoal.tasklist import TaskPage

CAPABILITY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"
AGENT_ID_PATTERN = r"^[a-z][a-z0-9_]{0,63}/[A-Za-z0-9_.:@+=-]{1,200}$"
TASK_ID_PATTERN = r"^[0-9a-f]{28}$"
# The registry's own rules (shoal.registry validates again): here, so the OpenAPI
# document states them and a bad value is a 422 naming the field.
SERVICE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$"
INSTANCE_ID_PATTERN = r"^[A-Za-z0-9_\[][A-Za-z0-9_.:@\[\]-]{0,127}$"
ZONE_PATTERN = r"^[A-Za-z0-9_.-]{0,64}$"
DEFAULT_HTTP_TTL_S = 30.0  # a registrant over HTTP heartbeats every ttl/3: every 10 s
MAX_WAIT_S = 300.0
MAX_KEY_RATE = MAX_RATE  # requests/s and burst of one API key: the rate limiter's bounds
MAX_KEY_BURST = MAX_BURST


def _unicode_only(value: Any) -> Any:
    """JSON may escape a lone surrogate (``"\\ud800"``), which is not Unicode text and
    cannot be stored: refuse it here, naming the field, rather than fail later."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"holds {item[exc.start : exc.end]!r}, a lone surrogate, which is not "
                    "Unicode text"
                ) from None
        elif isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
    return value


def _no_options(args: dict[str, Any]) -> dict[str, Any]:
    """Handlers cannot take parameters named like task options (shoal.agent refuses
    them), so such an argument is a mistake: say where the option goes. Names with a
    leading '_' are the client's internal ones, not arguments either."""
    clashing = sorted(name for name in args if name in TASK_OPTIONS or name.startswith("_"))
    if clashing:
        raise ValueError(
            f"{', '.join(clashing)}: not handler arguments — task options go at the top level "
            "of the body, and names starting with '_' are reserved"
        )
    return args


Text = Annotated[str, AfterValidator(_unicode_only)]
JsonValue = Annotated[Any, AfterValidator(_unicode_only)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskSubmission(_Body):
    """A task to queue: for a capability (any node hosting it runs it), or with
    ``agent`` for one agent (its tasks and messages run one at a time, in order)."""

    capability: str = Field(pattern=CAPABILITY_PATTERN, description="Capability to run.")
    args: Annotated[dict[str, Any], AfterValidator(_unicode_only), AfterValidator(_no_options)] = (
        Field(
            default_factory=dict,
            description="The handler's keyword arguments (JSON values); none may be named "
            "like a task option (those go at the top level of the body).",
        )
    )
    agent: str | None = Field(
        default=None, pattern=AGENT_ID_PATTERN, description="Address one agent, 'type/key'."
    )
    priority: Literal["high", "normal", "low"] = "normal"
    delay: float | None = Field(
        default=None, ge=0, le=MAX_SECONDS, description="Start no sooner (seconds)."
    )
    eta: AwareDatetime | None = Field(
        default=None, description="Start no sooner than this time (with its UTC offset)."
    )
    timeout: float | None = Field(
        default=None, gt=0, le=MAX_SECONDS, description="Per-attempt limit (s)."
    )
    deadline: float | None = Field(
        default=None, gt=0, le=MAX_SECONDS,
        description="Give up if not started within this many seconds.",
    )  # fmt: skip
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    idempotency_key: Text | None = Field(
        default=None, min_length=1, max_length=240,
        description="Submitting again with the same key (and the same API key) returns "
        "the first task.",
    )  # fmt: skip


class MessageBody(_Body):
    message: JsonValue = Field(description="Any JSON value; the agent's handler receives it.")


class RequestBody(_Body):
    message: JsonValue = Field(description="Any JSON value; the agent's handler receives it.")
    timeout: float = Field(default=30.0, gt=0, le=MAX_WAIT_S, description="Seconds to wait.")


class PublishBody(_Body):
    message: JsonValue = Field(description="Any JSON value.")
    source: str = Field(
        pattern=r"^[A-Za-z0-9_.:@+=-]{1,200}$",
        description="The agent key that receives it in every subscribed agent type.",
    )


class RedriveBody(_Body):
    task_ids: list[Annotated[str, Field(pattern=TASK_ID_PATTERN)]] | None = Field(
        default=None, max_length=10_000,
        description="Dead tasks to queue again (default: all of the capability).",
    )  # fmt: skip


class KeyRequest(_Body):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$",
        description="What the key is for: letters, digits, '_', '.', '@', '-'.",
    )
    scopes: list[Literal["read", "submit", "message", "admin"]] = Field(min_length=1)
    rate: float | None = Field(
        default=None, ge=MIN_RATE, le=MAX_KEY_RATE, description="Requests per second."
    )
    burst: int | None = Field(
        default=None, ge=1, le=MAX_KEY_BURST, description="Requests allowed at once."
    )


MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=256)]


class InstanceRegistration(_Body):
    """An instance of a service to register (or update, if its id is registered)."""

    url: Text = Field(
        min_length=1, max_length=2048, description="Base URL: http(s)://host[:port][/path]."
    )
    id: str | None = Field(
        default=None, pattern=INSTANCE_ID_PATTERN,
        description="Instance id (default: host:port of the URL).",
    )  # fmt: skip
    zone: str = Field(default="", pattern=ZONE_PATTERN, description="Zone / rack / region.")
    weight: float = Field(default=1.0, gt=0, le=MAX_WEIGHT, description="Relative capacity.")
    metadata: Annotated[dict[MetadataKey, MetadataValue], AfterValidator(_unicode_only)] = Field(
        default_factory=dict, max_length=MAX_METADATA, description="String keys and values."
    )
    status: Status = Field(default=Status.UP, description="Its status to begin with.")
    ttl: float | None = Field(
        default=DEFAULT_HTTP_TTL_S, ge=MIN_TTL_S, le=MAX_TTL_S,
        description="Seconds it lives without a heartbeat (PUT .../heartbeat); null: a "
        "static instance, registered until deleted.",
    )  # fmt: skip


class StatusChange(_Body):
    status: Status = Field(
        description="starting, draining and down take the instance out of rotation; "
        "degraded keeps it as a last resort."
    )


# --- responses (msgspec) ---------------------------------------------------------------


def _untraced(error: ErrorInfo) -> ErrorInfo:
    return msgspec.structs.replace(error, traceback=None) if error.traceback else error


def public_task(info: TaskInfo) -> TaskInfo:
    """A task as the API shows it: its errors without the handler's traceback (the
    node's file paths and source lines are for operators: ``shoal task --traceback``)."""
    if info.error is None and not info.errors:
        return info
    return msgspec.structs.replace(
        info,
        error=None if info.error is None else _untraced(info.error),
        errors=tuple(_untraced(e) for e in info.errors),
    )


def public_page(page: TaskPage) -> TaskPage:
    return msgspec.structs.replace(page, tasks=tuple(public_task(t) for t in page.tasks))


def public_dead_letter(dead: DeadLetter) -> DeadLetter:
    return msgspec.structs.replace(dead, task=public_task(dead.task))


class TaskResult(msgspec.Struct, frozen=True):
    """A task and, once it succeeded, its result (``result`` is null otherwise; a
    failure is in ``task.error``)."""

    task: TaskInfo
    result: Any = None


class Submitted(msgspec.Struct, frozen=True):
    """A queued task. ``existing``: the idempotency key named an earlier task, whose
    id this is. ``outcome``: with ``?wait=``, the task after the wait."""

    id: str
    existing: bool = False
    outcome: TaskResult | None = None


class Cancelled(msgspec.Struct, frozen=True):
    """'cancelled', 'cancelling' (it runs; it will end cancelled) or 'already_<status>'."""

    outcome: str


class Delivered(msgspec.Struct, frozen=True):
    accepted: bool = True


class Reply(msgspec.Struct, frozen=True):
    reply: Any


class Published(msgspec.Struct, frozen=True):
    agent_types: int  # how many subscribed agent types got it (0: nobody subscribes)


class AgentState(msgspec.Struct, frozen=True):
    agent: str
    state: dict[str, Any] | None  # null: no saved state


class Redriven(msgspec.Struct, frozen=True):
    task_ids: list[str]


class Health(msgspec.Struct, frozen=True):
    status: str
    detail: str | None = None


class ServiceInstance(msgspec.Struct, frozen=True):
    """A registered instance with its health (``InstanceState.describe()``).
    ``status`` is the effective one: ``reported_status`` worsened by health (a probe
    that says down, or passive health that says degraded)."""

    service: str
    id: str
    url: str
    zone: str
    weight: float
    metadata: dict[str, str]
    status: str
    reported_status: str
    static: bool
    ttl: float | None  # null: static
    expires_at_ms: float | None  # by the engine's clock; null: static
    breaker: Literal["closed", "open", "half_open"]
    probe: Literal["up", "down"] | None  # null: never probed
    window_calls: int
    window_failures: int
    consecutive_failures: int


class Service(msgspec.Struct, frozen=True):
    name: str
    instances: list[ServiceInstance]


RESPONSE_TYPES: tuple[Any, ...] = (
    TaskInfo, TaskResult, Submitted, TaskPage, Cancelled, Event, Delivered, Reply, Published,
    AgentInfo, AgentTypeInfo, AgentState, ClusterState, DeadLetter, Redriven, ApiKey,
    CreatedKey, Health, Service, ServiceInstance, ErrorResponse,
)  # fmt: skip
RESPONSE_TYPES += (ConfigEntry, ConfigChange, ConfigSnapshot, ConfigDeleted)
RESPONSE_TYPES += (SagaInfo,)  # (its steps and log entries come along)


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the response structs, named as OpenAPI components."""
    _, components = msgspec.json.schema_components(
        RESPONSE_TYPES, ref_template="#/components/schemas/{name}"
    )
    return components


def ref(name: str, *, array: bool = False) -> dict[str, Any]:
    schema: dict[str, Any] = {"$ref": f"#/components/schemas/{name}"}
    return {"type": "array", "items": schema} if array else schema


def ok(
    name: str, description: str, *, status: int = 200, array: bool = False
) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "description": description,
            "content": {"application/json": {"schema": ref(name, array=array)}},
        }
    }
