"""A peer that stops answering is noticed by keepalive: a stream from a model host that was
stopped (SIGSTOP: the connection stays open, nothing answers) fails UNAVAILABLE within the
keepalive window, not at its deadline; the host serves again once it continues."""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.channels import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS, open_channel
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.model_host.faults import TOKEN_DELAY_ENV_VAR
from tiny_models import build_tiny_decoder

FLEET = """
fleet:
  slow-lm: {task: text-generation, tier: hot}
routes:
  chat: {primary: slow-lm}
"""
DEADLINE_S = 120.0  # far beyond the keepalive window: only keepalive can end the call early


@pytest.fixture
def host(tmp_path):
    build_tiny_decoder(ModelRepository(tmp_path / "models"), "slow-lm")
    mesh = Mesh(load_config(write_config(tmp_path, body=FLEET)), log_dir=tmp_path / "logs", services=("model_host",),
                env={"XDG_CACHE_HOME": str(tmp_path / "cache"), TOKEN_DELAY_ENV_VAR: "slow-lm=200"})
    mesh.start()
    try:
        yield mesh
    finally:
        os.kill(mesh.processes["model_host"].process.pid, signal.SIGCONT)  # never leave it stopped
        mesh.stop()


def test_a_stream_from_a_stopped_host_fails_within_the_keepalive_window(host):
    pid = host.processes["model_host"].process.pid
    request = model_host_pb2.GenerateRequest(model="slow-lm", messages=[
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="tell me a long story")],
        sampling=common_pb2.SamplingParams(max_tokens=2000))
    with open_channel(None, host.config.services.model_host.address, aio=False) as channel:
        stream = model_host_pb2_grpc.ModelHostStub(channel).Generate(request, timeout=DEADLINE_S)
        assert next(stream).HasField("token")
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        took_s = time.monotonic() - stopped
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
    assert took_s < (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 10, took_s
    os.kill(pid, signal.SIGCONT)
    with open_channel(None, host.config.services.model_host.address, aio=False) as channel:
        listing = model_host_pb2_grpc.ModelHostStub(channel).ListModels(model_host_pb2.ListModelsRequest(), timeout=30)
    assert [m.name for m in listing.models] == ["slow-lm"]
