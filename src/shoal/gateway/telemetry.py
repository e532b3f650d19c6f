"""The gateway's own metrics: requests by route and status, their latency,
rate-limit rejections and submitted tasks; and its ``/metrics`` body, which adds
the cluster-wide gauges read from the engine (see shoal.observability.metrics)."""

from __future__ import annotations

from typing import Any

from shoal.observability import metrics


class GatewayMetrics:
    """Thin facade, so routes and middleware do not know metric names."""

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        metrics.observe_http(route, method, status, seconds)

    def rate_limited(self, key: str) -> None:
        metrics.rate_limited(key)

    def submitted(self, capability: str, count: int = 1) -> None:
        metrics.tasks_submitted(capability, count)

    async def exposition(self, client: Any, waiting: int) -> tuple[bytes, str]:
        """This process's metrics and the cluster's, read from the engine now;
        ``waiting``: the requests held while they wait."""
        await metrics.refresh_cluster_gauges(client)
        metrics.GATEWAY_WAITING.set(waiting)
        return metrics.render()
