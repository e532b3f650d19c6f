"""A process for tests/test_rate_limiter.py: ``python -m tests.ratelimit_procs <kind>
<start> <seconds>`` with SHOAL_REDIS_URL and SHOAL_NAMESPACE set. From the wall-clock
instant ``start`` for ``seconds``, it acquires from the shared limiter "shared" as
fast as the limiter lets it, then prints the grant times (a JSON list) and exits.

kind: ``bucket`` (100/s, burst 10) or ``window`` (50 per 0.5 s).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from shoal import Client, RateLimited

LIMITS = {
    "bucket": {"rate": 100.0, "burst": 10},
    "window": {"limit": 50, "window": 0.5},
}


async def main(kind: str, start: float, seconds: float) -> None:
    async with Client() as client:
        limiter = client.rate_limiter("shared", **LIMITS[kind])  # type: ignore[arg-type]
        await client.redis.ping()  # connected before the start
        await asyncio.sleep(max(0.0, start - time.time()))  # the common starting instant
        end = start + seconds
        grants: list[float] = []
        while True:
            left = end - time.time()
            if left <= 0:
                break
            try:
                await limiter.acquire(timeout=left)
            except RateLimited:
                break
            granted = time.time()
            if granted < end:
                grants.append(granted)
        print(json.dumps(grants), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
