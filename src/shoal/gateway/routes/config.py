"""/v1/config: the live configuration (shoal.coordination.config) over HTTP.

Reading needs the ``read`` scope; changing a setting, ``admin``. A change is
recorded as made by ``apikey:<key id>`` (or ``gateway`` on an open gateway), so
the history says which key changed what.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from shoal.coordination.config import HISTORY_LENGTH, ConfigDeleted, ConfigNotSet, ConfigStore
from shoal.gateway import responses
from shoal.gateway.auth import Admin, Caller, Read
from shoal.gateway.problems import COMMON_ERRORS, schema_responses
from shoal.gateway.schemas import ok
from shoal.gateway.state import gateway_state

router = APIRouter(prefix="/v1/config", tags=["config"])

Key = Annotated[
    str,
    Path(min_length=1, max_length=255, description="Setting key, e.g. capability.summarize.rate."),
]
ExpectVersion = Annotated[
    int | None, Query(ge=0, description="Only if the key is at this version (0: unset).")
]
BODY_ERRORS = schema_responses(400, 413)
CONFLICT = schema_responses(409)
NOT_SET = schema_responses(404)


class ConfigWrite(BaseModel):
    """A setting's new value, in its type (JSON)."""

    model_config = ConfigDict(extra="forbid")
    value: Any = Field(description="The value; checked against the setting's type and range.")
    expect_version: int | None = Field(
        None, ge=0, description="Only if the key is at this version (0: unset); else 409."
    )


def _store(request: Request) -> ConfigStore:
    return gateway_state(request).client.config


def _author(caller: Caller) -> str:
    return f"apikey:{caller.key.id}" if caller.key is not None else "gateway"


@router.get(
    "",
    summary="List the settings",
    response_class=Response,
    responses=ok("ConfigSnapshot", "Every setting (under the prefix), at one version.")
    | COMMON_ERRORS,
)
async def list_config(
    request: Request,
    caller: Read,
    prefix: Annotated[str, Query(max_length=255, description="Only keys starting so.")] = "",
) -> Response:
    snapshot = await _store(request).snapshot()
    entries = [e for e in snapshot.entries if e.key.startswith(prefix)]
    return responses.json({"version": snapshot.version, "entries": entries})


@router.get(
    "/history",
    summary="The latest changes",
    response_class=Response,
    responses=ok("ConfigChange", "Changes, newest first.", array=True) | COMMON_ERRORS,
)
async def config_history(
    request: Request,
    caller: Read,
    key: Annotated[str | None, Query(max_length=255, description="Only this key's.")] = None,
    limit: Annotated[int, Query(ge=1, le=HISTORY_LENGTH, description="At most this many.")] = 50,
) -> Response:
    return responses.json(await _store(request).history(key, limit=limit))


@router.get(
    "/{key}",
    summary="Read a setting",
    response_class=Response,
    responses=ok("ConfigEntry", "Its value, version, author and time.") | NOT_SET | COMMON_ERRORS,
)
async def get_config(key: Key, request: Request, caller: Read) -> Response:
    entry = await _store(request).entry(key)
    if entry is None:
        raise ConfigNotSet(f"config key {key!r} is not set (the code's default applies)")
    return responses.json(entry)


@router.put(
    "/{key}",
    summary="Change a setting",
    response_class=Response,
    responses=ok("ConfigEntry", "The new value and its version.")
    | BODY_ERRORS
    | CONFLICT
    | COMMON_ERRORS,
)
async def set_config(key: Key, body: ConfigWrite, request: Request, caller: Admin) -> Response:
    """Nodes apply the change within moments; no restart."""
    entry = await _store(request).set(
        key, body.value, by=_author(caller), expect_version=body.expect_version
    )
    return responses.json(entry)


@router.delete(
    "/{key}",
    summary="Unset a setting",
    response_class=Response,
    responses=ok("ConfigDeleted", "The version of the deletion.")
    | NOT_SET
    | CONFLICT
    | COMMON_ERRORS,
)
async def delete_config(
    key: Key, request: Request, caller: Admin, expect_version: ExpectVersion = None
) -> Response:
    """The code's own default applies again."""
    version = await _store(request).delete(key, by=_author(caller), expect_version=expect_version)
    if version is None:
        raise ConfigNotSet(f"config key {key!r} is not set")
    return responses.json(ConfigDeleted(key, version))
