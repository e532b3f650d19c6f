"""The image's HEALTHCHECK: healthy when this container's gateway or node says so.

One image serves both roles, so the probe asks both places a Shoal process of this
container can answer, on 127.0.0.1:

* the gateway's ``/healthz`` on ``SHOAL_GATEWAY_PORT`` (``shoal gateway --port``);
* the node's ``/healthz`` on ``SHOAL_NODE_METRICS_PORT`` (``shoal node --metrics-port``),
  which answers 200 while the node's event loop turns and 503 when it is blocked.

The ports are the environment variables the ``shoal`` command itself reads, so a port
changed through the environment is followed here too (a port given as a flag is not:
in containers, set ports by environment). Exit 0 when one answers 200, else 1.
Standard library only: it runs every few seconds and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.request

HEALTH_PATH = "/healthz"
PORT_VARIABLES = ("SHOAL_GATEWAY_PORT", "SHOAL_NODE_METRICS_PORT")
TIMEOUT_S = 3.0


def healthy(port: str) -> bool:
    url = f"http://127.0.0.1:{port}{HEALTH_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return bool(response.status == 200)
    except OSError:  # refused (the other role's port), 503 (HTTPError), timeout
        return False


def main() -> int:
    ports = [os.environ[name] for name in PORT_VARIABLES if os.environ.get(name)]
    return 0 if any(healthy(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
