"""``shoal.toml``: defaults for every ``shoal`` command, kept in a file.

A value comes from, first to last: the command-line flag, its environment variable,
the config file, the built-in default. Click (as vendored by typer) already resolves
exactly that order when it is given a ``default_map`` (flag, then ``envvar`` /
``auto_envvar_prefix``, then ``default_map``, then the default), so this module
only turns the file into that map — and checks it, since a misspelt key silently
ignored is a setting the user believes in and does not have.

The file::

    redis = "redis://:secret@10.0.0.5:6379/0"   # top level: every command that has
    namespace = "prod"                          # the option takes it

    [up]
    nodes = 3
    app = "myapp.agents"

    [node]                                      # `shoal node` and the nodes `shoal up` starts
    concurrency = 32

    [keys.create]                               # a sub-command: a nested table
    scopes = "read,submit"

Keys are the flags' long names without ``--`` (``heartbeat-interval`` or
``heartbeat_interval``). It is ``./shoal.toml``, or the file named by ``--config``
or ``SHOAL_CONFIG``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from shoal.errors import ConfigurationError

CONFIG_ENV = "SHOAL_CONFIG"
DEFAULT_CONFIG = Path("shoal.toml")
ENV_PREFIX = "SHOAL"  # SHOAL_<COMMAND>_<OPTION>, e.g. SHOAL_NODE_CONCURRENCY


def config_path(explicit: Path | None = None) -> Path | None:
    """The file in use: ``--config``, else ``SHOAL_CONFIG``, else ``./shoal.toml`` if
    it exists. A file named explicitly must exist."""
    named = explicit or (Path(os.environ[CONFIG_ENV]) if os.environ.get(CONFIG_ENV) else None)
    if named is not None:
        if not named.is_file():
            raise ConfigurationError(f"config file {str(named)!r} does not exist")
        return named
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def read_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(path)!r}: {exc}") from None


def default_map(command: Any, data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The click ``default_map`` for ``command`` (the ``shoal`` group) from the parsed
    file: top-level values go to every command with that option, tables to the command
    they name. Unknown commands and options are errors naming what is allowed."""
    shared = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    known_shared = _all_option_names(command)
    unknown = sorted(_norm(k) for k in shared if _norm(k) not in known_shared)
    if unknown:
        raise ConfigurationError(
            f"{path}: unknown top-level setting(s) {', '.join(unknown)}; "
            f"options any command takes: {', '.join(sorted(known_shared))}"
        )
    return _map_for(command, shared, tables, path, where="")


def _map_for(
    command: Any,
    shared: dict[str, Any],
    table: dict[str, Any],
    path: Path,
    where: str,
) -> dict[str, Any]:
    options = _option_names(command)
    result = {options[_norm(k)]: v for k, v in shared.items() if _norm(k) in options}
    subcommands: dict[str, Any] = getattr(command, "commands", {})
    for key, value in table.items():
        name = _norm(key).replace("_", "-")
        if isinstance(value, dict) and name in subcommands:
            result[name] = _map_for(subcommands[name], shared, value, path, f"{where}{name}.")
        elif _norm(key) in options:
            result[options[_norm(key)]] = value
        else:
            raise ConfigurationError(_unknown(key, where, options, subcommands, path))
    for name, sub in subcommands.items():
        if name not in result:
            result[name] = _map_for(sub, shared, {}, path, f"{where}{name}.")
    return result


def _unknown(
    key: str, where: str, options: dict[str, str], subcommands: dict[str, Any], path: Path
) -> str:
    section = f"[{where.rstrip('.')}]" if where else "the top level"
    allowed = sorted(options) + [f"[{where}{c}]" for c in sorted(subcommands)]
    return (
        f"{path}: unknown setting {key!r} in {section}; "
        f"allowed there: {', '.join(allowed) or 'nothing'}"
    )


def _norm(key: str) -> str:
    return key.strip().lstrip("-").replace("-", "_")


def _option_names(command: Any) -> dict[str, str]:
    """An option's file key (its long flag, ``_`` for ``-``) -> its parameter name."""
    names: dict[str, str] = {}
    for param in command.params:
        is_option = getattr(param, "param_type_name", "") == "option"
        if not is_option or param.name is None or getattr(param, "hidden", False):
            continue
        if not getattr(param, "expose_value", True):  # actions such as --install-completion
            continue
        longs = [o for o in param.opts if o.startswith("--")]
        for flag in longs or [param.name]:
            names[_norm(flag)] = param.name
    names.pop("help", None)
    return names


def _all_option_names(command: Any) -> set[str]:
    found = set(_option_names(command))
    for sub in getattr(command, "commands", {}).values():
        found |= _all_option_names(sub)
    return found
