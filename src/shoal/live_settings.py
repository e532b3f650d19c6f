"""What the live configuration (shoal.coordination.config) means for a node: the
values it applies, resolved from the settings and the code's own declarations
(a service pool follows the ``breaker.*`` settings itself: shoal.services).

Precedence, most specific first: a task's own option, then the live
``capability.<name>.*`` setting (an operator's word beats the code's), then the
``@capability`` argument, then the namespace-wide live default (``retry.*``),
then Shoal's default. Unsetting a live key falls back down that list.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from shoal.admission import Limits
from shoal.agent import CapabilitySpec
from shoal.coordination.config import validate
from shoal.errors import ConfigurationError

log = logging.getLogger("shoal.config")

DEFAULT_MAX_ATTEMPTS = 3  # fetch.lua's default for a task and capability that set none


def capability_limits(spec: CapabilitySpec, values: Mapping[str, Any]) -> Limits:
    prefix = f"capability.{spec.name}."
    return Limits(
        concurrency=values.get(prefix + "concurrency", spec.concurrency),
        rate=values.get(prefix + "rate", spec.rate),
        burst=values.get(prefix + "burst", spec.burst),
    )


def retry_spec(spec: CapabilitySpec, values: Mapping[str, Any]) -> CapabilitySpec:
    """The spec with its retry options as configured now (the one attempts use)."""
    prefix = f"capability.{spec.name}."
    max_attempts = values.get(prefix + "max_attempts", spec.max_attempts)
    if max_attempts is None:
        max_attempts = values.get("retry.max_attempts")
    backoff, max_backoff = (
        values.get(
            prefix + name,
            getattr(spec, name) if name in spec.explicit else values.get(f"retry.{name}"),
        )
        for name in ("backoff", "max_backoff")
    )
    changes = {
        "max_attempts": max_attempts,
        "backoff": spec.backoff if backoff is None else backoff,
        "max_backoff": spec.max_backoff if max_backoff is None else max_backoff,
    }
    if all(getattr(spec, k) == v for k, v in changes.items()):
        return spec
    return dataclasses.replace(spec, **changes)


def checked_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a node can apply: each value checked against the schema again
    (it was checked on write, but a newer Shoal's key, a raw HSET or an older
    schema's range may be in the engine). An invalid one is skipped and logged —
    the code's default applies for it — rather than failing the node or leaving
    a change half applied."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        try:
            checked[key] = validate(key, value)
        except ConfigurationError as exc:
            if _skipped.get(key) != repr(value):  # once per value, not on every change
                _skipped[key] = repr(value)
                log.error("config: ignoring %s: %s", key, exc)
    return checked


_skipped: dict[str, str] = {}  # key -> the invalid value last logged


class _ProcessLevels:
    """The log levels of this process. Loggers are process-wide, so with more than
    one node in a process (tests, an embedding app) each node's settings are one
    owner's wish: a logger keeps the level it had before the first owner set it,
    and gets it back when the last owner that set it lets go."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}  # logger name ('' = root) -> its own level
        self._wants: dict[object, dict[str, str]] = {}  # owner -> logger -> level

    def apply(self, owner: object, wanted: dict[str, str]) -> None:
        self._wants[owner] = wanted
        self._settle(wanted)

    def release(self, owner: object) -> None:
        self._wants.pop(owner, None)
        self._settle({})

    def _settle(self, latest: dict[str, str]) -> None:
        # the latest owner's word first, then the others' for loggers it leaves alone
        effective: dict[str, str] = {}
        for wants in self._wants.values():
            effective.update(wants)
        effective.update(latest)
        for name, level in effective.items():
            logger = logging.getLogger(name or None)
            self._before.setdefault(name, logger.level)
            if logger.level != logging.getLevelName(level.upper()):
                logger.setLevel(level.upper())
                log.info("log level of %s set to %s", name or "the root logger", level)
        for name in set(self._before) - effective.keys():
            logging.getLogger(name or None).setLevel(self._before.pop(name))


_LEVELS = _ProcessLevels()


class LogLevels:
    """Applies ``log.level`` (the root logger) and ``log.level.<logger>``
    (``log.level.root`` is the root logger too, and wins over ``log.level``); a
    key unset again gives the logger back the level it had before. One per node;
    they share the process's loggers (_ProcessLevels)."""

    def apply(self, values: Mapping[str, Any]) -> None:
        wanted = {"": values["log.level"]} if "log.level" in values else {}
        for key, level in values.items():
            if key.startswith("log.level."):
                name = key[len("log.level.") :]
                wanted["" if name == "root" else name] = level
        _LEVELS.apply(self, wanted)

    def restore(self) -> None:
        _LEVELS.release(self)
