"""Prometheus metrics for every Mirador process.

Each service serves `/metrics` over HTTP on `services.<name>.metrics_port` (0 = off),
on the same host as its gRPC port. `serve()` adds `RpcMetricsInterceptor`, which counts
and times every call by service, method and status code; services add their own
metrics (all named `mirador_...`) next to the code that updates them:
services/model_host/observability.py and services/router/servicer.py.

Health checks and reflection are not counted (see telemetry.UNTRACED_SERVICE_PREFIXES).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from services.common.interceptors import HandlerInterceptor
from services.common.telemetry import UNTRACED_SERVICE_PREFIXES

# Latency buckets from a loopback round trip (~0.5 ms) to a long generation (minutes).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

RPC_REQUESTS = Counter(
    "mirador_rpc_requests", "gRPC calls handled, by Mirador service, method and status code",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "mirador_rpc_duration_seconds", "Time from a call's arrival to its status (a stream's whole length), seconds",
    ["service", "method", "code"], buckets=LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("mirador_rpc_in_flight", "gRPC calls being handled now", ["service", "method"])


def start_metrics_http(host: str, port: int) -> WSGIServer:
    """Serves /metrics on host:port in a daemon thread; raises OSError when the port is taken."""
    server, _thread = start_http_server(port, addr=host)
    return server


def stop_metrics_http(server: WSGIServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def _code_name(context, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio may report the numeric code
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), default.name)
    return default.name


class RpcMetricsInterceptor(HandlerInterceptor):
    """mirador_rpc_requests_total, mirador_rpc_duration_seconds and mirador_rpc_in_flight
    for every call; put it outside the interceptor that turns exceptions into statuses."""

    def __init__(self, service: str):
        self.service = service

    def applies_to(self, method: str) -> bool:
        return not method.lstrip("/").startswith(UNTRACED_SERVICE_PREFIXES)

    @contextlib.contextmanager
    def _recorded(self, method: str, context):
        """Counts one call: in flight while inside; its status code and duration when it leaves."""
        RPC_IN_FLIGHT.labels(self.service, method).inc()
        started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN.name
        try:
            yield
            code = _code_name(context, grpc.StatusCode.OK)
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away (a stream is closed)
            code = grpc.StatusCode.CANCELLED.name
            raise
        except BaseException:
            code = _code_name(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            RPC_IN_FLIGHT.labels(self.service, method).dec()
            RPC_REQUESTS.labels(self.service, method, code).inc()
            RPC_DURATION.labels(self.service, method, code).observe(time.perf_counter() - started)

    def wrap_unary(self, behaviour, method: str):
        method = method.lstrip("/")

        async def unary(request, context):
            with self._recorded(method, context):
                return await behaviour(request, context)

        return unary

    def wrap_stream(self, behaviour, method: str):
        method = method.lstrip("/")

        async def stream(request, context):
            with self._recorded(method, context):
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response

        return stream
