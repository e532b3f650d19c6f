"""Shoal's model plane: a client for OpenAI-compatible Chat Completions servers.

``LLMClient`` (``shoal.llm.client``) calls the model; its results are typed
(``shoal.llm.types``) and so are its errors (``shoal.llm.errors``).
"""

from shoal.llm.client import ENV_API_KEY, ENV_BASE_URL, ENV_MODEL, NO_RETRY, LLMClient, RetryPolicy
from shoal.llm.errors import (
    LLMAuthError,
    LLMBadRequest,
    LLMConnectionError,
    LLMError,
    LLMRateLimited,
    LLMServerError,
    LLMStreamBroken,
    LLMStreamStalled,
    LLMTimeout,
)
from shoal.llm.providers import Provider, ProviderPool, ProvidersFailed
from shoal.llm.quota import QuotaExceeded
from shoal.llm.types import Completion, StreamDelta, ToolCall, Usage

__all__ = [
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "NO_RETRY",
    "Completion",
    "LLMAuthError",
    "LLMBadRequest",
    "LLMClient",
    "LLMConnectionError",
    "LLMError",
    "LLMRateLimited",
    "LLMServerError",
    "LLMStreamBroken",
    "LLMStreamStalled",
    "LLMTimeout",
    "Provider",
    "ProviderPool",
    "ProvidersFailed",
    "QuotaExceeded",
    "RetryPolicy",
    "StreamDelta",
    "ToolCall",
    "Usage",
]
