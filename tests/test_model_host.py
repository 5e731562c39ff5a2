"""The model host as a real process serving tiny real ONNX models: streaming
generation, scoring, embeddings, control plane, cancellation, broken models."""

import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from tiny_models import (
    build_tiny_decoder,
    build_tiny_encoder,
    chat_tokenizer,
    chatml,
    decoder_forward,
    greedy_reference,
    open_session,
    write_corrupt_model,
)

FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-lm-eos: {task: text-generation, tier: warm}
  tiny-embed: {task: embedding, tier: hot}
  broken-lm: {task: text-generation, tier: cold}
routes:
  chat: {primary: tiny-lm}
"""
USER = common_pb2.ROLE_USER


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    directory = tmp_path_factory.mktemp("host")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "tiny-lm-eos", eos_after=3)
    build_tiny_encoder(repository, "tiny-embed")
    write_corrupt_model(repository, "broken-lm")
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs", services=("model_host",),
                env={"XDG_CACHE_HOME": str(directory / "cache")})  # optimised graphs stay in the test's folder
    try:
        mesh.start()
        with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
            stub = model_host_pb2_grpc.ModelHostStub(channel)
            wait_ready(stub, {"tiny-lm", "tiny-embed"})
            yield stub, repository, mesh
    finally:
        mesh.stop()


def models(stub):
    return {m.name: m for m in stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}


def wait_ready(stub, names, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(models(stub)[n].ready for n in names):
            return
        time.sleep(0.1)
    raise AssertionError(f"not ready in {timeout_s} s: {names}")


def generate(stub, text="hello world", model="tiny-lm", **sampling):
    request = model_host_pb2.GenerateRequest(
        model=model, messages=[common_pb2.ChatMessage(role=USER, content=text)],
        sampling=common_pb2.SamplingParams(**sampling),
    )
    responses = list(stub.Generate(request, timeout=30))
    tokens = [r.token for r in responses if r.HasField("token")]
    summaries = [r.summary for r in responses if r.HasField("summary")]
    assert len(summaries) == 1 and responses[-1].HasField("summary")
    return tokens, summaries[0]


def prompt_ids(text):
    return chat_tokenizer().encode(chatml([("user", text)]), add_special_tokens=False).ids


# --------------------------------------------------------------------------- generate


def test_pinned_models_are_loaded_at_start_with_their_provider(host):
    stub, _, _ = host
    listing = models(stub)
    for name in ("tiny-lm", "tiny-embed"):
        assert listing[name].state == model_host_pb2.MODEL_STATE_READY
        assert listing[name].tier == model_host_pb2.MODEL_TIER_HOT
        assert listing[name].execution_provider == "CPUExecutionProvider"
        assert listing[name].load_ms > 0
    assert listing["tiny-lm-eos"].state == model_host_pb2.MODEL_STATE_UNLOADED  # warm: loaded on demand


def test_greedy_stream_equals_reference_without_kv_cache(host):
    stub, repository, _ = host
    tokens, summary = generate(stub, max_tokens=12)
    expected = greedy_reference(repository.get("tiny-lm"), prompt_ids("hello world"), 12)
    assert [t.token_id for t in tokens] == expected
    assert [t.index for t in tokens] == list(range(12))
    assert "".join(t.text for t in tokens) == summary.text
    assert summary.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert summary.usage.completion_tokens == 12 and summary.usage.prompt_tokens == len(prompt_ids("hello world"))
    assert summary.model == "tiny-lm" and summary.model_version == "1"


def test_confidence_metadata_is_consistent_with_the_tokens(host):
    stub, _, _ = host
    tokens, summary = generate(stub, max_tokens=10)
    c = summary.confidence
    logprobs = [t.logprob for t in tokens]
    assert list(c.token_logprobs) == pytest.approx(logprobs)
    assert all(lp <= 0 for lp in logprobs)
    assert c.mean_logprob == pytest.approx(np.mean(logprobs), abs=1e-5)
    assert c.min_logprob == pytest.approx(min(logprobs), abs=1e-6)
    assert c.mean_entropy == pytest.approx(np.mean([t.entropy for t in tokens]), abs=1e-5)
    # the geometric-mean token probability of exactly these tokens
    assert c.calibrated_confidence == pytest.approx(np.exp(np.mean(logprobs)), rel=1e-5)
    assert c.calibration_source == "geometric-mean token probability, not calibrated"
    assert summary.timings.prefill_ms > 0 and summary.timings.total_ms >= summary.timings.first_token_ms > 0


def test_eos_ends_generation_with_stop(host):
    stub, _, _ = host
    tokens, summary = generate(stub, model="tiny-lm-eos", max_tokens=50)
    assert len(tokens) == 3 and summary.finish_reason == common_pb2.FINISH_REASON_STOP
    assert 2 not in [t.token_id for t in tokens]  # <|im_end|> itself is not part of the answer


def test_stop_string_cuts_the_answer_and_the_stream_alike(host):
    stub, _, _ = host
    _, full = generate(stub, max_tokens=24)
    stop = full.text[9:12]
    assert stop and stop not in full.text[:11]
    tokens, summary = generate(stub, max_tokens=24, stop=[stop])
    cut = full.text[: full.text.index(stop)]
    assert summary.text == cut
    assert "".join(t.text for t in tokens) == cut
    assert summary.finish_reason == common_pb2.FINISH_REASON_STOP_STRING


def test_seeded_sampling_repeats_and_seeds_differ(host):
    stub, _, _ = host
    runs = {seed: [t.token_id for t in generate(stub, max_tokens=16, temperature=1.5, seed=seed)[0]] for seed in (1, 2, 3)}
    again = [t.token_id for t in generate(stub, max_tokens=16, temperature=1.5, seed=1)[0]]
    assert again == runs[1]
    assert len({tuple(v) for v in runs.values()}) > 1


def test_cancel_stops_generation_and_frees_the_call(host):
    stub, _, _ = host
    request = model_host_pb2.GenerateRequest(model="tiny-lm", prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=4000))
    stream = stub.Generate(request, timeout=60)
    received = [next(stream), next(stream)]
    stream.cancel()
    assert all(r.HasField("token") for r in received)
    deadline = time.monotonic() + 3
    while models(stub)["tiny-lm"].requests_in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert models(stub)["tiny-lm"].requests_in_flight == 0


def test_raw_prompt_is_used_without_template(host):
    stub, repository, _ = host
    request = model_host_pb2.GenerateRequest(model="tiny-lm", prompt="the world", sampling=common_pb2.SamplingParams(max_tokens=5))
    tokens = [r.token.token_id for r in stub.Generate(request, timeout=10) if r.HasField("token")]
    ids = chat_tokenizer().encode("the world", add_special_tokens=False).ids
    assert tokens == greedy_reference(repository.get("tiny-lm"), ids, 5)


# --------------------------------------------------------------------------- score


def test_score_distribution_matches_full_sequence_likelihoods(host):
    stub, repository, _ = host
    options = ["yes", "no", "needs review"]
    reply = stub.Score(model_host_pb2.ScoreRequest(
        model="tiny-lm", messages=[common_pb2.ChatMessage(role=USER, content="Is it?")], options=options), timeout=10)
    labels = reply.confidence.label_distribution
    assert [l.label for l in labels] == options
    assert sum(l.probability for l in labels) == pytest.approx(1.0, abs=1e-5)
    assert reply.best_option == max(labels, key=lambda l: l.probability).label
    # Reference: each option run alone after the whole prompt, no shared cache, no padding.
    session = open_session(repository.get("tiny-lm"))
    tokenizer = chat_tokenizer()
    prompt = prompt_ids("Is it?")
    for label in labels:
        option = tokenizer.encode(label.label, add_special_tokens=False).ids
        logits, _ = decoder_forward(session, [prompt + option])
        logp = logits[0] - np.log(np.exp(logits[0] - logits[0].max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits[0].max(-1, keepdims=True)
        expected = sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(option))
        assert label.logprob == pytest.approx(expected, abs=1e-3)
    # no calibration fitted for tiny-lm: the confidence is the best option's probability itself
    assert reply.confidence.calibrated_confidence == pytest.approx(max(l.probability for l in labels), rel=1e-6)
    assert "not calibrated" in reply.confidence.calibration_source


# --------------------------------------------------------------------------- embed


def test_embeddings_are_normalised_and_batch_invariant(host):
    stub, _, _ = host
    texts = ["the cat sat", "a much longer sentence about dogs and cats and the weather", "hi"]
    batch = stub.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=texts), timeout=10)
    assert batch.dimension == 32 and len(batch.embeddings) == 3
    vectors = np.array([e.values for e in batch.embeddings])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    alone = np.array([stub.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=[t]), timeout=10).embeddings[0].values for t in texts])
    assert np.abs(vectors - alone).max() < 1e-5


def test_concurrent_embeds_batched_equal_unbatched(host):
    stub, _, _ = host
    texts = [f"sentence number {i} " + "word " * i for i in range(12)]
    expected = {t: np.array(stub.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=[t]), timeout=10).embeddings[0].values) for t in texts}
    got = {}

    def call(text):
        got[text] = np.array(stub.Embed(model_host_pb2.EmbedRequest(model="tiny-embed", texts=[text]), timeout=10).embeddings[0].values)

    threads = [threading.Thread(target=call, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.abs(got[t] - expected[t]).max() < 1e-5 for t in texts)


# --------------------------------------------------------------------------- control plane


def test_load_and_unload_a_warm_model(host):
    stub, _, _ = host
    status = stub.LoadModel(model_host_pb2.LoadModelRequest(model="tiny-lm-eos"), timeout=30)
    assert status.ready and status.state == model_host_pb2.MODEL_STATE_READY and status.tier == model_host_pb2.MODEL_TIER_WARM
    again = stub.LoadModel(model_host_pb2.LoadModelRequest(model="tiny-lm-eos"), timeout=30)  # idempotent
    assert again.ready
    status = stub.UnloadModel(model_host_pb2.UnloadModelRequest(model="tiny-lm-eos"), timeout=10)
    assert status.state == model_host_pb2.MODEL_STATE_UNLOADED and status.memory_bytes == 0
    assert "unloaded on request" in status.detail


def test_corrupt_model_is_failed_with_a_reason_and_the_host_keeps_serving(host):
    stub, _, mesh = host
    with pytest.raises(grpc.RpcError) as caught:
        stub.LoadModel(model_host_pb2.LoadModelRequest(model="broken-lm"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "broken-lm" in caught.value.details() and "failed to load" in caught.value.details()
    status = models(stub)["broken-lm"]
    assert status.state == model_host_pb2.MODEL_STATE_FAILED and "failed to load" in status.detail
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, model="broken-lm")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert generate(stub, max_tokens=2)[1].usage.completion_tokens == 2  # other models still answer


def test_requests_are_counted(host):
    stub, _, _ = host
    before = models(stub)["tiny-lm"].requests_total
    generate(stub, max_tokens=1)
    after = models(stub)["tiny-lm"]
    assert after.requests_total == before + 1 and after.last_used.seconds > 0
