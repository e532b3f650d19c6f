"""Finding agent classes in a user's module (``shoal node --app package.module``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from shoal.agent import Agent
from shoal.errors import ConfigurationError


def load_agents(module_name: str) -> list[type[Agent]]:
    """The module's ``agents`` list if it has one, else every Agent subclass it defines."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: the current dir is importable
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"cannot import app module {module_name!r}: {exc}. Pass a dotted module path "
            "importable from the current directory (e.g. --app myproject.agents)"
        ) from None
    except ConfigurationError:
        raise  # e.g. a capability declared with a bad option: its message says which
    except Exception as exc:
        raise ConfigurationError(
            f"importing app module {module_name!r} failed: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)"
        ) from exc
    explicit = getattr(module, "agents", None)
    if explicit is not None:
        agents = list(explicit)
        bad = [a for a in agents if not (isinstance(a, type) and issubclass(a, Agent))]
        if bad:
            raise ConfigurationError(f"{module_name}.agents holds non-Agent entries: {bad!r}")
    else:
        agents = [
            obj
            for obj in vars(module).values()
            if isinstance(obj, type)
            and issubclass(obj, Agent)
            and obj is not Agent
            and obj.__module__ == module.__name__
        ]
    if not agents or not any(a.is_addressable() for a in agents):
        raise ConfigurationError(
            f"module {module_name!r} defines no Agent class with @capability, @handler or "
            "@subscribe methods"
        )
    return agents


def capability_table(agents: list[type[Agent]]) -> dict[str, type[Agent]]:
    """capability name -> the agent class that provides it; a name twice is an error."""
    table: dict[str, type[Agent]] = {}
    for agent in agents:
        for name in agent.capabilities():
            if name in table and table[name] is not agent:
                raise ConfigurationError(
                    f"capability {name!r} is provided by both {table[name].__qualname__} and "
                    f"{agent.__qualname__}; a node hosts each capability once"
                )
            table[name] = agent
    return table
