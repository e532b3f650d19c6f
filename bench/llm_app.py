"""The LLM agents bench.llm runs on ``shoal node`` processes: one conversation per
addressed agent, answering through the test model server (``SHOAL_LLM_BASE_URL``).

- ``bench_chat/<id>``: straight to the server through an ``LLMClient`` whose HTTP
  pool is as large as the direct baseline's (``BENCH_LLM_CONNECTIONS``, default
  1000; httpx's default of 100 would queue most of 1,000 concurrent streams inside
  a node and be measured as Shoal's overhead).
- ``bench_quota_chat/<id>``: through a ``ProviderPool`` with one provider under
  cluster-wide quotas: ``BENCH_LLM_RPM`` requests and ``BENCH_LLM_TPM`` tokens per
  ``BENCH_LLM_QUOTA_PERIOD`` seconds (the quota phase; callers wait up to
  ``QUOTA_WAIT_S``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httpx

from shoal.llm import LLMAgent, LLMClient, Provider, ProviderPool
from shoal.llm.client import ENV_BASE_URL

if TYPE_CHECKING:
    from shoal.client import Client
    from shoal.llm.model import ChatModel

MODEL = "bench"
MAX_TOKENS = 16  # the answers are 8 tokens; a tight quota estimate (shoal.llm.quota)
DEFAULT_CONNECTIONS = 1000
QUOTA_WAIT_S = 300.0  # the quota phase queues every caller: none may give up


def http_client(connections: int) -> httpx.AsyncClient:
    """An HTTP pool for ``connections`` concurrent streams (the same for the
    direct baseline and the agents, so both are measured with the same pool)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(connect=30.0, read=120.0, write=120.0, pool=120.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


class _Conversation:
    """What both agent types share: no tools; the test server echoes ("You said: ...")."""

    system_prompt = "You are a benchmark."
    model_name = MODEL
    temperature = 0
    max_tokens = MAX_TOKENS


class BenchChat(_Conversation, LLMAgent):
    agent_type = "bench_chat"

    def build_model(self, client: Client) -> ChatModel:
        connections = int(os.environ.get("BENCH_LLM_CONNECTIONS", DEFAULT_CONNECTIONS))
        return LLMClient(
            os.environ[ENV_BASE_URL], model=MODEL, http_client=http_client(connections)
        )


class BenchQuotaChat(_Conversation, LLMAgent):
    agent_type = "bench_quota_chat"

    def build_model(self, client: Client) -> ChatModel:
        provider = Provider(
            "bench", model=MODEL, base_url=os.environ[ENV_BASE_URL],
            rpm=int(os.environ["BENCH_LLM_RPM"]), tpm=int(os.environ["BENCH_LLM_TPM"]),
            quota_period=float(os.environ["BENCH_LLM_QUOTA_PERIOD"]), quota_wait=QUOTA_WAIT_S,
        )  # fmt: skip
        return ProviderPool(client, [provider])


agents = [BenchChat, BenchQuotaChat]
