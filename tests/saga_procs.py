"""A saga runner on its own, for tests/test_sagas.py: ``python -m tests.saga_procs
<name>`` with SHOAL_REDIS_URL and SHOAL_NAMESPACE set runs a SagaRunner (no task
slots, no node) until SIGTERM. It prints "ready" once running, and the runner's
log lines (shoal.saga, INFO) go to stdout, flushed, so a test can see it stop
driving a saga it lost.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from shoal import Client
from shoal.coordination.saga_runner import SagaRunner


async def main(name: str) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    async with Client() as client:
        runner = SagaRunner(client, name)
        task = asyncio.create_task(runner.run(stopping))
        print("ready", flush=True)
        await task


if __name__ == "__main__":
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("shoal.saga").addHandler(handler)
    logging.getLogger("shoal.saga").setLevel(logging.INFO)
    asyncio.run(main(sys.argv[1]))
