"""Prometheus ``/metrics`` over HTTP for the services whose own port speaks
gRPC (control plane, workers); the router serves it on its HTTP port."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server


def serve_metrics(host: str, port: int, registry: CollectorRegistry = REGISTRY) -> int:
    """Serve ``registry`` (in a daemon thread, off the event loop) at
    ``host:port``; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_port
