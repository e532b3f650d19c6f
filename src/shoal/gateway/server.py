"""Running a gateway process: the bind check, then uvicorn."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from shoal.apikeys import KeyStore
from shoal.client import Client
from shoal.errors import ConfigurationError
from shoal.gateway.app import create_app
from shoal.gateway.state import GatewayConfig
from shoal.settings import Settings

log = logging.getLogger("shoal.gateway")
SHUTDOWN_GRACE_S = 10  # seconds


async def check_bind(settings: Settings, config: GatewayConfig) -> None:
    """Refuse to serve a non-loopback address with no API key to check against: that
    would open the cluster to the network. ``--insecure`` overrides, loudly."""
    if not config.keys_required:
        if config.insecure:
            log.warning(
                "--insecure: serving %s without requiring API keys (when none exist); "
                "anyone who reaches this address can use the cluster", config.host,
            )  # fmt: skip
        return
    async with Client(settings=settings) as client:
        if not await KeyStore(client).any_keys():
            raise ConfigurationError(
                f"refusing to serve {config.host} without API keys: anyone on that network "
                "could use the cluster. Create a key first (shoal keys create --name NAME "
                "--scopes read,submit), bind 127.0.0.1, or pass --insecure on a trusted "
                "network"
            )


def run_gateway(settings: Settings, config: GatewayConfig) -> None:
    """Serve until SIGINT/SIGTERM: uvicorn finishes the requests in flight first, for
    up to SHUTDOWN_GRACE_S (then open streams and long-polls are cut).
    Logging is the caller's (``configure_logging``): uvicorn's own config is off, so
    its lines go through the same handler, as JSON or text."""
    asyncio.run(check_bind(settings, config))
    app = create_app(settings, config)
    uvicorn.run(
        app, host=config.host, port=config.port, log_config=None, access_log=False,
        proxy_headers=False, server_header=False,
        # Event streams and long-polls may last minutes: past this, they are cut and
        # their clients reconnect elsewhere (SSE resumes from Last-Event-ID).
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )  # fmt: skip
