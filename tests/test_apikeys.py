"""API keys: the store against the real engine, and ``shoal keys`` as a user runs it."""

from __future__ import annotations

import json

import pytest

from shoal import Client, ConfigurationError, Settings
from shoal.apikeys import ApiKey, KeyStore
from shoal.errors import KeyNotFound
from tests.test_cli import shoal


@pytest.fixture
def store(client: Client) -> KeyStore:
    return KeyStore(client)


@pytest.mark.topology
async def test_a_created_key_authenticates_with_its_secret(store: KeyStore) -> None:
    created = await store.create("ci", ["submit", "read"], rate=5, burst=10)
    key = created.key
    assert len(key.id) == 12 and int(key.id, 16) >= 0
    assert (key.name, key.scopes, key.rate, key.burst) == ("ci", ("read", "submit"), 5.0, 10)
    assert created.secret.startswith(f"shoal_{key.id}_") and len(created.secret) == 6 + 12 + 1 + 43
    assert await store.authenticate(created.secret) == key
    assert await store.any_keys()


@pytest.mark.topology
async def test_list_shows_every_key_oldest_first_without_secrets(store: KeyStore) -> None:
    assert await store.list() == [] and not await store.any_keys()
    first = await store.create("first", ["read"])
    second = await store.create("second", ["admin"])
    listed = await store.list()
    assert {k.id for k in listed} == {first.key.id, second.key.id}
    assert listed == sorted(listed, key=lambda k: (k.created_at, k.id))  # ids break ties
    assert all(type(k) is ApiKey and k.rate is None and k.burst is None for k in listed)


@pytest.mark.topology
async def test_a_revoked_key_stops_authenticating_at_once(store: KeyStore) -> None:
    created = await store.create("temp", ["read"])
    assert await store.revoke(created.key.id) == created.key
    assert await store.authenticate(created.secret) is None
    assert await store.list() == []
    with pytest.raises(KeyNotFound, match=created.key.id):
        await store.revoke(created.key.id)


async def test_a_key_is_revoked_by_its_name_when_no_other_key_has_it(store: KeyStore) -> None:
    created = await store.create("unique", ["read"])
    await store.create("other", ["read"])
    assert (await store.revoke("unique")).id == created.key.id
    assert [k.name for k in await store.list()] == ["other"]


async def test_revoking_a_name_several_keys_share_names_their_ids(store: KeyStore) -> None:
    a = await store.create("shared", ["read"])
    b = await store.create("shared", ["submit"])
    with pytest.raises(ConfigurationError, match="2 API keys are named 'shared'") as raised:
        await store.revoke("shared")
    assert a.key.id in str(raised.value) and b.key.id in str(raised.value)
    assert len(await store.list()) == 2  # nothing revoked
    await store.revoke(a.key.id)
    assert (await store.revoke("shared")).id == b.key.id  # now unique


async def test_revoking_an_unknown_key_says_so(store: KeyStore) -> None:
    with pytest.raises(KeyNotFound, match="no API key with id or name 'nobody'"):
        await store.revoke("nobody")


async def test_a_wrong_or_malformed_token_authenticates_nobody(store: KeyStore) -> None:
    created = await store.create("ci", ["read"])
    prefix, secret = created.secret[:19], created.secret[19:]
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    unknown_id = "shoal_000000000000_" + secret
    for presented in [
        prefix + flipped,  # right id, wrong secret
        unknown_id,  # well-formed, no such key
        created.secret + "x",  # too long
        created.secret[:-1],  # too short
        created.secret + "\n",
        created.secret.upper(),
        "Bearer " + created.secret,
        "",
        "shoal_",
        created.key.id,
    ]:
        assert await store.authenticate(presented) is None, presented


async def test_only_a_hash_of_the_secret_is_stored(client: Client, store: KeyStore) -> None:
    created = await store.create("ci", ["read", "admin"])
    raw = await client.redis.hgetall(client.keys.api_keys)
    assert list(raw) == [created.key.id.encode()]
    stored = b"".join(raw.values())
    random_part = created.secret[len(f"shoal_{created.key.id}_") :]
    assert created.secret.encode() not in stored and random_part[:16].encode() not in stored
    assert b"ci" in stored  # the record is there, just not its secret


@pytest.mark.parametrize(
    ("name", "scopes", "limits", "message"),
    [
        ("", ["read"], {}, "key name '' is invalid"),
        ("x" * 65, ["read"], {}, "is invalid: 1-64"),
        ("has space", ["read"], {}, "is invalid"),
        ("ci\n", ["read"], {}, "is invalid"),
        ("-ci", ["read"], {}, "starting with a letter or digit"),
        ("ci", [], {}, "at least one scope: some of read, submit, message, admin"),
        ("ci", ["read", "write"], {}, "unknown scope.* write: use some of read, submit"),
        ("ci", "read", {}, "a list of scope names"),
        ("ci", ["read"], {"rate": 0}, "rate must be"),
        ("ci", ["read"], {"rate": -1.5}, "rate must be"),
        ("ci", ["read"], {"burst": 0}, "burst must be"),
    ],
)
async def test_invalid_keys_are_refused_saying_what_is_allowed(
    store: KeyStore, name: str, scopes: list[str], limits: dict[str, float], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await store.create(name, scopes, **limits)  # type: ignore[arg-type]
    assert await store.list() == []


async def test_scopes_are_kept_once_each_in_a_fixed_order(store: KeyStore) -> None:
    created = await store.create("ci", ["admin", "read", "admin", "message"])
    assert created.key.scopes == ("read", "message", "admin")


# --- the command --------------------------------------------------------------------


async def test_every_keys_command_has_help() -> None:
    for command in (["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"]):
        code, out, _ = await shoal(None, *command, "--help")
        assert code == 0 and "Usage" in out, command


async def test_keys_create_prints_the_secret_once_and_it_works(
    settings: Settings, store: KeyStore
) -> None:
    code, out, _ = await shoal(
        settings, "keys", "create", "--name", "ci", "--scopes", "submit,read"
    )
    assert code == 0 and "cannot be shown again" in out
    secret = next(line for line in out.splitlines() if line.startswith("shoal_"))
    key = await store.authenticate(secret)
    assert key is not None and key.name == "ci" and key.scopes == ("read", "submit")


async def test_keys_create_json_carries_the_secret_and_the_limits(
    settings: Settings, store: KeyStore
) -> None:
    args = ["--name", "bot", "--scopes", "message", "--rate", "2.5", "--burst", "5", "--json"]
    code, out, _ = await shoal(settings, "keys", "create", *args)
    assert code == 0
    data = json.loads(out)
    assert (data["name"], data["scopes"], data["rate"], data["burst"]) == (
        "bot", ["message"], 2.5, 5,
    )  # fmt: skip
    assert (await store.authenticate(data["secret"])) is not None
    assert data["id"] == (await store.list())[0].id


async def test_keys_list_shows_a_table_or_json_without_secrets(
    settings: Settings, store: KeyStore
) -> None:
    code, out, _ = await shoal(settings, "keys", "list")
    assert code == 0 and "no API keys" in out
    created = await store.create("ci", ["read"], burst=7)
    code, out, _ = await shoal(settings, "keys", "list")
    assert code == 0 and created.key.id in out and "ci" in out and "default" in out and "7" in out
    assert created.secret not in out
    code, out, _ = await shoal(settings, "keys", "list", "--json")
    [row] = json.loads(out)
    assert row["id"] == created.key.id and row["scopes"] == ["read"] and "secret" not in row


async def test_keys_revoke_by_id_or_name_and_errors_in_one_line(
    settings: Settings, store: KeyStore
) -> None:
    by_id = await store.create("one", ["read"])
    await store.create("two", ["read"])
    code, out, _ = await shoal(settings, "keys", "revoke", by_id.key.id)
    assert code == 0 and f"revoked API key {by_id.key.id} (one)" in out
    code, out, _ = await shoal(settings, "keys", "revoke", "two")
    assert code == 0 and "(two)" in out
    assert await store.list() == []
    code, _, err = await shoal(settings, "keys", "revoke", "two")
    assert code == 1 and err.strip() == "error: no API key with id or name 'two'"


async def test_keys_create_with_a_bad_scope_exits_1_saying_the_valid_ones(
    settings: Settings,
) -> None:
    code, _, err = await shoal(settings, "keys", "create", "--name", "ci", "--scopes", "write")
    assert code == 1 and "use some of read, submit, message, admin" in err
    assert len(err.strip().splitlines()) == 1
