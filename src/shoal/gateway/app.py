"""The gateway's FastAPI application: routes, error answers, middleware, the
OpenAPI document and the dashboard's static files."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi.telemetry import TelemetryConfig
from starlette.exceptions import HTTPException as StarletteHTTPException

import shoal
from shoal.apikeys import KeyStore
from shoal.client import Client
from shoal.coordination.ratelimit import TokenBucket
from shoal.errors import ShoalError
from shoal.gateway import problems
from shoal.gateway.middleware import BodyLimit, Observed
from shoal.gateway.routes import admin, agents, cluster, services, tasks
from shoal.gateway.routes import config as config_routes
from shoal.gateway.routes import sagas as saga_routes
from shoal.gateway.schemas import openapi_components
from shoal.gateway.state import GatewayConfig, GatewayState
from shoal.gateway.telemetry import GatewayMetrics
from shoal.observability import tracing
from shoal.settings import Settings

DASHBOARD = Path(__file__).parent / "dashboard"


def create_app(settings: Settings, config: GatewayConfig | None = None) -> FastAPI:
    """A gateway app; it connects its Client when it starts serving."""
    config = config or GatewayConfig()
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tracing.configure("shoal-gateway")  # before the Client, which would say "client"
        async with Client(settings=settings) as client:
            app.state.gateway = GatewayState(
                config, client, KeyStore(client), TokenBucket(client, "apikey"), metrics
            )
            yield

    app = FastAPI(
        title="Shoal gateway",
        version=shoal.__version__,
        description="HTTP API of a Shoal cluster: tasks, agents, cluster state, services.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        # FastAPI's own OpenTelemetry middleware would make a second server span per
        # request; ours (middleware.Observed) names it by route and hands its context
        # to the tasks a request submits.
        telemetry=TelemetryConfig(tracing=False, metrics=False, logs=False),
    )
    for router in (tasks.router, agents.router, cluster.router, services.router, admin.router):
        app.include_router(router)
    app.include_router(config_routes.router)
    app.include_router(saga_routes.router)
    _install_errors(app)
    app.add_middleware(Observed, metrics=metrics)
    app.add_middleware(BodyLimit, max_body=config.max_body)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if config.dashboard and DASHBOARD.is_dir():
        app.mount("/", StaticFiles(directory=DASHBOARD, html=True), name="dashboard")
    return app


def _install_errors(app: FastAPI) -> None:
    app.add_exception_handler(ShoalError, problems.shoal_error)
    app.add_exception_handler(problems.ApiError, problems.api_error)
    app.add_exception_handler(RequestValidationError, problems.validation_error)
    app.add_exception_handler(StarletteHTTPException, problems.http_error)
    app.add_exception_handler(Exception, problems.unexpected_error)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the msgspec schemas the responses refer to."""
    if app.openapi_schema is None:
        document = get_openapi(
            title=app.title, version=app.version, description=app.description,
            routes=app.routes,
        )  # fmt: skip
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, schema in openapi_components().items():
            schemas.setdefault(name, schema)
        app.openapi_schema = document
    return app.openapi_schema
