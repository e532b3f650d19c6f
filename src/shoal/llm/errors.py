"""The model client's errors: one class per thing the caller can do about it.

A caller retries ``LLMRateLimited`` after ``retry_after``, fixes its request on
``LLMBadRequest``, fixes its key on ``LLMAuthError``, fails over on
``LLMServerError`` / ``LLMConnectionError`` / ``LLMTimeout``, and on
``LLMStreamBroken`` decides what to do with the text already shown to a user
(retrying blindly would show it twice). None of them ever carries the API key:
messages are built from the status, the URL without credentials and the server's
own (redacted) error text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.llm.types import Completion

__all__ = [
    "LLMAuthError",
    "LLMBadRequest",
    "LLMConnectionError",
    "LLMError",
    "LLMRateLimited",
    "LLMServerError",
    "LLMStreamBroken",
    "LLMStreamStalled",
    "LLMTimeout",
]


class LLMError(ShoalError):
    """Root of the model client's errors; ``status`` is the HTTP status, if any."""

    # whether another try (here or on another replica) may succeed: what
    # shoal.resilience.RetryPolicy's default retry_on reads
    retryable = False

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LLMBadRequest(LLMError):
    """The server rejected the request itself (400/404/422): a retry will not help."""


class LLMAuthError(LLMError):
    """The API key is missing, wrong or not allowed this model (401/403)."""


class LLMRateLimited(LLMError):
    """The provider's quota is spent for now (429); try again after ``retry_after``
    seconds when the server said so (None when it did not)."""

    retryable = True

    def __init__(self, message: str, status: int | None = 429, retry_after: float | None = None):
        super().__init__(message, status)
        self.retry_after = retry_after
        # set by a pool retrying on another replica, whose quota this one's
        # Retry-After says nothing of (shoal.resilience.RetryPolicy reads it)
        self.elsewhere = False


class LLMServerError(LLMError):
    """The server failed (5xx): another attempt or another replica may succeed."""

    retryable = True


class LLMTimeout(LLMError):
    """No connection, no next chunk or no whole answer within its timeout."""


class LLMConnectionError(LLMError):
    """The server could not be reached, or dropped the connection before answering."""

    retryable = True


class LLMStreamBroken(LLMError):
    """The connection died after part of a streamed answer arrived.

    ``partial`` holds what was received (its content, the tool calls whose
    arguments were complete enough to assemble, ``finish_reason`` None). The client
    never retries this itself: the caller has already seen that text.
    """

    def __init__(self, message: str, partial: Completion) -> None:
        super().__init__(message)
        self.partial = partial


class LLMStreamStalled(LLMStreamBroken, LLMTimeout):
    """A streamed answer stopped arriving: no chunk within the read timeout, or the
    total timeout ran out, after part of it came. Both a timeout (``except
    LLMTimeout`` catches it) and a broken stream (it carries ``partial``)."""
