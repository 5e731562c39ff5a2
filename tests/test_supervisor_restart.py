"""`mirador up` keeps its services up: a process that dies is started again with backoff, one
that keeps dying makes it give up, and SIGTERM still stops everything. Real processes."""

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import RestartPolicy, health_status
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_encoder

ONLY_EMBED = """
fleet:
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: tiny-embed, timeout_ms: 5000}
"""


def test_restart_delays_double_up_to_the_cap_and_give_up_after_max_restarts():
    policy = RestartPolicy(base_delay_s=0.5, max_delay_s=3.0, max_restarts=5, window_s=60.0)
    delays = [policy.next_delay("model_host", now=float(t)) for t in range(6)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, None]
    assert policy.next_delay("router", now=5.0) == 0.5  # counted per service


def test_a_service_that_stays_up_for_a_window_starts_again_from_the_base_delay():
    policy = RestartPolicy(base_delay_s=1.0, max_delay_s=30.0, max_restarts=2, window_s=10.0)
    assert policy.next_delay("router", now=0.0) == 1.0
    assert policy.next_delay("router", now=1.0) == 2.0
    assert policy.next_delay("router", now=2.0) is None
    assert policy.next_delay("router", now=12.5) == 1.0  # both earlier restarts are older than the window


class Up:
    """`mirador up` as a user runs it, its output read line by line."""

    def __init__(self, tmp_path, *extra: str):
        repository = ModelRepository(tmp_path / "models")
        build_tiny_encoder(repository, "tiny-embed")
        self.config_path = write_config(tmp_path, body=ONLY_EMBED)
        self.config = load_config(self.config_path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "--config", str(self.config_path), "up",
             "--log-dir", str(tmp_path / "logs"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.pids = {}
        for line in self.until("Ctrl-C", 60):
            if " pid " in line:
                self.pids[line.split()[0]] = int(line.split("pid")[1])

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, start: str, timeout_s: float) -> list[str]:
        seen, deadline = [], time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if start in line:
                return seen
        raise AssertionError(f"no line with {start!r} in {timeout_s} s; output:\n{''.join(seen)}")

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def embed(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = model_host_pb2_grpc.ModelHostStub(channel).Embed(
            model_host_pb2.EmbedRequest(model="tiny-embed", texts=["back again"]), timeout=10)
    return len(reply.embeddings[0].values)


@pytest.fixture
def up(tmp_path):
    running = Up(tmp_path, "--max-restarts", "2")
    yield running
    running.close()


def test_a_model_host_killed_under_mirador_up_comes_back_and_serves(up):
    address = up.config.services.model_host.address
    assert embed(address) == 32
    old_pid = up.pids["model_host"]
    os.kill(old_pid, signal.SIGKILL)
    said = "".join(up.until("model_host restarted as pid", 30))
    assert f"model_host (pid {old_pid}) exited with code -9; restarting it in 0.5 s" in said, said
    new_pid = int(said.rsplit("pid", 1)[1])
    deadline = time.monotonic() + 30
    while health_status(address) != "SERVING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert embed(address) == 32  # the new process serves
    assert all(health_status(s.address) == "SERVING" for _, s in up.config.services.items())

    up.process.send_signal(signal.SIGTERM)  # a normal shutdown still stops everything, the new pid included
    rest = "".join(up.until("stopped:", 30))
    assert up.process.wait(30) == 0
    assert "model_host (exit 0)" in rest, rest
    for pid in [new_pid, *(pid for name, pid in up.pids.items() if name != "model_host")]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_service_that_keeps_dying_makes_mirador_up_give_up_and_stop_the_rest(up):
    pid = up.pids["router"]
    for restart in (1, 2):
        os.kill(pid, signal.SIGKILL)
        said = "".join(up.until("router restarted as pid", 30))
        assert f"(restart {restart} of at most 2 within 300 s)" in said, said
        pid = int(said.rsplit("pid", 1)[1])
        time.sleep(0.5)  # let it get as far as serving before it dies again
    os.kill(pid, signal.SIGKILL)
    said = "".join(up.until("giving up", 30))
    assert "router exited with code -9 after 2 restarts within 300 s; giving up and stopping the mesh" in said, said
    assert up.process.wait(30) == 1
    for name, other in up.pids.items():
        if name != "router":
            with pytest.raises(ProcessLookupError):
                os.kill(other, 0)
