"""Runs the gateway process: config → Starlette app → uvicorn, on the port of services.gateway.

Binds its socket itself (without SO_REUSEPORT, like the gRPC services) so a busy port is a
clear error and exit code 3; SIGTERM/SIGINT stop it gracefully (uvicorn waits up to
shutdown_grace_s for streams in flight); SIGHUP re-reads the config's routes and fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys

import uvicorn

from services.common import telemetry
from services.common.config import ConfigError, MiradorConfig, load_config
from services.common.metrics import start_metrics_http, stop_metrics_http
from services.common.logs import configure_logging, log_event
from services.common.server import EXIT_CONFIG_ERROR, EXIT_PORT_IN_USE
from services.gateway.app import build_app

log = logging.getLogger("mirador.gateway")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (0 would leave
    # Nagle on, and every response would wait ~40 ms for the client's delayed ACK; bench/gateway.py found it)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown (so the process dies of it); Mirador's
    services exit 0 when asked to stop, which the supervisor reports and the tests check."""

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def uvicorn_config(config: MiradorConfig, app) -> uvicorn.Config:
    settings = config.services.gateway
    tls = config.security.tls
    extra = {}
    if tls is not None:  # the same certificate as the gRPC services: HTTPS, client certificates when required
        extra = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key),
                 "ssl_ca_certs": str(tls.ca) if tls.ca else None,
                 "ssl_cert_reqs": ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE}
    return uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", server_header=False,
                          timeout_graceful_shutdown=int(max(1, settings.shutdown_grace_s)), **extra)


async def serve(config: MiradorConfig, sock: socket.socket) -> None:
    settings = config.services.gateway
    app = build_app(config)
    server = _Server(uvicorn_config(config, app))

    def reload() -> None:
        try:
            app.state.gateway.config = load_config(config.path)
        except ConfigError as exc:
            log_event(log, "config reload refused: the file is invalid, the old config keeps serving", logging.ERROR,
                      problems=[str(p) for p in exc.problems])
            return
        log_event(log, "config reloaded", routes=list(app.state.gateway.config.routes))

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
    scheme = "https" if config.security.tls is not None else "http"
    log_event(log, "listening", url=f"{scheme}://{settings.address}/v1", router=config.services.router.client_target)
    await server.serve(sockets=[sock])
    log_event(log, "stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway",
                                     description="Run Mirador's OpenAI-compatible HTTP gateway.")
    parser.add_argument("--config", help="config file (default: $MIRADOR_CONFIG or config/mirador.yaml)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    configure_logging("gateway", args.log_level)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mirador gateway: invalid config:\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    settings = config.services.gateway
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log_event(log, "port in use", logging.ERROR, address=settings.address)
        print(f"mirador gateway: cannot listen on {settings.address} ({exc.strerror}). Stop the other process or "
              "change services.gateway.port in the config.", file=sys.stderr)
        return EXIT_PORT_IN_USE
    metrics_http = None
    if settings.metrics_port:
        try:
            metrics_http = start_metrics_http(settings.host, settings.metrics_port)
        except OSError as exc:
            sock.close()
            print(f"mirador gateway: cannot serve /metrics on {settings.host}:{settings.metrics_port} ({exc.strerror}). "
                  "Stop the other process or change services.gateway.metrics_port in the config (0 = no metrics).",
                  file=sys.stderr)
            return EXIT_PORT_IN_USE
    telemetry.setup("gateway")  # before any channel exists: router calls carry the W3C trace context
    try:
        asyncio.run(serve(config, sock))
    finally:
        stop_metrics_http(metrics_http)
        telemetry.shutdown()
    return 0
