"""Memory must settle, not grow: a real model-host process (tiny models) loads and unloads a
model and streams generations and embeddings in a loop while its RSS is sampled (psutil).

The same check runs against a host started with MIRADOR_INJECT_LEAK_KB (every generation
keeps that much memory alive, services/model_host/faults.py): it must report growth. That
negative control shows the check can fail, so its passing on the clean host means something.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import psutil
import pytest
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.model_host.faults import LEAK_ENV_VAR
from tiny_models import build_tiny_decoder, build_tiny_encoder

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-b: {task: text-generation, tier: warm}
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: tiny-lm}
"""
WARMUP_ROUNDS = 8
MEASURED_ROUNDS = 24
GENERATIONS_PER_ROUND = 3
# Allowed growth over the measured rounds (fitted trend). The leak below adds
# 24 rounds x 3 generations x 512 KB = 36 MB over the same rounds.
GROWTH_LIMIT_MB = 8.0
LEAK_KB = 512


def host(directory, leak_kb=0) -> Mesh:
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-b", seed=1)
    build_tiny_encoder(repository, "tiny-embed")
    env = {"XDG_CACHE_HOME": str(directory / "cache"), **({LEAK_ENV_VAR: str(leak_kb)} if leak_kb else {})}
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs", services=("model_host",),
                env=env)
    mesh.start(timeout_s=60)
    return mesh


def one_round(stub, index: int) -> None:
    stub.LoadModel(model_host_pb2.LoadModelRequest(model="tiny-lm-b"), timeout=30)
    for i in range(GENERATIONS_PER_ROUND):
        model = "tiny-lm-b" if i % 2 else "tiny-lm"
        request = model_host_pb2.GenerateRequest(
            model=model, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"hello world {index} {i}")],
            sampling=common_pb2.SamplingParams(max_tokens=24, temperature=0.7, seed=index * 10 + i))
        responses = list(stub.Generate(request, timeout=30))
        assert responses[-1].HasField("summary")
    stub.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=[f"the cat sat {index}", "hello world"]), timeout=30)
    stub.UnloadModel(model_host_pb2.UnloadModelRequest(model="tiny-lm-b"), timeout=30)


def rss_trend(mesh: Mesh) -> dict:
    """Runs the loop and returns the RSS samples (MB) of the measured rounds and their fitted growth."""
    process = psutil.Process(mesh.processes["model_host"].process.pid)
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        deadline = time.monotonic() + 30
        while not all(m.ready for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models
                      if m.name != "tiny-lm-b"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for index in range(WARMUP_ROUNDS):  # allocators, caches and arenas reach their working size
            one_round(stub, index)
        samples = []
        for index in range(WARMUP_ROUNDS, WARMUP_ROUNDS + MEASURED_ROUNDS):
            one_round(stub, index)
            samples.append(process.memory_info().rss / 2**20)
    slope = np.polyfit(np.arange(len(samples)), samples, 1)[0]  # MB per round, robust to one-off jumps
    return {"samples_mb": [round(s, 1) for s in samples], "growth_mb": float(slope * (len(samples) - 1)),
            "first_mb": samples[0], "last_mb": samples[-1]}


def settles(trend: dict) -> bool:
    return trend["growth_mb"] < GROWTH_LIMIT_MB and trend["last_mb"] - trend["first_mb"] < GROWTH_LIMIT_MB


@pytest.fixture(scope="module")
def trends(tmp_path_factory):
    results = {}
    for name, leak_kb in (("clean", 0), ("leaking", LEAK_KB)):
        mesh = host(tmp_path_factory.mktemp(name), leak_kb)
        try:
            results[name] = rss_trend(mesh)
            assert mesh.processes["model_host"].process.poll() is None
        finally:
            mesh.stop()
    return results


def test_rss_settles_under_load_unload_and_streaming(trends):
    trend = trends["clean"]
    assert settles(trend), f"RSS grew {trend['growth_mb']:.1f} MB over {MEASURED_ROUNDS} rounds: {trend['samples_mb']}"


def test_negative_control_a_leaking_runtime_fails_the_same_check(trends):
    trend = trends["leaking"]
    expected_mb = MEASURED_ROUNDS * GENERATIONS_PER_ROUND * LEAK_KB / 1024
    assert not settles(trend), f"the check missed a {expected_mb:.0f} MB leak: {trend['samples_mb']}"
    assert trend["growth_mb"] > expected_mb * 0.6  # it sees (most of) the injected leak, not noise
