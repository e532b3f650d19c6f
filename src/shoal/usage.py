"""Usage counters in a task's record: what a task spent (model tokens, calls, ...).

A handler adds to them with ``ctx.record_usage(prompt_tokens=..., ...)``; they are
written by the node's recorder with the task's events (the events script adds them
to the record's ``usage.<name>`` fields) and read back as ``TaskInfo.usage``.
Counters only grow, so they add up across calls and attempts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from shoal.errors import ConfigurationError

USAGE_EVENT = "usage"  # the recorder item kind the events script adds to the record
USAGE_PREFIX = b"usage."  # the record's counter fields: usage.<name>
MAX_COUNTERS = 32  # names per call: a record is a small hash, not a metrics store
# Increments stay exact in JSON (the HTTP view; JavaScript numbers are doubles).
MAX_INCREMENT = 2**53 - 1
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def usage_fields(counters: Mapping[str, object]) -> list[str]:
    """The checked counters as the events script takes them: name, value, name, ...
    (values as decimal text, so the engine adds them exactly)."""
    if not counters:
        raise ConfigurationError(
            "record_usage() needs at least one counter, e.g. record_usage(prompt_tokens=10)"
        )
    if len(counters) > MAX_COUNTERS:
        raise ConfigurationError(
            f"record_usage() takes at most {MAX_COUNTERS} counters a call, got {len(counters)}"
        )
    fields: list[str] = []
    for name, value in counters.items():
        _check(name, value)
        fields += [name, str(value)]
    return fields


def _check(name: str, value: object) -> None:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"usage counter name {name!r} is not an identifier (letters, digits and _, "
            "not starting with a digit, at most 64 characters)"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(
            f"usage counter {name} must be an int, got {type(value).__name__} ({value!r})"
        )
    if not 0 <= value <= MAX_INCREMENT:
        raise ConfigurationError(
            f"usage counter {name} must be within 0..{MAX_INCREMENT}, got {value}; counters "
            "only grow"
        )


def usage_from_record(record: Mapping[bytes, bytes]) -> dict[str, int]:
    """The ``usage.<name>`` fields of a task record, by name (empty when none)."""
    return {
        key[len(USAGE_PREFIX) :].decode(): int(value)
        for key, value in sorted(record.items())
        if key.startswith(USAGE_PREFIX)
    }
