"""Task options: validated once at submit, turned into the fields the submit script takes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

from shoal.errors import ConfigurationError
from shoal.keys import validate_priority


def _epoch_ms(value: datetime, name: str) -> int:
    if value.tzinfo is None:
        raise ConfigurationError(
            f"{name}={value!r} has no timezone; pass an aware datetime (e.g. datetime.now(UTC))"
        )
    return int(value.timestamp() * 1000)


MAX_SECONDS = 10 * 365 * 24 * 3600.0  # ten years: beyond, a time is a mistake (or inf)


def _seconds(name: str, value: float | None, *, allow_zero: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{name} must be a number of seconds, got {value!r}")
    if not value <= MAX_SECONDS:  # also refuses NaN, which compares false
        raise ConfigurationError(
            f"{name} must be at most {MAX_SECONDS:.0f} seconds (ten years), got {value!r}"
        )
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigurationError(f"{name} must be > 0 seconds, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TaskOptions:
    """Everything about a task that is not the handler's arguments."""

    priority: str = "normal"
    due_ms: int = 0
    timeout: float | None = None
    deadline_ms: int | None = None
    max_attempts: int | None = None
    idempotency_key: str | None = None

    @classmethod
    def build(
        cls,
        *,
        priority: str = "normal",
        delay: float | None = None,
        eta: datetime | None = None,
        timeout: float | None = None,
        deadline: float | datetime | None = None,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> TaskOptions:
        """Validate user-facing options. ``delay``/``deadline`` in seconds are relative
        to now; ``eta``/``deadline`` as datetimes are absolute."""
        validate_priority(priority)
        if delay is not None and eta is not None:
            raise ConfigurationError("pass either delay= (seconds) or eta= (a datetime), not both")
        now = time.time()
        due_ms = 0
        delay_s = _seconds("delay", delay, allow_zero=True)
        if delay_s:
            due_ms = int((now + delay_s) * 1000)
        if eta is not None:
            due_ms = _epoch_ms(eta, "eta")
        deadline_ms: int | None = None
        if isinstance(deadline, datetime):
            deadline_ms = _epoch_ms(deadline, "deadline")
        elif deadline is not None:
            deadline_ms = int((now + (_seconds("deadline", deadline) or 0)) * 1000)
        if max_attempts is not None and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1
        ):
            raise ConfigurationError(
                f"max_attempts must be a whole number >= 1, got {max_attempts!r}"
            )
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not 0 < len(idempotency_key) <= 256
        ):
            raise ConfigurationError("idempotency_key must be a non-empty string of <= 256 chars")
        return cls(
            priority=priority,
            due_ms=due_ms,
            timeout=_seconds("timeout", timeout),
            deadline_ms=deadline_ms,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
        )

    def script_fields(self) -> list[str | int]:
        """max_attempts, timeout, deadline_ms, due_ms, in submit.lua's order."""
        return [
            "" if self.max_attempts is None else self.max_attempts,
            "" if self.timeout is None else repr(self.timeout),
            "" if self.deadline_ms is None else self.deadline_ms,
            self.due_ms,
        ]
