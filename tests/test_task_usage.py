"""Who a task is charged to and what it spent: the gateway records the caller's API
key id in the task record (sub-tasks and addressed-agent tasks inherit it), and a
handler adds usage counters to its record with ``ctx.record_usage`` — shown by
``status()``, the HTTP task view and ``shoal task``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from shoal import Agent, Client, ConfigurationError, Settings, capability
from shoal.apikeys import KeyStore
from shoal.usage import MAX_COUNTERS, MAX_INCREMENT, usage_fields
from tests.conftest import running_node
from tests.gateways import bearer, serving
from tests.test_cli import shoal


class Metered(Agent):
    """Capability handlers that report who they run for and what they spend."""

    @capability("whoami")
    async def whoami(self) -> str | None:
        return self.ctx.submitted_by

    @capability("delegate")
    async def delegate(self) -> dict[str, Any]:
        child = await self.ctx.submit("whoami")
        return {
            "mine": self.ctx.submitted_by,
            "child": await child.result(timeout=10),
            "child_id": child.id,
        }

    @capability("spend", max_attempts=2, backoff=0.01)
    async def spend(self, fail_first: bool = False) -> int:
        await self.ctx.record_usage(prompt_tokens=10, completion_tokens=3)
        self.ctx.record_usage(prompt_tokens=5, tool_calls=1)  # not awaited: still written
        if fail_first and self.ctx.attempt == 1:
            raise RuntimeError("the model's answer was cut off")
        return self.ctx.attempt

    @capability("spend_sync")
    def spend_sync(self, tokens: int) -> str:
        self.ctx.record_usage(completion_tokens=tokens)  # from the handler's thread
        return "ok"

    @capability("bad_usage")
    async def bad_usage(self, counters: dict[str, Any]) -> str:
        try:
            self.ctx.record_usage(**counters)
        except ConfigurationError as exc:
            return str(exc)
        return "accepted"


class Chat(Agent):
    """An addressed agent whose turn calls a tool (a capability) and spends tokens."""

    @capability("chat_turn")
    async def chat_turn(self) -> dict[str, Any]:
        await self.ctx.record_usage(prompt_tokens=7, completion_tokens=2)
        return {"by": self.ctx.submitted_by, "tool_by": await self.ctx.call("whoami")}


@dataclass
class Gateway:
    url: str
    key_id: str
    secret: str


@pytest.fixture
async def gateway(settings: Settings, client: Client) -> AsyncIterator[Gateway]:
    """A node hosting Metered and Chat, and a gateway whose namespace has a key."""
    async with running_node([Metered, Chat], settings), serving(settings) as url:
        created = await KeyStore(client).create("billing-test", ["submit", "read"])
        yield Gateway(url, created.key.id, created.secret)


async def submit_over_http(gw: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=gw.url, headers=bearer(gw.secret)) as http:
        answer = await http.post("/v1/tasks", params={"wait": 10}, json=body)
    assert answer.status_code == 201, answer.text
    assert gw.secret not in answer.text
    outcome: dict[str, Any] = answer.json()["outcome"]
    return outcome


async def test_a_task_submitted_through_the_gateway_is_charged_to_the_callers_key(
    gateway: Gateway, client: Client
) -> None:
    outcome = await submit_over_http(gateway, {"capability": "delegate"})
    assert outcome["task"]["submitted_by"] == gateway.key_id
    result = outcome["result"]
    assert result["mine"] == gateway.key_id  # ctx.submitted_by in the handler
    assert result["child"] == gateway.key_id  # and in its sub-task's handler
    child = await client.status(result["child_id"])
    assert child.submitted_by == gateway.key_id
    assert child.parent == outcome["task"]["id"]


async def test_an_addressed_agent_turn_and_its_tool_calls_are_charged_to_the_key(
    gateway: Gateway, client: Client
) -> None:
    outcome = await submit_over_http(gateway, {"capability": "chat_turn", "agent": "chat/ann"})
    assert outcome["result"] == {"by": gateway.key_id, "tool_by": gateway.key_id}
    assert outcome["task"]["submitted_by"] == gateway.key_id
    assert outcome["task"]["usage"] == {"completion_tokens": 2, "prompt_tokens": 7}


async def test_a_task_from_a_client_or_an_open_gateway_is_charged_to_no_key(
    settings: Settings, client: Client
) -> None:
    async with running_node([Metered], settings), serving(settings) as url:
        handle = await client.submit("delegate")
        assert (await handle.result(timeout=10))["mine"] is None
        assert (await handle.status()).submitted_by is None
        # a record without the field (as every record written before it) reads as None
        assert await client.redis.hget(client.keys.task(handle.id), "by") is None
        async with httpx.AsyncClient(base_url=url) as http:  # no key in the namespace
            answer = await http.post(
                "/v1/tasks", params={"wait": 10}, json={"capability": "whoami"}
            )
        task = answer.json()["outcome"]["task"]
        assert task["submitted_by"] is None
        assert answer.json()["outcome"]["result"] is None


async def test_usage_adds_up_across_calls_and_across_a_retried_attempt(
    settings: Settings, client: Client
) -> None:
    async with running_node([Metered], settings):
        handle = await client.submit("spend", fail_first=True)
        assert await handle.result(timeout=10) == 2
        info = await handle.status()
    assert info.attempts == 2
    # two calls on each of two attempts: the failed attempt's tokens were spent too
    assert info.usage == {"completion_tokens": 6, "prompt_tokens": 30, "tool_calls": 2}


async def test_a_task_that_records_no_usage_shows_none(settings: Settings, client: Client) -> None:
    async with running_node([Metered], settings):
        handle = await client.submit("whoami")
        await handle.result(timeout=10)
    assert (await handle.status()).usage == {}


async def test_a_sync_handler_records_usage_from_its_thread(
    settings: Settings, client: Client
) -> None:
    async with running_node([Metered], settings):
        handle = await client.submit("spend_sync", tokens=41)
        assert await handle.result(timeout=10) == "ok"
    assert (await handle.status()).usage == {"completion_tokens": 41}


async def test_who_and_what_are_shown_by_the_http_task_view_and_the_cli(
    gateway: Gateway, settings: Settings
) -> None:
    outcome = await submit_over_http(gateway, {"capability": "spend"})
    task_id = outcome["task"]["id"]
    async with httpx.AsyncClient(base_url=gateway.url, headers=bearer(gateway.secret)) as http:
        view = (await http.get(f"/v1/tasks/{task_id}")).json()["task"]
    assert view["submitted_by"] == gateway.key_id
    assert view["usage"] == {"completion_tokens": 3, "prompt_tokens": 15, "tool_calls": 1}

    code, out, err = await shoal(settings, "task", task_id)
    assert code == 0, err
    assert f"API key {gateway.key_id}" in out
    assert "completion_tokens=3, prompt_tokens=15, tool_calls=1" in out
    assert gateway.secret not in out
    code, out, err = await shoal(settings, "task", task_id, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["submitted_by"] == gateway.key_id
    assert data["usage"] == {"completion_tokens": 3, "prompt_tokens": 15, "tool_calls": 1}


@pytest.mark.parametrize(
    ("counters", "says"),
    [
        ({}, "at least one counter"),
        ({"prompt-tokens": 1}, "is not an identifier"),
        ({"9lives": 1}, "is not an identifier"),
        ({"x" * 65: 1}, "is not an identifier"),
        ({"prompt_tokens": -1}, "must be within 0.."),
        ({"prompt_tokens": MAX_INCREMENT + 1}, "must be within 0.."),
        ({"prompt_tokens": 1.5}, "must be an int, got float"),
        ({"prompt_tokens": True}, "must be an int, got bool"),
        ({"prompt_tokens": "12"}, "must be an int, got str"),
        ({f"c{i}": 1 for i in range(MAX_COUNTERS + 1)}, f"at most {MAX_COUNTERS} counters"),
    ],
)
def test_bad_usage_counters_are_refused_saying_why(counters: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigurationError, match=says):
        usage_fields(counters)


async def test_a_handler_gets_the_error_and_nothing_is_recorded(
    settings: Settings, client: Client
) -> None:
    async with running_node([Metered], settings):
        handle = await client.submit("bad_usage", counters={"prompt_tokens": -5})
        assert "must be within 0.." in await handle.result(timeout=10)
        ok = await client.submit("bad_usage", counters={"prompt_tokens": 0, "cached": 4})
        assert await ok.result(timeout=10) == "accepted"
    assert (await handle.status()).usage == {}
    assert (await ok.status()).usage == {"cached": 4, "prompt_tokens": 0}


async def test_usage_for_a_record_that_is_gone_does_not_recreate_it(client: Client) -> None:
    """A late write (the record expired after its retention) is refused, not turned
    into a stray record without a TTL."""
    group = 0
    gone = client.keys.new_task_id(group)
    data = json.dumps(None).encode()  # never decoded: the record is looked up first
    refused = await client.scripts.events(
        [client.keys.delayed(group)], [client.keys.group_prefix(group), gone, 1, "usage", data, 0]
    )
    assert refused == 1
    assert not await client.redis.exists(client.keys.task(gone))
