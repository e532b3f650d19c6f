"""Typed settings, resolved from arguments, then ``SHOAL_*`` environment, then defaults.

A bad value fails loudly at once, naming the setting and what is allowed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoal.errors import ConfigurationError
from shoal.keys import validate_groups

_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

DEFAULT_NAMESPACE = "default"
DEFAULT_RETENTION_S = 24 * 3600.0
DEFAULT_QUEUE_MAX_LENGTH = 1_000_000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_ENGINE_TIMEOUT_S = 30.0
DEFAULT_PARTITIONS = 256
MAX_PARTITIONS = 16384
DEFAULT_ACK_TIMEOUT_S = 1.0


def validate_namespace(namespace: str) -> str:
    """Namespaces become part of every key, so keep them short and unambiguous."""
    if not _NAMESPACE_RE.match(namespace):
        raise ConfigurationError(
            f"namespace {namespace!r} is invalid: use 1-64 letters, digits, '_', '.' or '-'"
        )
    return namespace


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ConfigurationError(f"{name}={raw!r} must be > 0")
    return value


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be >= {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a client or node needs to find the engine and shape its keys.

    ``url=None`` means the embedded engine under ``data_dir``.
    """

    url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    data_dir: Path = field(default_factory=lambda: Path(".shoal"))
    retention: float = DEFAULT_RETENTION_S
    queue_max_length: int = DEFAULT_QUEUE_MAX_LENGTH
    # How long a client keeps retrying through an engine outage (reconnecting with
    # back-off) before an operation gives up with EngineUnavailable.
    engine_timeout: float = DEFAULT_ENGINE_TIMEOUT_S
    # Agent partitions of the namespace. Fixed when the namespace is first used
    # (agent ids hash onto them); None takes the namespace's count, or 256 for a new one.
    partitions: int | None = None
    # Hash-tag groups the namespace's keys spread over (see shoal.keys). Fixed when
    # the namespace is first used; None takes the namespace's count, or for a new
    # one 1 on a standalone server or Sentinel group and 16 on a Cluster.
    key_groups: int | None = None
    # Replicas that must have a submit or a result before it counts as written
    # (WAIT). 0 = the primary's acknowledgement is enough (asynchronous replication:
    # a primary failover can lose the last writes); see docs/scale-out.md.
    ack_replicas: int = 0
    ack_timeout: float = DEFAULT_ACK_TIMEOUT_S

    def __post_init__(self) -> None:
        validate_namespace(self.namespace)
        if self.key_groups is not None:
            validate_groups(self.key_groups)
        if not isinstance(self.ack_replicas, int) or self.ack_replicas < 0:
            raise ConfigurationError(f"ack_replicas must be >= 0, got {self.ack_replicas!r}")
        if self.ack_timeout <= 0:
            raise ConfigurationError(f"ack_timeout must be > 0 seconds, got {self.ack_timeout}")
        if self.partitions is not None and not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigurationError(
                f"partitions must be within 1..{MAX_PARTITIONS}, got {self.partitions}"
            )
        if self.retention <= 0:
            raise ConfigurationError(f"retention must be > 0 seconds, got {self.retention}")
        if self.engine_timeout <= 0:
            raise ConfigurationError(
                f"engine_timeout must be > 0 seconds, got {self.engine_timeout}"
            )
        if self.queue_max_length <= 0:
            raise ConfigurationError(f"queue_max_length must be > 0, got {self.queue_max_length}")

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        namespace: str | None = None,
        data_dir: str | Path | None = None,
    ) -> Settings:
        """Explicit arguments win over ``SHOAL_*`` variables, which win over defaults."""
        return cls(
            url=url or os.environ.get("SHOAL_REDIS_URL") or None,
            namespace=namespace or os.environ.get("SHOAL_NAMESPACE") or DEFAULT_NAMESPACE,
            data_dir=Path(data_dir or os.environ.get("SHOAL_DATA_DIR") or ".shoal"),
            retention=_env_float("SHOAL_RETENTION", DEFAULT_RETENTION_S),
            queue_max_length=_env_int("SHOAL_QUEUE_MAX_LENGTH", DEFAULT_QUEUE_MAX_LENGTH),
            engine_timeout=_env_float("SHOAL_ENGINE_TIMEOUT", DEFAULT_ENGINE_TIMEOUT_S),
            partitions=_env_int("SHOAL_PARTITIONS", 0) or None,
            key_groups=_env_int("SHOAL_KEY_GROUPS", 0) or None,
            ack_replicas=_env_int("SHOAL_ACK_REPLICAS", 0, minimum=0),
            ack_timeout=_env_float("SHOAL_ACK_TIMEOUT", DEFAULT_ACK_TIMEOUT_S),
        )

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


async def fixed_setting(
    conn: Any, config: str, namespace: str, field: str, option: str,
    wanted: int | None, default: int, what: str,
) -> int:  # fmt: skip
    """A namespace setting fixed by whoever used the namespace first (the layout of
    its keys depends on it): set if absent, then read; asking for another value is a
    clear error rather than a silent mismatch."""
    pipe = conn.pipeline(transaction=False)
    pipe.hsetnx(config, field, wanted or default)
    pipe.hget(config, field)
    _, raw = await pipe.execute()
    value = int(raw)
    if wanted is not None and wanted != value:
        raise ConfigurationError(
            f"namespace {namespace!r} has {value} {what} (fixed when it was first used); "
            f"{option}={wanted} cannot change that. Drop the setting, or use a new namespace"
        )
    return value
