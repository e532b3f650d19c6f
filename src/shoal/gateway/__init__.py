"""The HTTP gateway: Shoal's API for any language, its metrics and its dashboard.

Stateless — the engine holds everything — so any number of gateways can serve one
cluster behind a load balancer. ``shoal gateway`` runs one; ``create_app`` builds
the ASGI app to mount or test.
"""

from shoal.gateway.app import create_app
from shoal.gateway.state import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
