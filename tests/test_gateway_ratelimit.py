"""A key's rate limit is one budget across every gateway: the bucket is in the engine."""

from __future__ import annotations

import asyncio

import httpx

from shoal import Client, Settings
from shoal.apikeys import CreatedKey, KeyStore
from tests.gateways import bearer, gateway_process


async def test_a_key_rate_is_one_budget_across_two_gateway_processes(
    settings: Settings, client: Client
) -> None:
    store = KeyStore(client)
    limited = await store.create("limited", ["read"], rate=2, burst=4)
    other = await store.create("other", ["read"], rate=2, burst=4)
    with gateway_process(settings) as (one, _), gateway_process(settings) as (two, _):
        async with httpx.AsyncClient(timeout=30) as http:

            async def get(url: str, key: CreatedKey) -> httpx.Response:
                return await http.get(f"{url}/v1/agent-types", headers=bearer(key.secret))

            # Eight at once, alternating gateways: the burst of 4 lets exactly 4 through.
            burst = await asyncio.gather(*(get((one, two)[i % 2], limited) for i in range(8)))
            assert sorted(r.status_code for r in burst) == [200] * 4 + [429] * 4

            for url in (one, two):  # then both refuse it ...
                refused = await get(url, limited)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["type"] == "RateLimited"
                assert "'limited'" in refused.json()["error"]["message"]
                retry_after = int(refused.headers["retry-after"])
                assert 1 <= retry_after <= 2  # a token comes back every 0.5 s
            for url in (one, two):  # ... and another key is unaffected
                assert (await get(url, other)).status_code == 200

            # Wait as long as the gateway said to: time passing is the refill under test.
            await asyncio.sleep(retry_after)
            again = [await get(one, limited), await get(two, limited), await get(one, limited)]
            assert [r.status_code for r in again] == [200, 200, 429], "2 tokens a second"
