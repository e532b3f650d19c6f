"""What a running Shoal shows about itself: metrics, traces and structured logs.

- ``metrics``  Prometheus metrics of nodes and gateways, the cluster-wide gauges a
  gateway reads from the engine, and the node's ``/metrics`` server.
- ``tracing``  OpenTelemetry spans made of the W3C ``traceparent`` every task and
  message carries; off (and free) unless the standard OTEL_* variables, or the
  application's own SDK provider, turn it on.
- ``logs``     ``configure_logging``: JSON lines (or text on a terminal) carrying the
  task, agent, node and trace ids of the work that logged.
- ``hooks``    what a node does around each attempt and turn, in one place.

Nothing is imported here: ``prometheus_client`` and OpenTelemetry load only where
they are used, so a plain ``Client`` stays light.
"""
