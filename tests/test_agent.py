"""Declaring agents: options and names are checked where they are declared."""

from __future__ import annotations

import pytest

from shoal import Agent, ConfigurationError, capability
from shoal.app import capability_table, load_agents
from tests.agents import Other, Toolbox


def test_agent_type_defaults_to_the_class_name_in_snake_case() -> None:
    class ResearchAssistant(Agent):
        @capability()
        async def research(self, topic: str) -> str:
            return topic

    assert ResearchAssistant.agent_type == "research_assistant"
    assert list(ResearchAssistant.capabilities()) == ["research"]


def test_an_agent_type_that_cannot_be_an_id_part_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="must be snake_case"):

        class Bad(Agent):
            agent_type = "Not-Snake"


def test_capabilities_are_inherited_and_can_be_overridden() -> None:
    class Base(Agent):
        @capability("greet")
        async def greet(self) -> str:
            return "base"

    class Child(Base):
        @capability("wave")
        async def wave(self) -> str:
            return "wave"

    assert set(Child.capabilities()) == {"greet", "wave"}


@pytest.mark.parametrize(
    "option", ["priority", "timeout", "delay", "max_attempts", "idempotency_key"]
)
def test_handler_parameter_named_like_a_task_option_is_refused(option: str) -> None:
    namespace: dict[str, object] = {}
    source = f"async def handler(self, {option}): ...\n"
    exec(source, namespace)  # build a handler with that parameter name
    with pytest.raises(
        ConfigurationError, match=f"parameter '{option}'.*clashes with the task option"
    ):
        capability("x")(namespace["handler"])  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_attempts": 0}, "max_attempts must be >= 1"),
        ({"timeout": -1}, "timeout must be > 0"),
        ({"backoff": 0}, "backoff must be > 0"),
        ({"non_retryable": (ValueError, "oops")}, "non_retryable must hold exception classes"),
        ({"max_queue_length": 0}, "max_queue_length must be >= 1"),
    ],
)
def test_bad_capability_options_fail_at_declaration(
    options: dict[str, object], message: str
) -> None:
    async def handler(self: Agent) -> None: ...

    with pytest.raises(ConfigurationError, match=message):
        capability("x", **options)(handler)  # type: ignore[arg-type]


def test_bad_capability_name_is_refused() -> None:
    async def handler(self: Agent) -> None: ...

    with pytest.raises(ConfigurationError, match="capability name 'has space' is invalid"):
        capability("has space")(handler)


def test_load_agents_finds_the_classes_a_module_defines() -> None:
    assert set(load_agents("tests.agents")) == {Toolbox, Other}


def test_one_capability_from_two_agent_types_is_refused() -> None:
    class Twin(Agent):
        @capability("echo")
        async def echo(self) -> None: ...

    with pytest.raises(ConfigurationError, match="provided by both"):
        capability_table([Toolbox, Twin])


def test_ctx_outside_a_task_says_so() -> None:
    with pytest.raises(Exception, match="only available while a task runs"):
        _ = Toolbox().ctx
