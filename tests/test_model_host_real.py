"""The model host serving the real fleet (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)
over gRPC. Skips unless `mirador fleet build` has run (CI builds it first)."""

import grpc
import numpy as np
import pytest
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelNotFoundError, ModelRepository

pytestmark = pytest.mark.real_model

FLEET = """
fleet:
  smollm2-135m-instruct: {task: text-generation, tier: hot}
  smollm2-135m-instruct-fused: {task: text-generation, tier: warm}
  minilm-l6: {task: embedding, tier: hot}
routes:
  chat: {primary: smollm2-135m-instruct}
"""


@pytest.fixture(scope="module")
def real_host(tmp_path_factory):
    repository = ModelRepository()
    try:
        smollm = repository.get("smollm2-135m-instruct")
        repository.get("minilm-l6")
    except ModelNotFoundError as exc:
        pytest.skip(f"the real fleet is not built ({exc}); run `mirador fleet build`")
    directory = tmp_path_factory.mktemp("real")
    config_path = write_config(directory, body=FLEET)
    # the shared repository, not the test folder's
    config_path.write_text(config_path.read_text().replace(f"model_repository: {directory / 'models'}", f"model_repository: {repository.root}"))
    mesh = Mesh(load_config(config_path), log_dir=directory / "logs", services=("model_host",))
    mesh.start(timeout_s=60)
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        yield model_host_pb2_grpc.ModelHostStub(channel), smollm
    mesh.stop()


def ask(stub, text, **sampling):
    request = model_host_pb2.GenerateRequest(
        model="smollm2-135m-instruct", messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
        sampling=common_pb2.SamplingParams(**sampling),
    )
    responses = list(stub.Generate(request, timeout=180))
    return [r.token for r in responses if r.HasField("token")], responses[-1].summary


def test_greedy_answer_equals_a_plain_onnxruntime_loop(real_host):
    from test_fleet_real import greedy_generate, render_chat

    stub, manifest = real_host
    tokens, summary = ask(stub, "What is the capital of France?", max_tokens=24)
    reference = greedy_generate(manifest, render_chat([{"role": "user", "content": "What is the capital of France?"}], manifest.generation), 24)
    assert summary.text.strip() == reference.strip()
    assert "Paris" in summary.text
    assert summary.finish_reason == common_pb2.FINISH_REASON_STOP
    assert len(summary.confidence.token_logprobs) == len(tokens) == summary.usage.completion_tokens


def test_score_gives_a_distribution_over_the_options(real_host):
    stub, _ = real_host
    reply = stub.Score(model_host_pb2.ScoreRequest(
        model="smollm2-135m-instruct",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Is Paris the capital of France? Answer Yes or No.")],
        options=["Yes", "No"]), timeout=120)
    probabilities = [l.probability for l in reply.confidence.label_distribution]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert reply.best_option == max(reply.confidence.label_distribution, key=lambda l: l.probability).label
    assert all(l.logprob < 0 for l in reply.confidence.label_distribution)  # real log-likelihoods, not scores


def test_embeddings_put_paraphrases_closer_than_unrelated_text(real_host):
    stub, _ = real_host
    reply = stub.Embed(model_host_pb2.EmbedRequest(
        model="minilm-l6", texts=["The cat sat on the mat.", "A cat was sitting on a rug.", "Stock markets fell sharply."]),
        timeout=120)
    vectors = np.array([e.values for e in reply.embeddings])
    assert reply.dimension == 384
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3


def test_fused_graph_answers_exactly_like_the_optimum_export(real_host):
    stub, _ = real_host
    try:
        ModelRepository().get("smollm2-135m-instruct-fused")
    except ModelNotFoundError:
        pytest.skip("smollm2-135m-instruct-fused is not built; run `mirador fleet build`")
    question = "Name three primary colours."
    reference = ask(stub, question, max_tokens=32)[1]
    request = model_host_pb2.GenerateRequest(
        model="smollm2-135m-instruct-fused",
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=question)],
        sampling=common_pb2.SamplingParams(max_tokens=32),
    )
    fused = list(stub.Generate(request, timeout=180))[-1].summary
    assert fused.text == reference.text
    assert fused.confidence.token_logprobs == pytest.approx(list(reference.confidence.token_logprobs), abs=1e-3)
