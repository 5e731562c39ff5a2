"""The continuous-batching engine inside a real model-host process: concurrent streams through
gRPC get the tokens they get alone, the context limit is a finish reason, and a slow model
(every decode step delayed on its engine thread) delays neither health checks, ListModels nor
another model's stream."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import build_tiny_fused_decoder

FLEET = """
fleet:
  fused-lm: {task: text-generation, tier: hot, max_num_seqs: 8, max_context: 96}
  slow-lm: {task: text-generation, tier: hot, max_num_seqs: 2}
routes:
  chat: {primary: fused-lm}
"""
PROMPTS = ["hi", "tell me a story about the sea", "a", "what is two plus two and why", "ok then",
           "the quick brown fox jumps over the lazy dog again", "yes", "one more question please"]
SLOW_STEP_MS = 400


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    directory = tmp_path_factory.mktemp("engine-host")
    repository = ModelRepository(directory / "models")
    build_tiny_fused_decoder(repository, "fused-lm")
    build_tiny_fused_decoder(repository, "slow-lm", seed=1)
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs", services=("model_host",),
                env={"XDG_CACHE_HOME": str(directory / "cache"), "MIRADOR_INJECT_TOKEN_DELAY": f"slow-lm={SLOW_STEP_MS}"})
    try:
        mesh.start()
        with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            deadline = time.monotonic() + 30
            while not all(m.ready for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models):
                assert time.monotonic() < deadline, "models not ready"
                time.sleep(0.1)
            yield stub, channel
    finally:
        mesh.stop()


def _request(text: str, model: str = "fused-lm", max_tokens: int = 16) -> model_host_pb2.GenerateRequest:
    return model_host_pb2.GenerateRequest(
        model=model, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens))


def _tokens(stub, request) -> tuple[list[int], model_host_pb2.GenerateSummary]:
    responses = list(stub.Generate(request, timeout=60))
    return [r.token.token_id for r in responses if r.HasField("token")], responses[-1].summary


def test_concurrent_streams_get_the_tokens_they_get_alone(host):
    stub, _ = host
    alone = [_tokens(stub, _request(p))[0] for p in PROMPTS]
    together: dict[int, list[int]] = {}

    def run(i: int) -> None:
        together[i] = _tokens(stub, _request(PROMPTS[i]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(PROMPTS))] == alone


def test_a_stream_that_fills_the_context_ends_with_context_length(host):
    stub, _ = host
    tokens, summary = _tokens(stub, _request("hi", max_tokens=500))
    assert summary.finish_reason == common_pb2.FINISH_REASON_CONTEXT_LENGTH
    assert summary.usage.prompt_tokens + len(tokens) == 96


def test_a_slow_model_delays_neither_health_nor_listing_nor_another_models_stream(host):
    stub, channel = host
    slow_tokens: list[float] = []
    slow_started = threading.Event()

    def slow_stream() -> None:
        for response in stub.Generate(_request("hello", model="slow-lm", max_tokens=8), timeout=60):
            if response.HasField("token"):
                slow_tokens.append(time.monotonic())
                slow_started.set()

    worker = threading.Thread(target=slow_stream)
    worker.start()
    try:
        assert slow_started.wait(30)
        # While slow-lm spends SLOW_STEP_MS per step on its engine thread, the host answers and the
        # other model streams a whole answer: all of it before slow-lm produced three more tokens.
        seen = len(slow_tokens)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert {m.name for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models} == \
            {"fused-lm", "slow-lm"}
        tokens, summary = _tokens(stub, _request("quick question", max_tokens=16))
        assert len(tokens) == 16
        assert len(slow_tokens) - seen < 3
    finally:
        worker.join()
    assert len(slow_tokens) == 8


def test_each_token_comes_with_the_alternatives_asked_for(host):
    stub, _ = host
    request = _request("tell me a story about the sea", max_tokens=12)
    request.sampling.top_logprobs = 5
    chunks = [r.token for r in stub.Generate(request, timeout=30) if r.HasField("token")]
    assert chunks
    for chunk in chunks:
        alternatives = list(chunk.top_logprobs)
        assert len(alternatives) == 5
        logprobs = [a.logprob for a in alternatives]
        assert logprobs == sorted(logprobs, reverse=True) and all(lp <= 0 for lp in logprobs)
        assert sum(2.718281828 ** lp for lp in logprobs) <= 1.0 + 1e-4
        # greedy: the token generated is the most likely one, with the same logprob
        assert alternatives[0].token_id == chunk.token_id
        assert alternatives[0].logprob == pytest.approx(chunk.logprob, abs=1e-5)
        assert len({a.token_id for a in alternatives}) == 5
    plain = [r.token for r in stub.Generate(_request("tell me a story about the sea", max_tokens=12), timeout=30)
             if r.HasField("token")]
    assert [c.token_id for c in plain] == [c.token_id for c in chunks]  # asking does not change the answer
    assert all(not c.top_logprobs for c in plain)


def test_more_alternatives_than_twenty_is_refused_with_a_sentence(host):
    stub, _ = host
    request = _request("hi")
    request.sampling.top_logprobs = 21
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "top_logprobs` is 21; ask for 0 to 20" in refused.value.details()
