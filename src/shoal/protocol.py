"""Wire formats: ids, msgpack encoding, and the typed views of task records and events.

Payloads are data (msgpack via msgspec), never pickle: a task can be submitted from
any language and a record can be read by any tool.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from shoal.errors import ConfigurationError, SerializationError
from shoal.usage import usage_from_record

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "dead", "expired"})
STATUSES = ("scheduled", "queued", "running", *sorted(TERMINAL_STATUSES))

_TASK_ID_RE = re.compile(r"^[0-9a-f]{28}$")
_AGENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_AGENT_KEY_RE = re.compile(r"^[A-Za-z0-9_.:@+=-]{1,200}$")


def now_ms() -> int:
    return int(time.time() * 1000)


_RANDOM_MAX = 2**64 - 1
_last_id = [0, 0]  # (milliseconds, random part) of this process's last id
_id_lock = threading.Lock()


def new_id() -> str:
    """A time-ordered id: 12 hex digits of milliseconds, then 64 random bits.

    Monotonic within a process (as ULID's monotonic mode): an id made in the same
    millisecond as the previous one, or after the clock stepped back, takes the
    previous id's time and random part + 1, so ids sort in the order they were made
    (task lists show newest first by id) and stay unique across processes.
    """
    ms = now_ms()
    with _id_lock:
        last_ms, last_random = _last_id
        if ms <= last_ms and last_random < _RANDOM_MAX:
            ms, random = last_ms, last_random + 1
        else:
            ms, random = max(ms, last_ms + 1), int.from_bytes(os.urandom(8))
        _last_id[:] = ms, random
    return f"{ms:012x}{random:016x}"


def child_traceparent(parent: str | None) -> str:
    """A W3C ``traceparent`` for a new task: a fresh trace for a root task, the
    parent's trace id with a new span id for a sub-task (so one trace spans both)."""
    span = os.urandom(8).hex()
    if parent:
        parts = parent.split("-")
        if len(parts) == 4 and len(parts[1]) == 32:
            return f"00-{parts[1]}-{span}-{parts[3]}"
    return f"00-{os.urandom(16).hex()}-{span}-01"


def validate_agent_type(agent_type: str) -> str:
    if not isinstance(agent_type, str) or not _AGENT_TYPE_RE.match(agent_type):
        raise ConfigurationError(
            f"agent type {agent_type!r} must be snake_case: a lowercase letter, then up to "
            "63 lowercase letters, digits or '_'"
        )
    return agent_type


class AgentId(msgspec.Struct, frozen=True):
    """An agent's address, ``type/key`` (e.g. ``researcher/alice``)."""

    type: str
    key: str

    def __str__(self) -> str:
        return f"{self.type}/{self.key}"

    @classmethod
    def parse(cls, text: str) -> AgentId:
        """Parse and validate ``type/key``, saying exactly what is wrong otherwise."""
        if not isinstance(text, str) or "/" not in text:
            raise ConfigurationError(
                f"agent id {text!r} is not 'type/key' (for example 'researcher/alice')"
            )
        agent_type, _, key = text.partition("/")
        if not _AGENT_TYPE_RE.match(agent_type):
            raise ConfigurationError(
                f"agent id {text!r}: type {agent_type!r} must be snake_case: a lowercase "
                "letter, then up to 63 lowercase letters, digits or '_'"
            )
        if not _AGENT_KEY_RE.match(key):
            raise ConfigurationError(
                f"agent id {text!r}: key {key!r} must be 1-200 characters of letters, digits "
                "and _ . : @ + = -"
            )
        return cls(agent_type, key)


def validate_task_id(task_id: str) -> str:
    if not isinstance(task_id, str) or not _TASK_ID_RE.match(task_id):
        raise ConfigurationError(f"{task_id!r} is not a Shoal task id (28 hex digits)")
    return task_id


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def decode(data: bytes) -> Any:
    return _decoder.decode(data)


def _describe(value: Any) -> str:
    return type(value).__module__ + "." + type(value).__qualname__


# What encoding raises for a value that is not data; a lone surrogate in a str
# ('\ud800') cannot be UTF-8 and raises UnicodeEncodeError.
_NOT_DATA = (TypeError, OverflowError, UnicodeEncodeError, msgspec.EncodeError)


def encode_arguments(kwargs: Mapping[str, Any]) -> bytes:
    """Encode a handler's keyword arguments, naming the culprit when one is not data."""
    try:
        return _encoder.encode(dict(kwargs))
    except _NOT_DATA:
        for name, value in kwargs.items():
            try:
                _encoder.encode(value)
            except _NOT_DATA as exc:
                raise SerializationError(
                    f"argument {name!r} has type {_describe(value)}, which cannot be sent "
                    f"({exc}); task arguments must be msgpack data: None, bool, int, float, "
                    "str, bytes, list, tuple, dict, and msgspec/dataclass structures"
                ) from None
        raise


def encode_result(value: Any) -> bytes:
    try:
        return _encoder.encode(value)
    except (TypeError, OverflowError, msgspec.EncodeError) as exc:
        raise SerializationError(
            f"the handler returned a {_describe(value)}, which cannot be stored ({exc}); "
            "results must be msgpack data"
        ) from None


class ErrorInfo(msgspec.Struct, frozen=True):
    """A recorded handler failure: enough to understand it without the node's logs."""

    type: str
    message: str
    traceback: str | None = None
    attempt: int = 0
    node: str | None = None
    at: int = 0


class Event(msgspec.Struct, frozen=True):
    """One entry of a task's event stream. ``id`` resumes the stream after this event."""

    id: str
    kind: str
    data: Any
    at: int

    @property
    def terminal(self) -> bool:
        return self.kind == "done"


class TaskInfo(msgspec.Struct, frozen=True):
    """A snapshot of a task record, as ``TaskHandle.status()`` and ``shoal task`` show it."""

    id: str
    capability: str
    status: str
    priority: str
    attempts: int
    max_attempts: int
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    node: str | None = None
    error: ErrorInfo | None = None
    errors: tuple[ErrorInfo, ...] = ()
    has_result: bool = False
    parent: str | None = None
    scheduled_for: int | None = None
    hosted: bool | None = None
    cancel_requested: bool = False
    traceparent: str | None = None
    duplicates: int = 0
    submitted_by: str | None = None
    usage: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _int_or_none(raw: bytes | None) -> int | None:
    return int(raw) if raw else None


def _text_or_none(raw: bytes | None) -> str | None:
    return raw.decode() if raw else None


def _error_or_none(raw: bytes | None) -> ErrorInfo | None:
    return msgspec.msgpack.decode(raw, type=ErrorInfo) if raw else None


def task_info_from_record(task_id: str, record: Mapping[bytes, bytes]) -> TaskInfo:
    """Build the typed view of a ``task:<id>`` hash (see keys.py / scripts)."""
    history = sorted((int(k[4:]), v) for k, v in record.items() if k.startswith(b"err:"))
    return TaskInfo(
        id=task_id,
        capability=record[b"cap"].decode(),
        status=record[b"status"].decode(),
        priority=record[b"prio"].decode(),
        attempts=int(record.get(b"attempts", b"0")),
        max_attempts=int(record.get(b"max_att", b"0") or 0),
        created_at=int(record[b"created"]),
        started_at=_int_or_none(record.get(b"started")),
        finished_at=_int_or_none(record.get(b"finished")),
        node=_text_or_none(record.get(b"node")),
        error=_error_or_none(record.get(b"error")),
        errors=tuple(msgspec.msgpack.decode(v, type=ErrorInfo) for _, v in history),
        has_result=b"result" in record,
        parent=_text_or_none(record.get(b"parent")),
        scheduled_for=_int_or_none(record.get(b"due")),
        cancel_requested=record.get(b"cancel") == b"1",
        traceparent=_text_or_none(record.get(b"trace")),
        duplicates=int(record.get(b"dups", b"0")),
        submitted_by=_text_or_none(record.get(b"by")),
        usage=usage_from_record(record),
    )


def event_from_entry(entry_id: bytes, fields: Mapping[bytes, bytes]) -> Event:
    return Event(
        id=entry_id.decode(),
        kind=fields[b"k"].decode(),
        data=decode(fields[b"d"]) if fields.get(b"d") else None,
        at=int(fields.get(b"t", b"0")),
    )


class AgentTypeInfo(msgspec.Struct, frozen=True):
    """What nodes publish about an agent type they host (``agent_types`` hash)."""

    name: str
    capabilities: list[str] = []
    handles_messages: bool = False
    topics: list[str] = []


class AgentInfo(msgspec.Struct, frozen=True):
    """A directory entry: an agent that is active on a node, or has saved state, or both.

    Times are epoch milliseconds; ``node``/``activated_at``/``last_message_at`` are
    set while it is active (published by its node about once a second);
    ``state_size`` is the size of its saved state in bytes (0: none)."""

    id: str
    type: str
    key: str
    partition: int
    node: str | None = None
    activated_at: int | None = None
    last_message_at: int | None = None
    state_size: int = 0
