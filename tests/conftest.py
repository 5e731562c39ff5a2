"""Shared fixtures: configs on free loopback ports, and meshes of real service processes."""

from __future__ import annotations

import socket
import textwrap
from pathlib import Path

import grpc
import pytest

from services.cli.supervisor import Mesh
from services.common.config import load_config

REPO = Path(__file__).resolve().parent.parent


# Ports this test process has handed out: the kernel may give a just-closed port to the next
# bind(0), so two free_port() calls for one config could name the same port.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that this process has not handed out before (bounded search)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port found that was not handed out already")


def free_port_run(count: int) -> int:
    """A port p such that p .. p+count-1 are all free on 127.0.0.1 and none was handed out before
    (bounded search)."""
    for _ in range(50):
        start = free_port()
        run = range(start, start + count)
        if run[-1] > 65535 or _HANDED_OUT.intersection(run[1:]):
            continue
        probes = []
        try:
            for port in run:
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            _HANDED_OUT.update(run)
            return start
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError("no run of free ports found")


FLEET_AND_ROUTES = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: warm}
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: tiny-lm, fallback: tiny-lm-b, timeout_ms: 5000}
  compliance:
    primary: tiny-lm
    validators: [tiny-lm-b]
    consensus_threshold: 0.8
    options: [compliant, non-compliant, needs review]
"""


def write_config(directory: Path, service_extra: dict[str, str] | None = None, body: str = FLEET_AND_ROUTES) -> Path:
    """A config with every service on its own free port; `service_extra` adds YAML keys per service."""
    service_extra = service_extra or {}
    lines = ["services:"]
    for name in ("router", "consensus", "quantizer", "model_host", "gateway"):
        # model-host replica i listens on port + i: a run of free ports, not one that may border a busy one
        port = free_port_run(4) if name == "model_host" else free_port()
        lines += [f"  {name}:", f"    port: {port}", "    shutdown_grace_s: 3s"]
        if name == "consensus" and "escalation_db" not in service_extra.get(name, ""):  # never the user's queue
            lines.append(f"    escalation_db: {directory / 'escalations.sqlite3'}")
        if name == "router" and "rollout_state" not in service_extra.get(name, ""):  # never the user's rollouts
            lines.append(f"    rollout_state: {directory / 'rollouts.json'}")
        lines += [f"    {extra}" for extra in service_extra.get(name, "").splitlines() if extra.strip()]
    lines.append(f"model_repository: {directory / 'models'}")
    path = directory / "mirador.yaml"
    path.write_text("\n".join(lines) + "\n" + textwrap.dedent(body))
    return path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """All four services, started the way `mirador up` starts them; shared by a test module."""
    directory = tmp_path_factory.mktemp("mesh")
    mesh = Mesh(load_config(write_config(directory)), log_dir=directory / "logs")
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture
def channel_to(mesh):
    """Opens channels to services of the module's mesh and closes them after the test."""
    opened: list[grpc.Channel] = []

    def open_channel(service: str) -> grpc.Channel:
        channel = grpc.insecure_channel(getattr(mesh.config.services, service).address)
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()
