"""The `shoal` command, run as a user runs it (a subprocess), against the real engine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shoal import Client, Settings
from shoal.routing import partition_of
from tests.agents import Toolbox
from tests.conftest import (
    REPO,
    eventually,
    node_env,
    node_process,
    running_node,
    wait_for_status,
)
from tests.stateful import Counter, Relay


async def shoal(
    settings: Settings | None,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal.cli", *args,
        cwd=cwd, env=env or (node_env(settings) if settings else dict(os.environ)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize(
    "command",
    [[], ["node"], ["submit"], ["task"], ["dlq"], ["dlq", "list"], ["dlq", "redrive"],
     ["engine"], ["engine", "start"], ["engine", "stop"], ["engine", "status"],
     ["agents"], ["agent"], ["send"], ["request"], ["gateway"], ["keys"], ["keys", "create"],
     ["keys", "list"], ["keys", "revoke"]],
)  # fmt: skip
async def test_every_command_has_help(command: list[str]) -> None:
    code, out, _ = await shoal(None, *command, "--help")
    assert code == 0 and "Usage" in out


async def test_submit_prints_the_id_and_says_when_no_node_hosts_it(
    settings: Settings, client: Client
) -> None:
    code, out, err = await shoal(settings, "submit", "echo", "value=42")
    assert code == 0
    task_id = out.strip()
    assert len(task_id) == 28
    assert "no live node hosts 'echo'" in err
    info = await client.status(task_id)
    assert info.status == "queued"
    assert await client.cancel(task_id) == "cancelled"


async def test_submit_wait_prints_the_result_as_json(settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        code, out, _ = await shoal(settings, "submit", "add", "a=2", "b=40", "--wait")
    assert code == 0
    assert json.loads(out)["sum"] == 42


async def test_submit_wait_prints_json_as_is_not_as_rich_markup(settings: Settings) -> None:
    value = ["[bold]", ":smile:", True, None, "x" * 400]  # markup, emoji code, longer than 240
    async with running_node([Toolbox], settings):
        code, out, _ = await shoal(settings, "submit", "echo", f"value={json.dumps(value)}", "-w")
    assert code == 0
    assert out.count("\n") == 1 and json.loads(out) == value


async def test_submit_wait_of_a_failing_task_exits_3_with_one_line(settings: Settings) -> None:
    async with running_node([Toolbox], settings):
        code, _, err = await shoal(settings, "submit", "permanent", "--wait")
    assert code == 3
    assert "PermanentError: no point retrying" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_task_shows_status_result_attempts_and_events(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("report", steps=2)
        await handle.result(timeout=10)
    code, out, _ = await shoal(settings, "task", handle.id, "--events")
    assert code == 0
    assert "succeeded" in out and '"reported"' in out and "1 of 3" in out
    assert out.count("progress") == 2 and "done" in out
    code, out, _ = await shoal(settings, "task", handle.id, "--json")
    assert json.loads(out)["status"] == "succeeded" and json.loads(out)["result"] == "reported"


async def test_task_of_an_unhosted_capability_says_no_node_hosts_it(
    settings: Settings, client: Client
) -> None:
    handle = await client.submit("nobody_hosts_this")
    code, out, _ = await shoal(settings, "task", handle.id)
    assert code == 0 and "no live node hosts 'nobody_hosts_this' yet" in out


async def test_dlq_list_and_redrive(settings: Settings, client: Client) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("always_fails")
        with pytest.raises(Exception, match="this never works"):
            await handle.result(timeout=10)
        code, out, _ = await shoal(settings, "dlq", "list", "always_fails")
        assert code == 0 and handle.id in out and "ValueError: this never works" in out
        code, out, _ = await shoal(settings, "dlq", "redrive", "always_fails")
        assert code == 0 and "re-queued 1 task(s)" in out and handle.id in out
        with pytest.raises(Exception, match="this never works"):
            await handle.result(timeout=10)
    code, out, _ = await shoal(settings, "dlq", "list", "echo")
    assert code == 0 and "no dead letters" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task", "not-an-id"], "is not a Shoal task id"),
        (["task", "0" * 28], "no task 0000000000000000000000000000"),
        (["submit", "echo", "novalue"], "is not key=value"),
        (["submit", "echo", "--priority", "urgent"], "use one of high, normal, low"),
        (["submit", "bad name"], "capability name 'bad name' is invalid"),
        (["dlq", "redrive", "echo", "0" * 28], "not in the dead-letter queue"),
        (["agent", "not-an-id"], "agent id 'not-an-id' is not 'type/key'"),
        (["agent", "Counter/a"], "type 'Counter' must be snake_case"),
        (["agent", "counter/bad key"], "key 'bad key' must be 1-200 characters"),
        (["agent", "nosuch/a"], "no node has hosted agent type 'nosuch'"),
        (["agents", "--type", "Bad-Type"], "agent type 'Bad-Type' must be snake_case"),
        (["agents", "--type", "nosuch"], "no node has hosted agent type 'nosuch'"),
        (["send", "counter/a", "{oops"], "message '{oops' is not JSON"),
        (["send", "counter/a", "[/x]"], "message '[/x]' is not JSON"),  # not rich markup
        (["request", "counter/a", "hello"], "message 'hello' is not JSON"),
        (["send", "nosuch/a", "1"], "no node has hosted agent type 'nosuch'"),
    ],
)
async def test_bad_input_is_one_readable_line_and_exit_1(
    settings: Settings, args: list[str], message: str
) -> None:
    code, _, err = await shoal(settings, *args)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--app", "no_such_module"], "cannot import app module 'no_such_module'"),
        (["node", "--app", "json"], "module 'json' defines no Agent class"),
        (["node", "--app", "tests.broken_app"], "importing app module 'tests.broken_app' failed"),
    ],
)
async def test_node_with_a_bad_app_says_why_in_one_line(
    settings: Settings, args: list[str], message: str
) -> None:
    code, _, err = await shoal(settings, *args)
    assert code == 1 and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--max-active-agents", "0", "max_active_agents must be >= 1, got 0"),
        ("--idle-after", "0", "idle_after must be > 0 seconds, got 0.0"),
        ("--lease-time", "1.5", "lease_time (1.5s) must be at least twice heartbeat_interval"),
    ],
)
async def test_node_agent_options_are_checked_in_one_line(
    settings: Settings, option: str, value: str, message: str
) -> None:
    code, _, err = await shoal(settings, "node", "--app", "tests.stateful", option, value)
    assert code == 1 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


async def test_node_without_an_engine_says_so_in_one_line() -> None:
    env = {**os.environ, "SHOAL_REDIS_URL": "redis://127.0.0.1:1/0"}
    code, _, err = await shoal(None, "node", "--app", "tests.agents", env=env)
    assert code == 1 and "cannot reach the engine at redis://127.0.0.1:1/0" in err


async def test_unreachable_engine_is_one_line_with_the_masked_url() -> None:
    env = {**os.environ, "SHOAL_REDIS_URL": "redis://:pw@127.0.0.1:1/0"}
    code, _, err = await shoal(None, "submit", "echo", env=env)
    assert code == 1 and "cannot reach the engine at redis://:***@127.0.0.1:1/0" in err
    assert "pw@" not in err


async def test_debug_shows_the_traceback(settings: Settings) -> None:
    code, _, err = await shoal(settings, "--debug", "task", "not-an-id")
    assert code == 1 and "Traceback" in err


async def test_engine_start_status_stop(tmp_path: Path) -> None:
    data = str(tmp_path / "eng")
    env = {k: v for k, v in os.environ.items() if k != "SHOAL_REDIS_URL"}
    code, out, _ = await shoal(None, "engine", "status", "--data-dir", data, env=env)
    assert code == 1 and "no engine running" in out
    code, out, _ = await shoal(None, "engine", "start", "--data-dir", data, env=env)
    assert code == 0 and "engine started: redis://:***@127.0.0.1:" in out
    try:
        code, out, _ = await shoal(None, "engine", "start", "--data-dir", data, env=env)
        assert code == 0 and "already running" in out
        code, out, _ = await shoal(None, "engine", "status", "--data-dir", data, env=env)
        assert code == 0 and "valkey" in out and "***" in out
        code, url, _ = await shoal(None, "engine", "status", "--url", "--data-dir", data, env=env)
        async with Client(url.strip()) as client:
            assert await client.redis.ping()
    finally:
        code, out, _ = await shoal(None, "engine", "stop", "--data-dir", data, env=env)
    assert code == 0 and "engine stopped" in out
    code, out, _ = await shoal(None, "engine", "stop", "--data-dir", data, env=env)
    assert "no engine was running" in out


async def test_cancel_command_cancels_and_reports(settings: Settings, client: Client) -> None:
    handle = await client.submit("echo", value=1)
    code, out, _ = await shoal(settings, "cancel", handle.id)
    assert code == 0 and out.strip() == "cancelled"
    code, out, _ = await shoal(settings, "cancel", handle.id)
    assert code == 0 and "already ended (cancelled)" in out


async def test_task_events_of_a_running_task_print_at_once(
    settings: Settings, client: Client
) -> None:
    async with running_node([Toolbox], settings):
        handle = await client.submit("sleepy", seconds=30)
        await wait_for_status(handle, "running")
        code, out, _ = await shoal(settings, "task", handle.id, "--events")
        await handle.cancel()
    assert code == 0 and "running" in out


@pytest.mark.topology
async def test_status_lists_nodes_and_queues(
    settings: Settings, client: Client, engine_kind: str
) -> None:
    await client.submit("echo", value=1)
    async with running_node([Toolbox], settings, name="status-node"):
        code, out, _ = await shoal(settings, "status")
        assert code == 0
        assert "status-node" in out and "alive" in out and "echo" in out
        code, out, _ = await shoal(settings, "status", "--json")
    data = json.loads(out)
    assert [n["id"] for n in data["nodes"]] == ["status-node"]
    assert any(q["capability"] == "echo" for q in data["queues"])
    groups = data["key_groups"]
    if engine_kind == "cluster":  # 16 groups over 3 shards of equal slot ranges: 5-6 each,
        shards = [g["shard"] for g in groups]  # give or take the stripe a boundary cuts
        counts = [shards.count(s) for s in set(shards)]
        assert len(groups) == 16 and len(counts) == 3 and min(counts) >= 4, counts
    else:
        assert [g["tag"] for g in groups] == [settings.namespace]


# --- the agent plane -------------------------------------------------------------------


async def test_node_options_for_agents_reach_the_node(settings: Settings, client: Client) -> None:
    """--lease-time sets the leases' lifetime; --max-active-agents 1 deactivates the
    least recently used agent; --idle-after deactivates an idle one."""
    args = ["--max-active-agents", "1", "--idle-after", "3", "--lease-time", "5"]
    with node_process(settings, "tests.stateful", "--name", "opts-node", *args):
        await client.wait_for_hosts("increment", timeout=20)
        assert await client.call("increment", agent="counter/a", result_timeout=20) == 1
        lease = client.keys.lease("counter", partition_of("counter/a", await client.partitions()))
        assert 3000 < await client.redis.pttl(lease) <= 5000  # the default would be 3 s
        assert await client.call("increment", agent="counter/b", result_timeout=20) == 1

        async def only_b_active() -> bool:
            return [a.id for a in await client.agents(active=True)] == ["counter/b"]

        await eventually(only_b_active)
        code, out, _ = await shoal(settings, "agents", "--active")
        assert code == 0 and "counter/b" in out and "opts-node" in out and "counter/a" not in out

        async def none_active() -> bool:
            return not await client.agents(active=True)

        await eventually(none_active)
        code, out, _ = await shoal(settings, "agents", "--stored")
        assert code == 0 and "counter/a" in out and "counter/b" in out


async def test_agents_lists_the_directory(settings: Settings, client: Client) -> None:
    code, out, _ = await shoal(settings, "agents")
    assert code == 0 and "no agent types yet" in out
    async with running_node([Counter, Relay], settings, name="dir-node"):
        assert await client.call("increment", agent="counter/a", by=2) == 2
        assert await client.call("increment", agent="counter/b") == 1

        async def both_active() -> bool:
            return len(await client.agents(active=True)) == 2

        await eventually(both_active)
        code, out, _ = await shoal(settings, "agents")
        assert code == 0
        rows = [line for line in out.splitlines() if "counter/" in line]
        assert len(rows) == 2 and all("dir-node" in row and "ago" in row for row in rows)
        code, out, _ = await shoal(settings, "agents", "--json")
        entries = json.loads(out)
        assert [e["id"] for e in entries] == ["counter/a", "counter/b"]
        assert all(e["node"] == "dir-node" and e["state_size"] > 0 for e in entries)
        a = entries[0]
        assert a["partition"] == partition_of("counter/a", await client.partitions())
        code, out, _ = await shoal(settings, "agents", "--capability", "increment", "--limit", "1")
        assert code == 0 and "counter/a" in out and "counter/b" not in out
        assert "(showing 1; there may be more: raise --limit)" in out
        code, out, _ = await shoal(settings, "agents", "--type", "relay")
        assert code == 0 and out.strip() == "no agents of type 'relay'"
        code, _, err = await shoal(settings, "agents", "--capability", "nosuch")
        assert code == 1 and "no agent type has capability 'nosuch' (types: counter, relay)" in err
    # The node drained: no agent is active any more, their state stays.
    code, out, _ = await shoal(settings, "agents", "--active")
    assert code == 0 and out.strip() == "no agents active on a node"
    code, out, _ = await shoal(settings, "agents", "--stored", "--json")
    entries = json.loads(out)
    assert [e["id"] for e in entries] == ["counter/a", "counter/b"]
    assert all(e["node"] is None and e["state_size"] > 0 for e in entries)
    code, out, _ = await shoal(settings, "agents", "--stored")
    assert code == 0 and "counter/a" in out and "dir-node" not in out


async def test_agent_shows_its_entry_and_state(settings: Settings, client: Client) -> None:
    async with running_node([Counter, Relay], settings, name="one-node"):
        assert await client.call("increment", agent="counter/a", by=5) == 5

        async def active() -> bool:
            return (await client.agent("counter/a")).node == "one-node"

        await eventually(active)
        partition = partition_of("counter/a", await client.partitions())
        code, out, _ = await shoal(settings, "agent", "counter/a", "--state")
        assert code == 0
        assert "one-node" in out and re.search(rf"partition +{partition} *\n", out) and "ago" in out
        assert '"n": 5' in out
        code, out, _ = await shoal(settings, "agent", "counter/a", "--json", "--state")
        data = json.loads(out)
        assert data["id"] == "counter/a" and data["type"] == "counter" and data["key"] == "a"
        assert data["partition"] == partition and data["node"] == "one-node"
        assert data["state"] == {"n": 5} and data["state_size"] > 0
    # An agent that never ran: a valid id of a known type, nothing stored.
    code, out, _ = await shoal(settings, "agent", "counter/never", "--state")
    assert code == 0 and "not active" in out and "none saved" in out and "no saved state" in out
    code, out, _ = await shoal(settings, "agent", "counter/never", "--json")
    data = json.loads(out)
    assert data["node"] is None and data["state_size"] == 0 and "state" not in data


async def test_send_and_request(settings: Settings, client: Client) -> None:
    async with running_node([Counter, Relay], settings, name="msg-node"):
        code, out, _ = await shoal(settings, "send", "counter/a", '{"hello": [1, 2]}')
        assert code == 0 and out.strip() == "sent to counter/a"
        code, out, _ = await shoal(settings, "request", "counter/a", '"second"', "--timeout", "20")
        assert code == 0
        assert json.loads(out) == {"count": 2, "sender": None, "node": "msg-node"}
        assert await client.agent_state("counter/a") == {"seen": [{"hello": [1, 2]}, "second"]}
        code, _, err = await shoal(settings, "request", "counter/a", '{"fail": true}')
        assert code == 3 and "agent counter/a failed the request: ValueError: asked to fail" in err
        assert len(err.strip().splitlines()) == 1
        code, _, err = await shoal(settings, "request", "relay/a", "1")
        assert code == 1 and "agent type 'relay' handles no messages" in err
    # No node now: the message waits in the mailbox and the request runs out.
    code, _, err = await shoal(settings, "request", "counter/a", "3", "--timeout", "0.5")
    assert code == 4 and "agent counter/a did not reply within 0.5s" in err
    code, _, err = await shoal(settings, "request", "counter/a", "3", "--timeout", "0")
    assert code == 1 and "timeout must be > 0 seconds" in err


async def test_status_shows_agent_partitions_backlog_and_ownership(
    settings: Settings, client: Client
) -> None:
    eight = settings.with_(partitions=8)  # the node fixes the namespace's count first
    async with running_node([Counter, Relay], eight, name="agent-node"):
        assert await client.call("increment", agent="counter/a") == 1

        async def settled() -> bool:
            state = await client.cluster()
            node = state.nodes[0]
            return node.partitions == 16 and node.active_agents == 1

        await eventually(settled)
        code, out, _ = await shoal(settings, "status")
        assert code == 0 and "agent types" in out and "agent-node (8)" in out
        assert "recent ownership changes" in out and "acquired by agent-node" in out
        code, out, _ = await shoal(settings, "status", "--json")
        data = json.loads(out)
        assert data["nodes"][0]["partitions"] == 16 and data["nodes"][0]["active_agents"] == 1
        counter, relay = data["agent_types"]
        assert counter["name"] == "counter" and relay["name"] == "relay"
        assert counter["owners"] == {"agent-node": 8} and counter["unowned"] == 0
        assert counter["partitions"] == 8 and counter["backlog"] == 0
        assert "increment" in counter["capabilities"] and counter["handles_messages"]
        assert len(data["ownership"]) == 5
        assert all(
            c["event"] == "acquired" and c["node"] == "agent-node" for c in data["ownership"]
        )
    # The node drained and released its partitions; messages sent now wait.
    for i in range(3):
        await client.send("counter/b", i)
    code, out, _ = await shoal(settings, "status", "--json")
    data = json.loads(out)
    counter = data["agent_types"][0]
    assert counter["owners"] == {} and counter["unowned"] == 8 and counter["backlog"] == 3
    assert data["ownership"][0]["event"] == "released"
    assert data["ownership"][0]["node"] == "agent-node"
    code, out, _ = await shoal(settings, "status")
    assert code == 0 and "released by agent-node" in out
    row = next(line for line in out.splitlines() if line.startswith("│ counter"))
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[2:6] == ["8", "-", "8", "3"]  # partitions, owned by, unowned, backlog
