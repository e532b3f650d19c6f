"""The gateway's own metrics: requests by route and status, their latency,
rate-limit rejections and submitted tasks (see shoal.observability.metrics)."""

from __future__ import annotations


class GatewayMetrics:
    """Thin facade so routes and middleware do not know metric names."""

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        pass

    def rate_limited(self, key: str) -> None:
        pass

    def submitted(self, capability: str, count: int = 1) -> None:
        pass
