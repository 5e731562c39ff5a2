"""Confidence is never overstated. Every confidence source at its edges (empty, one token,
every token certain, every token uniform), and an empty answer end to end: through the
engine on a tiny real decoder, through the model host over gRPC, and through the consensus
service, where a vote without tokens is no vote."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import numpy as np
import pytest
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.model_host.answers import GenerationSummary, SamplingSettings, Timings, TokenEvent
from services.model_host.calibration import (
    GENERATION_SOURCE,
    NO_TOKENS_SOURCE,
    STOPPED_EMPTY_SOURCE,
    ScoreCalibration,
    generation_confidence,
    option_distribution,
    options_share,
    score_confidence,
)
from services.model_host.engine import DecoderEngine, EngineSettings
from services.model_host.engine.sequence import GenerationRequest
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.runtimes.sampling import Sampler
from tiny_models import build_tiny_decoder, build_tiny_encoder

VOCAB = 50
CALIBRATED = ScoreCalibration(temperature=2.0, fit_on="a test", ece_before=0.2, ece_after=0.1)


def picked(logits: np.ndarray) -> float:
    """The log-probability the greedy sampler reports for its token."""
    return Sampler(0.0, 1.0, None).pick(np.asarray(logits, dtype=np.float32)).logprob


# ----------------------------------------------------------------------------- generation


def test_generation_confidence_of_an_empty_answer_is_zero_and_says_why():
    assert generation_confidence([], "") == (0.0, NO_TOKENS_SOURCE)
    # tokens that a stop string cut to nothing: still nothing to be sure of
    assert generation_confidence([picked(np.eye(VOCAB)[3] * 30)], "") == (0.0, STOPPED_EMPTY_SOURCE)


def test_generation_confidence_of_one_token_is_its_probability():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    confidence, source = generation_confidence([picked(logits)], "yes")
    assert confidence == pytest.approx(0.6, abs=1e-6) and source == GENERATION_SOURCE


def test_generation_confidence_of_certain_and_of_uniform_tokens():
    certain = [picked(np.eye(VOCAB)[i] * 100) for i in range(5)]  # softmax puts ~all mass on one token
    assert generation_confidence(certain, "a b c")[0] == pytest.approx(1.0, abs=1e-6)
    uniform = [picked(np.zeros(VOCAB)) for _ in range(5)]
    assert generation_confidence(uniform, "a b c")[0] == pytest.approx(1 / VOCAB, rel=1e-5)


# ----------------------------------------------------------------------------- score and classifier


@pytest.mark.parametrize("calibration", [None, CALIBRATED], ids=["uncalibrated", "calibrated"])
def test_score_confidence_at_its_edges(calibration):
    assert score_confidence("m", [0.0, -math.inf, -math.inf], calibration)[0] == pytest.approx(1.0)  # certain
    assert score_confidence("m", [-2.0, -2.0, -2.0], calibration)[0] == pytest.approx(1 / 3)  # uniform
    # no option has any likelihood (or a NaN): the least sure answer, not NaN
    assert score_confidence("m", [-math.inf] * 4, calibration)[0] == pytest.approx(1 / 4)
    assert score_confidence("m", [-1.0, math.nan], calibration)[0] == pytest.approx(1 / 2)
    # one option far ahead: the calibrated temperature (2) tempers it, never sharpens it
    sums = [-0.1, -3.0]
    raw = score_confidence("m", sums, None)[0]
    assert score_confidence("m", sums, calibration)[0] <= raw + 1e-12
    assert list(option_distribution(sums)) == pytest.approx([1 / (1 + math.exp(-2.9)), 1 / (1 + math.exp(2.9))])


def test_classifier_share_of_the_options_at_its_edges():
    assert list(options_share([0.0, 0.0])) == [0.5, 0.5]  # the classifier gives the options nothing
    assert list(options_share([math.nan, 0.2])) == [0.5, 0.5]
    assert list(options_share([0.3, 0.0])) == [1.0, 0.0]  # all of their mass on one
    assert list(options_share([0.2, 0.2, 0.2])) == pytest.approx([1 / 3] * 3)


# ----------------------------------------------------------------------------- an empty answer, for real


def _request(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest("tiny", "1", [("user", text)], "", SamplingSettings(**sampling), time.perf_counter(),
                             Timings())


async def _collect(engine: DecoderEngine, request: GenerationRequest):
    tokens, summary = [], None
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event)
        elif isinstance(event, GenerationSummary):
            summary = event
    return tokens, summary


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp("confidence-models"))
    settings = SessionSettings(providers=("CPUExecutionProvider",), intra_op_threads=1, optimized_cache=None)
    return {name: load_runtime(build_tiny_decoder(repository, name, **extra), settings)
            for name, extra in {"talker": {}, "mute": {"eos_after": 0}}.items()}


def _run(runtime, request):
    engine = DecoderEngine("tiny", runtime, EngineSettings(max_num_seqs=2, max_context=128))
    try:
        return asyncio.run(_collect(engine, request))
    finally:
        engine.stop()


def test_an_answer_whose_first_token_ends_the_turn_reports_confidence_zero(runtimes):
    tokens, summary = _run(runtimes["mute"], _request("hello world", max_tokens=8))
    assert tokens == [] and summary.text == "" and summary.completion_tokens == 0
    assert summary.finish_reason == "stop"
    assert summary.confidence.calibrated == 0.0 and summary.confidence.source == NO_TOKENS_SOURCE


def test_one_token_and_a_stop_string_that_swallows_it(runtimes):
    (token,), summary = _run(runtimes["talker"], _request("hello world", max_tokens=1))
    assert summary.confidence.calibrated == pytest.approx(math.exp(token.logprob))
    assert 0 < summary.confidence.calibrated < 1 and summary.confidence.source == GENERATION_SOURCE
    assert token.text  # the stop string below matches it
    tokens, summary = _run(runtimes["talker"], _request("hello world", max_tokens=4, stop=(token.text,)))
    assert summary.text == "" and summary.finish_reason == "stop_string"
    assert summary.confidence.calibrated == 0.0 and summary.confidence.source == STOPPED_EMPTY_SOURCE


FLEET = """
fleet:
  talker: {task: text-generation, tier: hot}
  mute: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
routes:
  chat: {primary: talker}
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    directory = tmp_path_factory.mktemp("confidence-mesh")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "talker", seed=5)
    build_tiny_decoder(repository, "mute", seed=6, eos_after=0)
    build_tiny_encoder(repository, "tiny-embed")
    config = load_config(write_config(directory, body=FLEET,
                                      service_extra={"consensus": "embedding_model: tiny-embed"}))
    mesh = Mesh(config, log_dir=directory / "logs", services=("model_host", "consensus"),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    try:
        mesh.start(timeout_s=60)
        yield mesh
    finally:
        mesh.stop()


def test_the_model_host_reports_an_empty_answer_with_confidence_zero(mesh):
    with grpc.insecure_channel(mesh.config.services.model_host.address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        request = model_host_pb2.GenerateRequest(
            model="mute", messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hello")])
        (response,) = list(stub.Generate(request, timeout=30))
    summary = response.summary
    assert summary.usage.completion_tokens == 0 and summary.text == ""
    assert summary.confidence.calibrated_confidence == 0.0
    assert summary.confidence.calibration_source == NO_TOKENS_SOURCE


def test_the_consensus_counts_a_vote_without_tokens_as_no_vote(mesh):
    with grpc.insecure_channel(mesh.config.services.consensus.address) as channel:
        stub = consensus_pb2_grpc.ConsensusStub(channel)
        request = consensus_pb2.DecideRequest(
            route="chat", models=["mute", "talker"], consensus_threshold=0.5,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Say something.")],
            sampling=common_pb2.SamplingParams(max_tokens=6))
        responses = list(stub.Decide(request, timeout=60))
    votes = {r.vote.model: r.vote for r in responses if r.HasField("vote")}
    verdict = responses[-1].verdict
    assert votes["mute"].error.startswith("no vote: ") and votes["mute"].weight == 0
    assert votes["talker"].answer and not votes["talker"].error and votes["talker"].weight > 0
    assert verdict.answer == votes["talker"].answer
    assert "1 of 2 models failed: mute: no vote" in verdict.method, verdict.method


@pytest.mark.parametrize("temperature", [1e-40, 5e-324, 1e-6])
def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing(temperature):
    logits = np.array([1.0, 3.0, 2.0, -50.0], np.float32)
    sampler = Sampler(temperature=temperature, top_p=0.9, seed=0)
    assert all(sampler.pick(logits).token_id == 1 for _ in range(20))
