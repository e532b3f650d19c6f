"""A process for tests/test_llm_response_cache.py: ``python -m tests.llm_cache_procs
<model_url> <n> <message>`` with SHOAL_REDIS_URL and SHOAL_NAMESPACE set.

It opens the response cache "answers" in front of a model client, says "ready",
waits for "go" on stdin, then makes ``n`` concurrent temperature-0 ``complete()``
calls of ``message`` and prints the JSON list of ``[content, cached]`` pairs.
"""

from __future__ import annotations

import asyncio
import json
import sys

from shoal import Client
from shoal.llm import LLMClient
from shoal.llm.response_cache import CachedModel

MODEL = "test-model"
CACHE = "answers"


async def main(url: str, n: int, message: str) -> None:
    async with Client() as client, LLMClient(url, model=MODEL) as llm:
        model = CachedModel(llm, client.cache(CACHE, ttl=60), agent_type="proc")
        print("ready", flush=True)
        assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "go"
        messages = [{"role": "user", "content": message}]
        answers = await asyncio.gather(*(model.complete(messages, temperature=0) for _ in range(n)))
        print(json.dumps([[a.content, a.cached] for a in answers]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
