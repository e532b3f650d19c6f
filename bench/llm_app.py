"""The LLM agent bench.llm runs on ``shoal node`` processes: one conversation per
addressed agent (``bench_chat/<id>``), answering through the test model server.

The model route is built here rather than taken from the environment so that its
HTTP connection pool is as large as the direct baseline's (``BENCH_LLM_CONNECTIONS``,
default 1000; httpx's default is 100, which would queue most of 1,000 concurrent
streams inside a node and be measured as Shoal's overhead). The endpoint is
``SHOAL_LLM_BASE_URL``.

With ``BENCH_LLM_RPM`` / ``BENCH_LLM_TPM`` set, the route is a ``ProviderPool``
with one provider under those cluster-wide quotas (the quota phase).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import httpx

from shoal.llm import LLMAgent, LLMClient
from shoal.llm.client import ENV_BASE_URL

if TYPE_CHECKING:
    from shoal.client import Client
    from shoal.llm.model import ChatModel

MODEL = "bench"
DEFAULT_CONNECTIONS = 1000


def http_client(connections: int) -> httpx.AsyncClient:
    """An HTTP pool for ``connections`` concurrent streams (the same for the
    direct baseline and the agents, so both are measured with the same pool)."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(connect=30.0, read=120.0, write=120.0, pool=120.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


class BenchChat(LLMAgent):
    """A plain conversation: no tools, the test server echoes ("You said: ...")."""

    agent_type = "bench_chat"
    system_prompt = "You are a benchmark."
    model_name = MODEL
    temperature = 0

    def build_model(self, client: Client) -> ChatModel:
        connections = int(os.environ.get("BENCH_LLM_CONNECTIONS", DEFAULT_CONNECTIONS))
        rpm = os.environ.get("BENCH_LLM_RPM")
        tpm = os.environ.get("BENCH_LLM_TPM")
        if rpm or tpm:
            return _quota_pool(client, rpm, tpm, connections)
        return LLMClient(
            os.environ[ENV_BASE_URL], model=MODEL, http_client=http_client(connections)
        )


def _quota_pool(
    client: Client, rpm: str | None, tpm: str | None, connections: int
) -> ChatModel:  # pragma: no cover - needs shoal.llm.providers (another branch)
    raise NotImplementedError("the quota phase needs shoal.llm.providers.ProviderPool")


agents = [BenchChat]
