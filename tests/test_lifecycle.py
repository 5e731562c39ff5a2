"""Process lifecycle with real processes: capacity, deadlines, graceful SIGTERM,
port clashes, and `mirador up` itself."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import quantizer_pb2, quantizer_pb2_grpc, router_pb2, router_pb2_grpc

from conftest import FLEET_AND_ROUTES, write_config
from services.cli.supervisor import Mesh, MeshStartError, health_status, http_health_status
from services.common.config import load_config


def start_mesh(tmp_path, services, **kwargs) -> Mesh:
    mesh = Mesh(load_config(write_config(tmp_path, **kwargs)), log_dir=tmp_path / "logs", services=services)
    mesh.start()
    return mesh


def test_calls_beyond_max_concurrent_rpcs_get_resource_exhausted(tmp_path):
    mesh = start_mesh(tmp_path, ("quantizer",), service_extra={"quantizer": "max_concurrent_rpcs: 1"})
    try:
        with grpc.insecure_channel(mesh.config.services.quantizer.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # holds the only slot
            quantizer = quantizer_pb2_grpc.QuantizerStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                list(quantizer.Quantize(quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=10), timeout=5))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watch.cancel()
    finally:
        mesh.stop()


ROUTE_WITH_SHORT_TIMEOUT = FLEET_AND_ROUTES + "  quick: {primary: tiny-lm, timeout_ms: 300}\n"


@pytest.fixture
def router_and_paused_host(tmp_path):
    """Router + model host, with the model host paused (SIGSTOP) so calls to it hang."""
    mesh = Mesh(load_config(write_config(tmp_path, body=ROUTE_WITH_SHORT_TIMEOUT)), log_dir=tmp_path / "logs",
                services=("router", "model_host"))
    mesh.start()
    host = mesh.processes["model_host"].process
    os.kill(host.pid, signal.SIGSTOP)
    try:
        yield mesh
    finally:
        os.kill(host.pid, signal.SIGCONT)
        mesh.stop()


def ask(mesh, route, timeout_s):
    with grpc.insecure_channel(mesh.config.services.router.address) as channel:
        stream = router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(text="hello", route=route), timeout=timeout_s)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
    return caught.value


def test_client_deadline_gives_deadline_exceeded(router_and_paused_host):
    error = ask(router_and_paused_host, "chat", timeout_s=0.5)  # route allows 5 s; the client's 0.5 s wins
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_route_timeout_bounds_the_downstream_call(router_and_paused_host):
    error = ask(router_and_paused_host, "quick", timeout_s=10)  # route allows 300 ms; the router enforces it
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "model `tiny-lm` on the model host" in error.details()  # the router's downstream deadline fired


def test_sigterm_lets_the_in_flight_call_finish(router_and_paused_host):
    mesh = router_and_paused_host
    router = mesh.processes["router"].process
    outcome = {}
    first_message = threading.Event()

    def in_flight_call():
        with grpc.insecure_channel(mesh.config.services.router.address) as channel:
            stream = router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(text="hello", route="chat"), timeout=20)
            try:
                for response in stream:
                    outcome.setdefault("first", response.WhichOneof("event"))
                    first_message.set()
            except grpc.RpcError as exc:
                outcome["code"], outcome["details"] = exc.code(), exc.details()
            first_message.set()

    caller = threading.Thread(target=in_flight_call)
    caller.start()
    assert first_message.wait(10) and outcome["first"] == "route"  # the router now waits on the paused host
    router.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert router.poll() is None, "the router must wait for its in-flight call"
    assert health_status(mesh.config.services.router.address) != "SERVING"  # new work is turned away
    os.kill(mesh.processes["model_host"].process.pid, signal.SIGCONT)
    caller.join(10)
    # The call ran to its real end: the model host's own answer, relayed, not a cancellation.
    assert outcome["code"] == grpc.StatusCode.FAILED_PRECONDITION, outcome  # tiny-lm is not built here
    assert "model `tiny-lm` on the model host" in outcome["details"]
    assert router.wait(10) == 0


def test_second_server_on_a_busy_port_refuses_to_start(tmp_path):
    mesh = start_mesh(tmp_path, ("quantizer",))
    try:
        second = subprocess.run(
            [sys.executable, "-m", "services.quantizer", "--config", str(mesh.config.path)],
            capture_output=True, text=True, timeout=20,
        )
        assert second.returncode == 3
        assert "port is in use" in second.stderr and "services.quantizer.port" in second.stderr
        assert health_status(mesh.config.services.quantizer.address) == "SERVING"  # the first one is untouched
    finally:
        mesh.stop()


def test_mesh_start_names_the_busy_port(tmp_path):
    config = load_config(write_config(tmp_path))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.services.router.port))
        squatter.listen()
        with pytest.raises(MeshStartError, match=rf"services.router.port {config.services.router.port}"):
            Mesh(config, log_dir=tmp_path / "logs").start()


def test_a_service_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    config = load_config(write_config(tmp_path))
    config.path.write_text(config.path.read_text() + "  broken: {primary: nobody}\n")  # invalid after the check
    mesh = Mesh(config, log_dir=tmp_path / "logs")
    with pytest.raises(MeshStartError, match="exited with code 2"):
        mesh.start()
    assert not mesh.processes  # everything that did start was stopped


def test_mirador_up_serves_and_stops_cleanly_on_sigterm(tmp_path):
    config_path = write_config(tmp_path)
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--config", str(config_path), "up", "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        assert "all services SERVING" in output, output
        pids = [int(line.split("pid")[1]) for line in lines if " pid " in line]
        assert len(pids) == 5  # the four gRPC services and the HTTP gateway
        config = load_config(config_path)
        assert all(health_status(s.address) == "SERVING" for _, s in config.services.items())
        assert http_health_status(config.services.gateway.address) == "SERVING"
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        assert up.wait(30) == 0
        assert "router (exit 0)" in rest and "model_host (exit 0)" in rest and "gateway (exit 0)" in rest
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if up.poll() is None:
            up.kill()
