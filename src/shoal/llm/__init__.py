"""Shoal's model plane: LLM agents and the model client under them.

``LLMAgent`` (``shoal.llm.agent``) is a conversation as an agent, with tools that
are capabilities or other agents (``shoal.llm.tools``) and its answer streamed
into task events (``shoal.llm.answer`` follows them). ``LLMClient``
(``shoal.llm.client``) calls one OpenAI-compatible endpoint; its results are
typed (``shoal.llm.types``) and so are its errors (``shoal.llm.errors``).
"""

from shoal.llm.agent import LLMAgent
from shoal.llm.answer import Answer, AnswerPiece, follow_answer
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
from shoal.llm.model import ChatModel
from shoal.llm.providers import Provider, ProviderPool, ProvidersFailed
from shoal.llm.quota import QuotaExceeded
from shoal.llm.response_cache import CachedModel
from shoal.llm.tools import Tool, agent_tool, capability_tool
from shoal.llm.types import Completion, StreamDelta, ToolCall, Usage

__all__ = [
    "Answer",
    "AnswerPiece",
    "CachedModel",
    "ChatModel",
    "Completion",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "LLMAgent",
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
    "NO_RETRY",
    "Provider",
    "ProviderPool",
    "ProvidersFailed",
    "QuotaExceeded",
    "RetryPolicy",
    "StreamDelta",
    "Tool",
    "ToolCall",
    "Usage",
    "agent_tool",
    "capability_tool",
    "follow_answer",
]
