"""JSON answers encoded by msgspec: Shoal's structs go out as they are, fast, with
bytes as base64 and datetimes as RFC 3339 — no second model layer to keep in step."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi.responses import Response


def json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        msgspec.json.encode(value), status_code=status, media_type="application/json",
        headers=headers,
    )  # fmt: skip
