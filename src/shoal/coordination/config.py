"""Live configuration: typed settings in the engine, versioned, watched by every node.

``await client.config.set("capability.summarize.concurrency", 4)`` changes a running
cluster without a restart: each node watches the settings and applies a change
within milliseconds (see shoal.node). The store is:

* **Typed and checked on write.** Known settings (``SCHEMA``: per-capability
  limits, retry defaults, breaker thresholds, log levels) have a type and a range;
  a typo'd key or a value of the wrong type is refused with a ConfigurationError
  saying what is allowed. Free-form settings of your own live under ``app.`` and
  may hold any JSON value.
* **Versioned.** Every change gets a version one greater than any before it: an
  INCR in the script that writes (config.lua), so versions are unique and ordered
  whatever the writers' clocks. ``set(..., expect_version=v)`` writes only if the
  key is still at version ``v`` (0: unset), for read-modify-write without a lock.
* **With history.** Each change (who, when, what, which version) is appended to a
  capped stream, ``HISTORY_LENGTH`` entries long; ``history()`` reads it back.
* **Watched.** A change is announced on a shard channel; ``watch()`` keeps a local
  ``ConfigView`` current from those announcements and also re-reads the version
  every ``REFRESH_S``, so an announcement lost while reconnecting costs at most
  that long, never a stale setting forever.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import getpass
import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.channels import follow
from shoal.coordination.ratelimit import MAX_BURST, MAX_RATE, MIN_RATE
from shoal.errors import ConfigurationError, ShoalError
from shoal.keys import validate_capability

if TYPE_CHECKING:
    from shoal.client import Client

log = logging.getLogger("shoal.config")

HISTORY_LENGTH = 1000  # changes kept (all keys together); older ones are trimmed
HISTORY_PAGE = 100  # entries read per round trip by history(key=...)
REFRESH_S = 1.0  # a watcher re-reads the version this often besides the announcements
MAX_VALUE_BYTES = 64 * 1024  # a setting is configuration, not data
MAX_DEPTH = 32  # lists and objects within each other: a setting, not a document
MAX_BY_LENGTH = 200
# no '/': a key is one segment of the HTTP path /v1/config/{key}
_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,254}")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigConflict(ShoalError):
    """A write with ``expect_version`` found the key at another version."""

    def __init__(self, message: str, current: int) -> None:
        super().__init__(message)
        self.current = current


class ConfigNotSet(ShoalError, LookupError):
    """The key has no value (the code's default applies)."""


# --- the schema of known settings -------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A known setting: its key pattern (for people), type and range."""

    pattern: str
    kind: str  # int | float | level | json
    low: float | None = None
    high: float | None = None
    help: str = ""

    def check(self, key: str, value: Any) -> Any:
        """The value in its canonical type, or a ConfigurationError naming the key."""
        if self.kind == "json":
            return _check_json(key, value)
        if self.kind == "level":
            if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
                raise ConfigurationError(
                    f"{key} must be a log level ({', '.join(LOG_LEVELS)}), got {value!r}"
                )
            return value.lower()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigurationError(f"{key} must be {self._range()}, got {value!r}")
        if self.kind == "int" and not isinstance(value, int):
            raise ConfigurationError(f"{key} must be {self._range()}, got {value!r}")
        # the range first: an int too big for a float (400 digits from a JSON body)
        # compares exactly, where math.isfinite would raise OverflowError
        if not self.low <= value <= self.high or not math.isfinite(value):  # type: ignore[operator]
            raise ConfigurationError(f"{key} must be {self._range()}, got {value!r:.80}")
        return value if self.kind == "int" else float(value)

    def _range(self) -> str:
        what = "a whole number" if self.kind == "int" else "a number"
        return f"{what} within {_number(self.low)}..{_number(self.high)}"

    def parse(self, key: str, text: str) -> Any:
        """A value typed as text (the CLI's), in the setting's type."""
        try:
            if self.kind == "int":
                return self.check(key, int(text))
            if self.kind == "float":
                return self.check(key, float(text))
        except ValueError:
            raise ConfigurationError(f"{key} must be {self._range()}, got {text!r}") from None
        if self.kind == "level":
            return self.check(key, text)
        try:
            value = json.loads(text)
        except ValueError:
            value = text  # not JSON: the text itself
        except RecursionError:
            raise ConfigurationError(f"{key}: the value is nested too deeply") from None
        return self.check(key, value)


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else repr(value)


def _check_json(key: str, value: Any) -> Any:
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{key}: the value must be JSON data ({exc!s:.200})") from None
    except RecursionError:
        raise ConfigurationError(f"{key}: the value is nested too deeply") from None
    if len(encoded) > MAX_VALUE_BYTES:
        raise ConfigurationError(
            f"{key}: the value is {len(encoded)} bytes as JSON; at most {MAX_VALUE_BYTES}"
        )
    value = json.loads(encoded)  # tuples become lists, as they come back from the store
    if _depth(value) > MAX_DEPTH:
        raise ConfigurationError(f"{key}: the value is nested more than {MAX_DEPTH} deep")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list | dict):
            deepest = max(deepest, depth)
            stack.extend(
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


_DAY = 86_400.0
CAPABILITY_FIELDS: dict[str, Setting] = {
    "concurrency": Setting(
        "capability.<name>.concurrency", "int", 0, 1_000_000,
        "tasks of the capability one node runs at once (0 pauses it)",
    ),
    "rate": Setting(
        "capability.<name>.rate", "float", MIN_RATE, MAX_RATE,
        "tasks of the capability started per second, cluster-wide",
    ),
    "burst": Setting(
        "capability.<name>.burst", "int", 1, MAX_BURST,
        "starts allowed at once above the rate (default: one second's worth)",
    ),
    "max_attempts": Setting(
        "capability.<name>.max_attempts", "int", 1, 1000,
        "attempts of a task that set none, before it is dead",
    ),
    "backoff": Setting(
        "capability.<name>.backoff", "float", 0.001, _DAY, "first retry delay, seconds",
    ),
    "max_backoff": Setting(
        "capability.<name>.max_backoff", "float", 0.001, _DAY, "longest retry delay, seconds",
    ),
}  # fmt: skip
RETRY_FIELDS = ("max_attempts", "backoff", "max_backoff")
_BREAKER_INTS = ("consecutive_failures", "min_calls", "half_open_trials")
_BREAKER_RANGES = {
    "consecutive_failures": (1, 1_000_000), "failure_rate": (0.0001, 1.0),
    "min_calls": (1, 1_000_000), "window": (0.1, 3600.0), "recovery": (0.01, 3600.0),
    "half_open_trials": (1, 1_000_000), "degraded_rate": (0.0001, 1.0),
}  # fmt: skip
BREAKER_FIELDS: dict[str, Setting] = {
    name: Setting(
        f"breaker.{name}", "int" if name in _BREAKER_INTS else "float", low, high,
        "breaker threshold of service pools that set no policy (shoal.resilience.BreakerPolicy)",
    )
    for name, (low, high) in _BREAKER_RANGES.items()
}  # fmt: skip
LOG_LEVEL = Setting("log.level", "level", help="the root logger's level on every node")
LOGGER_LEVEL = Setting("log.level.<logger>", "level", help="one logger's level on every node")
APP = Setting("app.<anything>", "json", help="your own settings: any JSON value")


def schema() -> list[Setting]:
    """Every known setting (for help texts and the docs)."""
    retry = [
        Setting(f"retry.{name}", CAPABILITY_FIELDS[name].kind, CAPABILITY_FIELDS[name].low,
                CAPABILITY_FIELDS[name].high, "namespace-wide default of " + name)
        for name in RETRY_FIELDS
    ]  # fmt: skip
    return [*CAPABILITY_FIELDS.values(), *retry, *BREAKER_FIELDS.values(), LOG_LEVEL,
            LOGGER_LEVEL, APP]  # fmt: skip


def setting_for(key: Any) -> Setting:
    """The schema entry of ``key``, or a ConfigurationError saying what keys exist."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ConfigurationError(
            f"config key {key!r:.80} is invalid: up to 255 letters, digits, '_', '.', ':' or '-'"
        )
    head, _, rest = key.partition(".")
    found: Setting | None = None
    if head == "capability":
        name, _, field = rest.rpartition(".")
        if field in CAPABILITY_FIELDS and name:
            validate_capability(name)
            found = CAPABILITY_FIELDS[field]
    elif head == "retry" and rest in RETRY_FIELDS:
        found = Setting(key, CAPABILITY_FIELDS[rest].kind, CAPABILITY_FIELDS[rest].low,
                        CAPABILITY_FIELDS[rest].high)  # fmt: skip
    elif head == "breaker":
        found = BREAKER_FIELDS.get(rest)
    elif key == "log.level":
        found = LOG_LEVEL
    elif key.startswith("log.level.") and len(key) > len("log.level."):
        found = LOGGER_LEVEL
    elif head == "app" and rest:
        found = APP
    if found is None:
        raise ConfigurationError(
            f"unknown config key {key!r}: known keys are "
            f"{', '.join(s.pattern for s in schema())} ('shoal config keys' lists them)"
        )
    return found


def validate(key: str, value: Any) -> Any:
    """The value of ``key`` in its canonical type (ConfigurationError if it does not fit)."""
    return setting_for(key).check(key, value)


def parse(key: str, text: str) -> Any:
    """``key``'s value from text, as typed on a command line."""
    return setting_for(key).parse(key, text)


# --- records ------------------------------------------------------------------------------


class ConfigEntry(msgspec.Struct, frozen=True):
    """A setting's current value and the change that set it."""

    key: str
    value: Any
    version: int
    by: str
    at: int  # engine time, ms


class ConfigChange(msgspec.Struct, frozen=True):
    """One entry of the history: a set or a delete."""

    key: str
    version: int
    op: str  # set | delete
    value: Any  # None for a delete
    by: str
    at: int


class ConfigDeleted(msgspec.Struct, frozen=True):
    """The answer to a delete: the key and the version of its deletion."""

    key: str
    version: int


class ConfigSnapshot(msgspec.Struct, frozen=True):
    """Every setting at one version."""

    version: int
    entries: list[ConfigEntry]


def _entry(key: str, record: bytes) -> ConfigEntry:
    version, at, by, value = record.decode().split("\n", 3)
    return ConfigEntry(key, json.loads(value), int(version), by, int(at))


def _change(fields: Mapping[bytes, bytes]) -> ConfigChange:
    text = {k.decode(): v.decode() for k, v in fields.items()}
    value = json.loads(text["value"]) if text["op"] == "set" else None
    return ConfigChange(
        text["key"], int(text["version"]), text["op"], value, text["by"], int(text["at"])
    )


def default_author() -> str:
    """Who a change is by when the caller does not say: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # no user name (a container without passwd entry)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _check_by(by: Any) -> str:
    if not isinstance(by, str) or not 0 < len(by) <= MAX_BY_LENGTH or "\n" in by:
        raise ConfigurationError(
            f"'by' names who made a change: one line of 1..{MAX_BY_LENGTH} characters, "
            f"got {by!r:.80}"
        )
    return by


def _expected(expect_version: int | None) -> str:
    if expect_version is None:
        return ""
    if isinstance(expect_version, bool) or not isinstance(expect_version, int):
        raise ConfigurationError(
            f"expect_version is a version number (0: unset), got {expect_version!r}"
        )
    return str(expect_version)


# --- the store ----------------------------------------------------------------------------


class ConfigStore:
    """The live configuration of a namespace (``client.config``)."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._watcher: Watcher | None = None

    async def _run(self, op: str, *args: str | int) -> Any:
        keys = self._client.keys
        async with self._client.errors():
            return await self._client.scripts.config(
                list(keys.live_config), [keys.prefix, op, *args]
            )

    async def entry(self, key: str) -> ConfigEntry | None:
        """``key``'s current value with its version, author and time (None: unset)."""
        setting_for(key)
        async with self._client.errors():
            record = await self._client.redis.hget(self._client.keys.live_config[0], key)
        return None if record is None else _entry(key, record)

    async def get(self, key: str, default: Any = None) -> Any:
        """``key``'s current value, or ``default`` when it is unset."""
        found = await self.entry(key)
        return default if found is None else found.value

    async def set(
        self, key: str, value: Any, *, by: str | None = None, expect_version: int | None = None
    ) -> ConfigEntry:
        """Set ``key`` (checked against the schema); returns the new entry. With
        ``expect_version``, only if the key is at that version (0: unset), else
        ConfigConflict."""
        value = validate(key, value)
        author = _check_by(default_author() if by is None else by)
        done, version, *at = await self._run(
            "set", key, json.dumps(value), author, HISTORY_LENGTH, _expected(expect_version)
        )
        if not done:
            raise ConfigConflict(
                f"config {key!r} is at version {version}, not {expect_version}: read it again",
                int(version),
            )
        return ConfigEntry(key, value, int(version), author, int(at[0]))

    async def delete(
        self, key: str, *, by: str | None = None, expect_version: int | None = None
    ) -> int | None:
        """Unset ``key`` (back to the code's default); the version of the deletion,
        or None if it was not set. With ``expect_version``, only if the key is at
        that version (an unset key is at 0), else ConfigConflict."""
        setting_for(key)
        author = _check_by(default_author() if by is None else by)
        done, version = await self._run(
            "delete", key, author, HISTORY_LENGTH, _expected(expect_version)
        )
        # an unset key is at version 0: a delete expecting another version conflicts
        if not done and (version or expect_version not in (None, 0)):
            raise ConfigConflict(
                f"config {key!r} is at version {version}, not {expect_version}: read it again",
                int(version),
            )
        return int(version) if done else None

    async def snapshot(self) -> ConfigSnapshot:
        """Every setting, at one version."""
        version, flat = await self._run("read")
        entries = [_entry(k.decode(), v) for k, v in zip(flat[::2], flat[1::2], strict=True)]
        return ConfigSnapshot(int(version), sorted(entries, key=lambda e: e.key))

    async def list(self, prefix: str = "") -> list[ConfigEntry]:
        """The settings whose key starts with ``prefix``, sorted by key."""
        return [e for e in (await self.snapshot()).entries if e.key.startswith(prefix)]

    async def history(
        self, key: str | None = None, *, limit: int = 50
    ) -> builtins.list[ConfigChange]:
        """The latest changes, newest first (of ``key`` only, if given); as far back
        as the history is kept (HISTORY_LENGTH changes of all keys)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= HISTORY_LENGTH:
            raise ConfigurationError(f"limit must be 1..{HISTORY_LENGTH}, got {limit!r}")
        if key is not None:
            setting_for(key)
        stream = self._client.keys.live_config[2]
        changes: builtins.list[ConfigChange] = []
        newest: bytes | str = "+"
        async with self._client.errors():
            # page back through the stream (entries may be up to MAX_VALUE_BYTES):
            # a key's latest changes are usually near the end
            while len(changes) < limit:
                page = limit if key is None else HISTORY_PAGE
                rows = await self._client.redis.xrevrange(stream, max=newest, count=page)
                for _, fields in rows:
                    change = _change(fields)
                    if key is None or change.key == key:
                        changes.append(change)
                if len(rows) < page:
                    break
                newest = b"(" + rows[-1][0]  # exclusive: before the last one read
        return changes[:limit]

    async def version(self) -> int:
        """The version of the last change (0: never changed)."""
        async with self._client.errors():
            raw = await self._client.redis.get(self._client.keys.live_config[1])
        return int(raw or 0)

    async def watch(self) -> ConfigView:
        """A local view of every setting, kept current (one per client, shared)."""
        if self._watcher is None:
            self._watcher = Watcher(self)
        return await self._watcher.view()

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.close()
            self._watcher = None


# --- the watched view -----------------------------------------------------------------------

Listener = Callable[["ConfigView"], None]


class ConfigView:
    """One process's copy of the settings at ``version``. ``values`` is replaced
    (never mutated) on every change; listeners run on the event loop after it."""

    def __init__(self) -> None:
        self.version = 0
        self.values: Mapping[str, Any] = {}
        self.refreshed_at = 0.0
        self.changes = 0  # +1 per update taken (versions can go back: see update)
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def on_change(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def wait_for(self, version: int, timeout: float | None = None) -> bool:
        """Wait until the view is at ``version`` or later; False if not within ``timeout``."""
        if self.version >= version:
            return True
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((version, future))
        try:
            async with asyncio.timeout(timeout):
                await future
        except TimeoutError:
            return False
        finally:
            self._waiters = [(v, f) for v, f in self._waiters if f is not future]
        return True

    def update(self, snapshot: ConfigSnapshot, *, latest: bool = False) -> bool:
        """Take a fresh read; True (and listeners told) if it changed the view.

        Without ``latest``, only a higher version is taken (the read may have been
        overtaken by another). With it, the caller vouches that no later read was
        taken before (the Watcher numbers its reads), so a *lower* version means the
        engine's counter went back — its data was flushed, or it restarted without
        persistence — and the read is taken as it is, rather than leaving the view
        stale until the counter climbs past its old value."""
        self.refreshed_at = time.monotonic()
        if snapshot.version == self.version or (snapshot.version < self.version and not latest):
            return False  # the same, or a read overtaken by another
        if snapshot.version < self.version:
            log.warning(
                "config: the version went back from %d to %d (the engine lost its data?); "
                "taking the settings as they are now", self.version, snapshot.version,
            )  # fmt: skip
        self.version = snapshot.version
        self.changes += 1
        self.values = {e.key: e.value for e in snapshot.entries}
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception:
                log.exception("config: a change listener failed")
        for version, future in self._waiters:
            if version <= self.version and not future.done():
                future.set_result(None)
        return True


def _quiet(task: asyncio.Task[None]) -> None:
    """A background read's error is logged here (the poll reads again later)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("config: reading the settings failed: %s", exc)


class Watcher:
    """Keeps one client's ConfigView current: the change channel, and a look at
    the version every ``refresh`` seconds (a missed announcement is made up for).

    Reads are numbered as they are sent and a reply is taken only if no later
    read's reply was taken before it, so the view may follow the version counter
    back (an engine that lost its data) without an overtaken read undoing a newer
    one. Announcements that arrive while a read is on its way are coalesced into
    one more read, so a burst of changes costs a few reads, not one each."""

    def __init__(self, store: ConfigStore, refresh: float = REFRESH_S) -> None:
        self._store = store
        self._client = store._client
        self.refresh = refresh
        self._view = ConfigView()
        self._ready: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._sent = 0  # reads sent
        self._taken = 0  # the number of the latest read whose reply was taken
        self._reading: asyncio.Task[None] | None = None
        self._again = False  # another read is wanted once the one under way ends

    @property
    def reads(self) -> int:
        """Snapshots read so far (announcements coalesce: see the class)."""
        return self._sent

    async def view(self) -> ConfigView:
        """The view, read once before it is handed out (concurrent callers share it)."""
        ready = self._ready
        if ready is None or (ready.done() and (ready.cancelled() or ready.exception())):
            self._ready = ready = asyncio.create_task(self._first_read())
        await asyncio.shield(ready)
        return self._view

    async def _first_read(self) -> None:
        await self._read()
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="shoal-config-listen"),
                asyncio.create_task(self._poll(), name="shoal-config-poll"),
            ]

    async def _read(self) -> None:
        self._sent += 1
        number = self._sent
        snapshot = await self._store.snapshot()
        if number > self._taken:  # not overtaken by a later read already taken
            self._taken = number
            self._view.update(snapshot, latest=True)

    def _kick(self) -> asyncio.Task[None]:
        """Read, or, if a read is under way, have it followed by one more (the
        changes announced meanwhile may have been written after it was served)."""
        if self._reading is not None and not self._reading.done():
            self._again = True
            return self._reading
        self._reading = asyncio.ensure_future(self._read_until_quiet())
        self._reading.add_done_callback(_quiet)
        return self._reading

    async def _refresh(self) -> None:
        await asyncio.shield(self._kick())

    async def _read_until_quiet(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self._read()

    async def _poll(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.refresh)
            try:
                if await self._store.version() != self._view.version:
                    await self._refresh()
                else:
                    self._view.refreshed_at = time.monotonic()
            except ShoalError as exc:
                log.debug("config: refresh failed: %s", exc)
            except Exception:  # a bug must not stop the refreshing
                log.exception("config: refresh failed")

    async def _listen(self) -> None:
        def announced(data: bytes) -> None:
            # any other version than the view's: a lower one after a reset too
            if int(data.split(b" ", 1)[0]) != self._view.version:
                self._kick()  # not awaited: announcements meanwhile coalesce

        await follow(
            self._client.blocking, self._client.keys.live_config_channel,
            on_subscribed=self._refresh, on_message=announced,
            wait=self.refresh, stopped=lambda: self._closing, what="config",
        )  # fmt: skip

    async def close(self) -> None:
        # The flag as well as cancel(): redis-py's pub/sub read can swallow a
        # cancellation (see node._cancel_listener), so the loops also look at it.
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2 * self.refresh + 1)
        self._tasks = []
        if self._reading is not None:
            self._reading.cancel()
