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


class LogLevels:
    """Applies ``log.level`` (the root logger) and ``log.level.<logger>``; a key
    unset again gives the logger back the level it had before."""

    def __init__(self) -> None:
        self._before: dict[str, int] = {}  # logger name ('' = root) -> its own level

    def apply(self, values: Mapping[str, Any]) -> None:
        wanted = {"": values["log.level"]} if "log.level" in values else {}
        wanted.update(
            {k[len("log.level.") :]: v for k, v in values.items() if k.startswith("log.level.")}
        )
        for name, level in wanted.items():
            logger = logging.getLogger(name or None)
            self._before.setdefault(name, logger.level)
            if logger.level != logging.getLevelName(level.upper()):
                logger.setLevel(level.upper())
                log.info("log level of %s set to %s", name or "the root logger", level)
        for name in set(self._before) - wanted.keys():
            logging.getLogger(name or None).setLevel(self._before.pop(name))

    def restore(self) -> None:
        self.apply({})
