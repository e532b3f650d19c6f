"""API keys for the gateway: create, list, revoke, authenticate.

A key is a public id, a name, its scopes and optional rate limits; the caller
presents a token ``shoal_<id>_<secret>``, shown once when the key is created. The
engine keeps only a SHA-256 of the token, in one hash (``apikeys``, field = key
id; see shoal.keys), so a copy of the engine's data grants nothing. Every gateway
reads the record per request, so a revoked key (its record removed) stops working
at once everywhere.

Why SHA-256 and not bcrypt/argon2: those are for passwords, which are guessable
and need a slow hash to resist guessing. These secrets are 256 random bits, which
no hash speed makes guessable, and a fast hash keeps authentication to one
engine read and a microsecond of CPU per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgspec

from shoal.coordination.ratelimit import validate_burst, validate_rate
from shoal.errors import ConfigurationError, EngineError, KeyNotFound, ShoalError
from shoal.protocol import now_ms

if TYPE_CHECKING:
    from shoal.client import Client

SCOPES = ("read", "submit", "message", "admin")
TOKEN_PREFIX = "shoal_"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
# shoal_<12 hex digits of id>_<43 urlsafe base64 characters: 32 random bytes>
_TOKEN_RE = re.compile(r"shoal_(?P<id>[0-9a-f]{12})_[A-Za-z0-9_-]{43}")
_ID_ATTEMPTS = 5  # fresh ids tried if one is taken (48 random bits: practically never)


# Set in the namespace's config hash when the first key is created; never cleared.
KEYS_REQUIRED_FIELD = "api_keys_required"


class ApiKey(msgspec.Struct, frozen=True):
    """An API key as the gateway sees it: never its secret, nor the secret's hash."""

    id: str  # short public id, 12 hex digits (also inside the token)
    name: str
    scopes: tuple[str, ...]  # in SCOPES order
    created_at: int  # epoch ms
    rate: float | None = None  # requests per second allowed (None = gateway default)
    burst: int | None = None  # bucket size (None = gateway default)


class CreatedKey(msgspec.Struct, frozen=True):
    """A key just created, with the token to present: shown once, never stored."""

    key: ApiKey
    secret: str  # "shoal_<id>_<43 urlsafe characters>"


class _Record(msgspec.Struct, frozen=True):
    """What the engine stores per key: the key and the SHA-256 of its token."""

    key: ApiKey
    sha256: bytes


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"key name {name!r} is invalid: 1-64 letters, digits, '_', '.', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """At least one scope, each one of SCOPES; returned deduplicated, in SCOPES order."""
    valid = ", ".join(SCOPES)
    if isinstance(scopes, str):  # "read" would otherwise be the scopes r, e, a, d
        raise ConfigurationError(f"scopes must be a list of scope names (from {valid}), not a str")
    wanted = set(scopes)
    if unknown := sorted(str(s) for s in wanted - set(SCOPES)):
        raise ConfigurationError(f"unknown scope(s) {', '.join(unknown)}: use some of {valid}")
    if not wanted:
        raise ConfigurationError(f"a key needs at least one scope: some of {valid}")
    return tuple(s for s in SCOPES if s in wanted)


def _digest(token: str) -> bytes:
    # SHA-256, not a password hash: the token carries 256 random bits (see above).
    return hashlib.sha256(token.encode()).digest()


def _new_token(key_id: str) -> str:
    return f"{TOKEN_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _decode(key_id: str, raw: bytes) -> _Record:
    try:
        return msgspec.msgpack.decode(raw, type=_Record)
    except msgspec.DecodeError as exc:
        raise EngineError(f"the record of API key {key_id} is unreadable: {exc}") from None


class KeyStore:
    """The API keys of the client's namespace. The client must be connected."""

    def __init__(self, client: Client) -> None:
        self._client = client

    @property
    def _hash(self) -> str:
        return self._client.keys.api_keys  # read per call: connect() settles the keys

    async def create(
        self,
        name: str,
        scopes: Iterable[str],
        *,
        rate: float | None = None,
        burst: int | None = None,
    ) -> CreatedKey:
        """A new key. Its token is in the answer only: keep it, it cannot be shown
        again. Names need not be unique (revoking by a shared name is refused)."""
        template = ApiKey(
            id="",
            name=validate_name(name),
            scopes=validate_scopes(scopes),
            created_at=now_ms(),
            rate=None if rate is None else validate_rate(rate),
            burst=None if burst is None else validate_burst(burst),
        )
        for _ in range(_ID_ATTEMPTS):
            key = msgspec.structs.replace(template, id=secrets.token_hex(6))
            token = _new_token(key.id)
            if await self._store_new(_Record(key, _digest(token))):
                return CreatedKey(key, token)
        raise ShoalError(f"no free API key id after {_ID_ATTEMPTS} tries")

    async def _store_new(self, record: _Record) -> bool:
        """Store a record under an id nobody holds (HSETNX): False if it is taken."""
        async with self._client.errors():
            pipe = self._client.redis.pipeline(transaction=True)  # one slot: the control tag
            pipe.hsetnx(self._hash, record.key.id, msgspec.msgpack.encode(record))
            pipe.hset(self._client.keys.config, KEYS_REQUIRED_FIELD, "1")
            stored, _ = await pipe.execute()
            return bool(stored)

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first (without secrets or hashes)."""
        records = await self._records()
        return sorted(records.values(), key=lambda k: (k.created_at, k.id))

    async def _records(self) -> dict[str, ApiKey]:
        async with self._client.errors():
            raw = await self._client.redis.hgetall(self._hash)
        return {k.decode(): _decode(k.decode(), v).key for k, v in raw.items()}

    async def revoke(self, key: str) -> ApiKey:
        """Remove a key, by id or by name; it stops working at once. An id wins over
        a name; a name several keys share is refused (ConfigurationError naming
        their ids); KeyNotFound if no key has this id or name."""
        target = _resolve(key, await self._records())
        async with self._client.errors():
            removed = await self._client.redis.hdel(self._hash, target.id)
        if not removed:  # revoked by someone else meanwhile
            raise KeyNotFound(f"no API key with id {target.id!r} (revoked meanwhile)")
        return target

    async def authenticate(self, presented: str) -> ApiKey | None:
        """The key a presented token belongs to, or None: malformed, unknown (or
        revoked) id, or wrong secret. Engine errors are raised, not taken as None,
        so a gateway can answer 503 rather than 401."""
        match = _TOKEN_RE.fullmatch(presented) if isinstance(presented, str) else None
        if match is None:
            return None
        key_id = match["id"]
        async with self._client.errors():
            raw = await self._client.redis.hget(self._hash, key_id)
        if raw is None:  # quicker than a wrong secret: the id is public anyway
            return None
        record = _decode(key_id, raw)
        if not hmac.compare_digest(record.sha256, _digest(presented)):
            return None
        return record.key

    async def any_keys(self) -> bool:
        """Whether any key exists (e.g. whether a gateway can accept keys at all)."""
        async with self._client.errors():
            return bool(await self._client.redis.hlen(self._hash))

    async def required(self) -> bool:
        """Whether gateways must ask for keys: once a namespace has had an API key, it
        does for good — revoking the last key (say, while rotating) must not open the
        gateways to anyone in the meantime. Fails closed."""
        async with self._client.errors():
            pipe = self._client.redis.pipeline(transaction=False)
            pipe.hget(self._client.keys.config, KEYS_REQUIRED_FIELD)
            pipe.hlen(self._hash)
            marker, count = await pipe.execute()
        return bool(marker) or bool(count)


def _resolve(key: str, records: dict[str, ApiKey]) -> ApiKey:
    """The one key ``key`` names, by id first, then by name."""
    if key in records:
        return records[key]
    named = [k for k in records.values() if k.name == key]
    if len(named) > 1:
        ids = ", ".join(sorted(k.id for k in named))
        raise ConfigurationError(
            f"{len(named)} API keys are named {key!r} (ids {ids}): revoke one by its id"
        )
    if not named:
        raise KeyNotFound(f"no API key with id or name {key!r}")
    return named[0]
