"""Tracing for every Mirador process, configured by the standard `OTEL_*` variables.

Tracing is on when an exporter is configured, and off otherwise:

* `OTEL_TRACES_EXPORTER=otlp` (or `console`; `none` turns it off), or just
  `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` set: spans go out
  over OTLP/gRPC (the exporter reads its usual variables: endpoint, headers, insecure,
  timeout, certificate). `OTEL_BSP_*` tune the batching, `OTEL_TRACES_SAMPLER*` sampling,
  `OTEL_PROPAGATORS` the propagation format (W3C trace context by default).
* `OTEL_SDK_DISABLED=true` turns everything off.
* `service.name` is `mirador-<service>` unless `OTEL_SERVICE_NAME` (or `service.name` in
  `OTEL_RESOURCE_ATTRIBUTES`) says otherwise. `mirador up` passes its environment to every
  service, so leave OTEL_SERVICE_NAME unset there or every service reports the same name.

Off, nothing of the SDK is imported and `tracer(name)` returns OpenTelemetry's no-op
tracer: a span costs a function call.

On, `setup()` instruments the gRPC aio clients of the process (W3C trace context goes out
with every call) and `server_interceptors()` gives `serve()` the server side: a span per
call, continuing the caller's trace, and the trace id sent back in the trailing metadata
key `mirador-trace-id`. Health checks and reflection are not traced.

Code adds its own spans with `tracer(__name__).start_as_current_span("route")`, or with
`record_span()` for work already timed with `time.perf_counter()`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Mapping

import grpc
from opentelemetry import propagate, trace

from services.common.interceptors import HandlerInterceptor
from services.common.logs import log_event

log = logging.getLogger("mirador.telemetry")

TRACE_ID_METADATA_KEY = "mirador-trace-id"
EXPORTERS = ("otlp", "console")
# Infrastructure RPCs that would only add noise to traces (and to metrics, see metrics.py).
UNTRACED_SERVICE_PREFIXES = ("grpc.health.", "grpc.reflection.")

_provider = None  # the SDK TracerProvider once setup() turned tracing on


def requested_exporters(env: Mapping[str, str] = os.environ) -> list[str]:
    """The trace exporters the environment asks for; empty = tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def enabled() -> bool:
    return _provider is not None


def setup(service: str, *, instrument_grpc_clients: bool = True, env: Mapping[str, str] = os.environ) -> bool:
    """Turns tracing on for this process when the environment configures an exporter.
    Call it once, before creating servers or channels. Returns whether tracing is on."""
    global _provider
    if _provider is not None:
        return True
    names = requested_exporters(env)
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        log_event(log, "unsupported trace exporter ignored", logging.WARNING, exporters=unknown, supported=list(EXPORTERS))
    names = [n for n in names if n in EXPORTERS]
    if not names:
        return False

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {"service.namespace": "mirador", "mirador.service": service}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = f"mirador-{service}"
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol != "grpc":
                log_event(log, "OTLP protocol not supported; exporting over OTLP/gRPC", logging.WARNING, protocol=protocol)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider

    if instrument_grpc_clients:
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient

        GrpcAioInstrumentorClient(filter_=_traced_filter()).instrument()
    log_event(log, "tracing on", exporters=names, service_name=provider.resource.attributes.get("service.name"))
    return True


def shutdown(timeout_ms: int = 5000) -> None:
    """Sends the spans still buffered and stops the exporters (end of the process)."""
    if _provider is not None:
        _provider.force_flush(timeout_ms)
        _provider.shutdown()


def force_flush(timeout_ms: int = 5000) -> bool:
    return _provider.force_flush(timeout_ms) if _provider is not None else True


def tracer(name: str) -> trace.Tracer:
    """A tracer for `name` (a module name); a no-op one while tracing is off."""
    return trace.get_tracer(name)


def trace_id_hex(span: trace.Span | None = None) -> str:
    """The trace id of `span` (default: the current one) as 32 hex digits, or "" if none."""
    context = (span or trace.get_current_span()).get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def inject_metadata(metadata: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """`metadata` plus the current trace context (traceparent ...), for a hand-made call."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*(metadata or []), *carrier.items()]


def record_span(tracer_: trace.Tracer, name: str, started: float, attributes: Mapping[str, object] | None = None,
                ended: float | None = None) -> None:
    """Records a finished span for work timed with time.perf_counter() from `started` to
    `ended` (default: now), as a child of the current span. Nothing at all while tracing is off."""
    if _provider is None:
        return
    now_perf, now_ns = time.perf_counter(), time.time_ns()
    end_ns = now_ns - int((now_perf - (ended if ended is not None else now_perf)) * 1e9)
    span = tracer_.start_span(name, start_time=now_ns - int((now_perf - started) * 1e9), attributes=attributes)
    span.end(end_time=end_ns)


# --------------------------------------------------------------------------- server side


def _traced_filter():
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_prefix(p) for p in UNTRACED_SERVICE_PREFIXES)))


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """What `serve()` puts first when tracing is on: a span per call (continuing the
    caller's trace) and the trace id in the trailing metadata. Empty while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_traced_filter()), TraceIdInterceptor()]


def _untraced(method: str) -> bool:
    return method.lstrip("/").startswith(UNTRACED_SERVICE_PREFIXES)


class TraceIdInterceptor(HandlerInterceptor):
    """Sends the call's trace id back in the trailing metadata (`mirador-trace-id`), so a
    client can look its request up in the tracing backend. Must run inside the span."""

    def applies_to(self, method: str) -> bool:
        return not _untraced(method)

    def wrap_unary(self, behaviour, method: str):
        async def unary(request, context):
            _stamp(context)
            return await behaviour(request, context)

        return unary

    def wrap_stream(self, behaviour, method: str):
        async def stream(request, context):
            _stamp(context)
            async with contextlib.aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response

        return stream


def _stamp(context) -> None:
    trace_id = trace_id_hex()
    if trace_id:
        # Set first: the status (OK or an abort) carries the trailing metadata set so far.
        context.set_trailing_metadata(((TRACE_ID_METADATA_KEY, trace_id),))
