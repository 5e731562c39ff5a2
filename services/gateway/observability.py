"""Prometheus metrics of the gateway (served on services.gateway.metrics_port, like every service's):
requests and their duration by endpoint and HTTP status, a stream counted until its last byte."""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/healthz", "/review")
REQUESTS = Counter("mirador_gateway_requests", "HTTP requests answered by the gateway, by endpoint and status",
                   ["endpoint", "status"])
DURATION = Histogram("mirador_gateway_request_duration_seconds",
                     "From a request's arrival to its response's last byte (a stream's whole length), seconds",
                     ["endpoint", "status"], buckets=LATENCY_BUCKETS)


def endpoint_of(path: str) -> str:
    """A bounded label: the endpoint the path belongs to, or `other`."""
    if path.startswith("/v1/models"):
        return "/v1/models"
    if path.startswith("/review/"):
        return "/review"
    return path if path in ENDPOINTS else "other"


class MetricsMiddleware:
    """Pure ASGI, so a streamed response is timed to its end without buffering it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            labels = (endpoint_of(scope.get("path", "")), str(status["code"]))
            REQUESTS.labels(*labels).inc()
            DURATION.labels(*labels).observe(time.perf_counter() - started)
