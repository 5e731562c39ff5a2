"""Server bootstrap shared by every service.

A service is a `MiradorService`: it names its gRPC services, adds its servicers
to a server and has `on_start`/`on_stop` lifecycle hooks. `serve()` does the
rest the same way for all of them: health and reflection, error mapping, a
concurrency cap, binding without SO_REUSEPORT (so a busy port is an error, not
a silent second server), SIGTERM/SIGINT handling with a grace period, and
observability: a trace span per call when tracing is on (services/common/telemetry.py)
and Prometheus metrics on `metrics_port` when it is set (services/common/metrics.py).
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common import telemetry
from services.common.config import ConfigError, MiradorConfig, SecurityConfig, load_config
from services.common.settings import ServiceSettings
from services.common.errors import InvalidArgument, ServiceError
from services.common.faults import InjectedFault, injected_internal_errors
from services.common.interceptors import HandlerInterceptor
from services.common.logs import configure_logging, log_event
from services.common.reload import ConfigReloader
from services.common.metrics import RpcMetricsInterceptor, start_metrics_http, stop_metrics_http
from services.common.security import server_credentials, server_interceptors

log = logging.getLogger("mirador.server")

EXIT_CONFIG_ERROR = 2
EXIT_PORT_IN_USE = 3


class PortInUseError(RuntimeError):
    pass


class MiradorService(abc.ABC):
    """One Mirador service process: its servicers and lifecycle hooks."""

    #: short name, as in the config's `services:` section
    name: str

    @property
    @abc.abstractmethod
    def grpc_service_names(self) -> list[str]:
        """Full names of the gRPC services this process serves, e.g. mirador.v1.Router."""

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the servicers."""

    async def on_start(self) -> None:
        """Called before the server accepts calls (open channels, load pinned models)."""

    async def on_stop(self) -> None:
        """Called after in-flight calls finished or the grace period ended."""

    async def on_config_reload(self, new_config: MiradorConfig) -> None:
        """Called on SIGHUP with the config file read again and validated (an invalid file never
        gets here: it is logged and the old config keeps serving). A service applies what it can
        change while running and logs what needs a restart. Default: nothing is reloadable here."""
        log_event(log, "config reloaded: restart needed for this service to apply changes", logging.WARNING,
                  service=self.name)


class ErrorMappingInterceptor(HandlerInterceptor):
    """Turns exceptions into statuses: ServiceError → its code, a downstream
    AioRpcError → the same code naming the hop, anything else → INTERNAL (logged)."""

    def __init__(self, service: str):
        self.service = service
        self.injected = injected_internal_errors(service)  # fault injection for tests; empty otherwise

    def wrap_deserializer(self, deserializer):
        """Lets undecodable bytes reach the handler wrapper, which answers INVALID_ARGUMENT
        (grpcio itself would answer UNKNOWN, which tells a client nothing)."""
        if deserializer is None:
            return None

        def deserialize(data: bytes):
            try:
                return deserializer(data)
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
                return _UndecodableRequest(str(exc) or type(exc).__name__)

        return deserialize

    def wrap_unary(self, behaviour, method):
        async def unary(request, context):
            try:
                _reject_undecodable(request, method)
                self._inject(method)
                return await behaviour(request, context)
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await self._abort(context, exc, method)

        return unary

    def wrap_stream(self, behaviour, method):
        async def stream(request, context):
            try:
                _reject_undecodable(request, method)
                self._inject(method)
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    async for response in responses:
                        yield response
            except Exception as exc:  # noqa: BLE001 - every error becomes a status
                await self._abort(context, exc, method)

        return stream

    def _inject(self, method: str) -> None:
        if method in self.injected:
            raise InjectedFault(f"injected fault in {method}: secret=/etc/mirador/hunter2 at 0x7f00dead")

    async def _abort(self, context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        if isinstance(exc, ServiceError):
            await context.abort(exc.code, _bounded(exc.message))
        if isinstance(exc, grpc.aio.AioRpcError):
            await context.abort(exc.code(), _bounded(f"{exc.details()}"))
        # The caller gets a sentence and an id, never the exception (it may quote internals); the
        # log line with the same id has the exception and its traceback.
        error_id = uuid.uuid4().hex[:16]
        log.error("unhandled error", exc_info=exc,
                  extra={"fields": {"method": method, "error_id": error_id, "error": repr(exc)[:500]}})
        await context.abort(grpc.StatusCode.INTERNAL,
                            f"the {self.service} failed on {method} because of a fault of its own, not of this request "
                            f"(error id {error_id}); retry, and if it happens again report the id: the {self.service}'s "
                            "log has the details under it")


# A status message travels percent-encoded in a header; past the client's metadata limit (16 KiB)
# the client gets RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead of our status.
# Messages that quote a huge field are cut well below it.
MAX_STATUS_MESSAGE_BYTES = 2048


def _bounded(message: str) -> str:
    data = message.encode("utf-8")
    if len(data) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    return data[:MAX_STATUS_MESSAGE_BYTES].decode("utf-8", errors="ignore") + " … (message cut at 2 KB)"


class _UndecodableRequest:
    def __init__(self, reason: str):
        self.reason = reason


def _reject_undecodable(request, method: str) -> None:
    if isinstance(request, _UndecodableRequest):
        raise InvalidArgument(
            f"the request bytes are not a valid message for {method} ({request.reason}); "
            "generate your client from Mirador's protos/"
        )


MAX_MESSAGE_BYTES = 16 * 1024 * 1024
LAME_DUCK_S = 0.5


def server_options() -> list[tuple[str, int]]:
    # grpcio enables SO_REUSEPORT by default: a second server on a busy port would
    # bind silently and steal half the calls. Off, a busy port fails to bind.
    # Messages up to 16 MiB are received so that an oversized field gets our own
    # INVALID_ARGUMENT naming the field and its limit, not grpcio's generic refusal.
    # Clients ping every few seconds to notice a hung peer (services/common/channels.py); without these,
    # grpcio would count the pings as abuse and close the connection with its calls.
    return [("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0)]


async def serve(service: MiradorService, settings: ServiceSettings, stop_event: asyncio.Event | None = None,
                security: SecurityConfig | None = None, config_path: str | os.PathLike | None = None) -> None:
    """Runs `service` until SIGTERM/SIGINT (or `stop_event`), then stops gracefully.
    With `security.tls` it serves TLS only; with a bearer token the router checks it first.
    With `config_path`, SIGHUP reads that file again and hands it to `service.on_config_reload`."""
    security = security or SecurityConfig()
    server = grpc.aio.server(
        interceptors=[
            *telemetry.server_interceptors(),  # span and trace id first: they cover refused calls too
            *([RpcMetricsInterceptor(service.name)] if settings.metrics_port else []),
            *server_interceptors(security, service.name),
            ErrorMappingInterceptor(service.name),
        ],
        options=server_options(),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    service.add_to_server(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*service.grpc_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        if security.tls is not None:
            port = server.add_secure_port(settings.address, server_credentials(security.tls))
        else:
            port = server.add_insecure_port(settings.address)
    except RuntimeError as exc:
        raise PortInUseError(
            f"{service.name} cannot listen on {settings.address}: the port is in use or the address is not local. "
            f"Stop the other process or change services.{service.name}.port in the config."
        ) from exc
    metrics_http = _start_metrics_http(service.name, settings)

    await service.on_start()
    await server.start()
    for name in ("", *service.grpc_service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log_event(log, "listening", address=settings.address, port=port, services=service.grpc_service_names,
              tls=security.tls is not None)

    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    reloads: set[asyncio.Task] = set()
    if config_path is not None:
        reloader = ConfigReloader(service, settings, security, config_path)

        def on_sighup() -> None:
            task = loop.create_task(reloader.reload(), name="config reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    await stop_event.wait()
    if config_path is not None:
        loop.remove_signal_handler(signal.SIGHUP)

    log_event(log, "stopping", grace_s=settings.shutdown_grace_s)
    await health.enter_graceful_shutdown()
    # Lame duck: still answer while balancers and health-checking clients see NOT_SERVING
    # and move their new calls elsewhere; only then refuse new calls and drain the rest.
    await asyncio.sleep(min(LAME_DUCK_S, settings.shutdown_grace_s))
    await server.stop(settings.shutdown_grace_s)
    await service.on_stop()
    stop_metrics_http(metrics_http)
    log_event(log, "stopped")


def _start_metrics_http(name: str, settings: ServiceSettings):
    if not settings.metrics_port:
        return None
    try:
        http = start_metrics_http(settings.host, settings.metrics_port)
    except OSError as exc:
        raise PortInUseError(
            f"{name} cannot serve /metrics on {settings.host}:{settings.metrics_port} ({exc.strerror}). "
            f"Stop the other process or change services.{name}.metrics_port in the config (0 = no metrics)."
        ) from exc
    log_event(log, "serving metrics", url=f"http://{settings.host}:{settings.metrics_port}/metrics")
    return http


def run_service_main(name: str, build: "callable[[MiradorConfig], MiradorService]", argv: list[str] | None = None) -> int:
    """The `python -m services.<name>` entry point: config → service → serve."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", description=f"Run Mirador's {name} service.")
    parser.add_argument("--config", help="config file (default: $MIRADOR_CONFIG or config/mirador.yaml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging(name, args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log_event(log, "invalid config", logging.ERROR, problems=[str(p) for p in exc.problems])
        print(f"mirador {name}: invalid config:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    settings = getattr(config.services, name)
    try:
        service = build(config)  # a service may refuse settings this machine cannot honour
    except ConfigError as exc:
        log_event(log, "invalid config for this machine", logging.ERROR, problems=[str(p) for p in exc.problems])
        print(f"mirador {name}: invalid config:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    telemetry.setup(name)  # before any server or channel exists
    try:
        asyncio.run(serve(service, settings, security=config.security, config_path=config.path))
    except PortInUseError as exc:
        log_event(log, "port in use", logging.ERROR, address=settings.address)
        print(f"mirador {name}: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    finally:
        telemetry.shutdown()  # sends the spans still buffered
    return 0
