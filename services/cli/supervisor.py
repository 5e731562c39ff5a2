"""Starts the services as separate processes, waits until they are SERVING, stops them.

`mirador up` and the tests start the mesh through this one module, so the tests
exercise exactly what a user runs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import SERVICE_NAMES, MiradorConfig, ServiceSettings

# Start order: what others call first. (They start in parallel; this is the log order.)
START_ORDER = ("model_host", "quantizer", "consensus", "router")


class MeshStartError(RuntimeError):
    pass


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> str:
    """The service's health as a word: SERVING, NOT_SERVING, ... or UNREACHABLE."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return "UNREACHABLE" if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@dataclass
class ServiceProcess:
    name: str
    settings: ServiceSettings
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Mesh:
    """The services of one config, each in its own process."""

    config: MiradorConfig
    log_dir: Path
    services: tuple[str, ...] = SERVICE_NAMES
    processes: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, timeout_s: float = 20.0) -> None:
        """Starts every service and returns once all are SERVING; stops them all on failure."""
        busy = [
            f"services.{name}.port {s.port} ({s.address})"
            for name, s in self._settings()
            if not port_is_free(s.host, s.port)
        ]
        if busy:
            raise MeshStartError(
                "already in use: " + "; ".join(busy) + ". Stop whatever listens there (another `mirador up`?) "
                "or choose other ports in the config."
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for name, settings in self._settings():
                self.processes[name] = self._spawn(name, settings)
            self._wait_serving(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _settings(self) -> list[tuple[str, ServiceSettings]]:
        return [(n, getattr(self.config.services, n)) for n in START_ORDER if n in self.services]

    def _spawn(self, name: str, settings: ServiceSettings) -> ServiceProcess:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}", "--config", str(self.config.path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return ServiceProcess(name, settings, process, log_path)

    def _wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = dict(self.processes)
        while waiting:
            for name, service in list(waiting.items()):
                if service.process.poll() is not None:
                    raise MeshStartError(
                        f"{name} exited with code {service.process.returncode} while starting; "
                        f"its log ({service.log_path}) ends with:\n{service.log_tail()}"
                    )
                if health_status(service.settings.address, timeout_s=0.5) == "SERVING":
                    del waiting[name]
            if waiting and time.monotonic() > deadline:
                raise MeshStartError(
                    f"not SERVING after {timeout_s:g} s: {', '.join(waiting)}; see the logs in {self.log_dir}"
                )
            if waiting:
                time.sleep(0.1)

    def stop(self, grace_s: float | None = None) -> dict[str, int | None]:
        """SIGTERM to every process by PID, then SIGKILL after its grace period. Returns exit codes."""
        for service in self.processes.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, service in self.processes.items():
            wait_s = (grace_s if grace_s is not None else service.settings.shutdown_grace_s) + 5.0
            try:
                codes[name] = service.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                service.process.kill()
                codes[name] = service.process.wait()
        self.processes.clear()
        return codes

    def __enter__(self) -> "Mesh":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
