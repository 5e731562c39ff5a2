"""Score's option log-likelihoods (DecoderRuntime.score_options): the longest option rides along the
prompt's own forward pass and the others continue from the prompt's cache, as one padded batch
where the graph takes it or in lockstep one-token steps (fused GroupQueryAttention graphs). Every
option's sum must equal a plain reference, one option at a time (prefill the prompt, then step
through the option's tokens), and the forward passes must be as few as the docstring says.
Tiny real ONNX decoders of both graph kinds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.runtimes.decoder import OPTION_ROWS_PER_CALL
from services.model_host.runtimes.sampling import log_softmax
from tiny_models import build_tiny_decoder, build_tiny_fused_decoder

COMPLIANCE = ["compliant", "non-compliant", "needs review"]
MANY = ["x", "yes", "no", "maybe", "a b c d e f", "needs review", "compliant", "n", "later on"]  # > one group


@pytest.fixture(scope="module", params=["fused", "optimum-style"])
def runtime(request, tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp(request.param))
    manifest = (build_tiny_fused_decoder if request.param == "fused" else build_tiny_decoder)(repository)
    return load_runtime(manifest, SessionSettings(intra_op_threads=1, optimized_cache=None))


def one_at_a_time(runtime, prompt_ids: list[int], option: str) -> float:
    """The reference: a fresh prefill of the prompt, then the option's tokens one step each."""
    ids = runtime.encode(option)
    state, logits = runtime.prefill(prompt_ids)
    total = log_softmax(logits)[ids[0]]
    for previous, token in itertools.pairwise(ids):
        total += log_softmax(runtime.step(state, previous))[token]
    return float(total)


def counted_passes(runtime, monkeypatch) -> list[int]:
    passes = []
    original = runtime._run

    def counting(*args, **kwargs):
        passes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "_run", counting)
    return passes


@pytest.mark.parametrize("options", [COMPLIANCE, MANY, ["x", "y"]], ids=["compliance", "many", "single-token"])
def test_every_option_scores_as_it_would_alone(runtime, options):
    prompt_ids = runtime.encode("Is a voicemail naming a diagnosis allowed? Answer with one option.")
    runtime.prefix_cache.min_tokens = 10**6  # no reuse: the prompt runs whole every time
    sums, counts = runtime.score_options(prompt_ids, options)
    assert counts == [len(runtime.encode(option)) for option in options]
    expected = [one_at_a_time(runtime, prompt_ids, option) for option in options]
    np.testing.assert_allclose(sums, expected, rtol=0, atol=2e-4)


def test_the_longest_option_rides_along_the_prompt_and_the_others_take_one_pass_per_group_or_position(
        runtime, monkeypatch):
    prompt_ids = runtime.encode("Is a voicemail naming a diagnosis allowed?")
    for options in (COMPLIANCE, MANY, ["x", "y"]):
        lengths = [len(runtime.encode(option)) for option in options]
        others = [i for i in range(len(options)) if i != max(range(len(options)), key=lambda i: lengths[i])]
        groups = [[lengths[i] for i in others[k : k + OPTION_ROWS_PER_CALL]]
                  for k in range(0, len(others), OPTION_ROWS_PER_CALL)]
        if runtime.batched_continuation:  # one padded batch per group that has a second token
            expected = 1 + sum(1 for group in groups if max(group) > 1)
        else:  # one lockstep step per option position after the first
            expected = 1 + sum(max(group) - 1 for group in groups)
        passes = counted_passes(runtime, monkeypatch)
        runtime.score_options(prompt_ids, options)
        assert len(passes) == expected, options
        monkeypatch.undo()


def test_a_prompt_cached_by_a_score_with_riding_tokens_is_the_prompt_alone(runtime):
    """The prefix cache keeps the prompt's K/V rows, not the option tokens that rode along."""
    prompt_ids = runtime.encode("Can we offer gift cards to members who enroll early?")
    runtime.prefix_cache.min_tokens = 8
    runtime.prefix_cache._entries.clear()
    first, _ = runtime.score_options(prompt_ids, COMPLIANCE)
    (key, past), = runtime.prefix_cache._entries.items()
    assert list(key) == prompt_ids[: len(key)]
    assert all(value.shape[2] == len(key) for value in past.values())
    again, _ = runtime.score_options(prompt_ids, COMPLIANCE)  # from the cache: all but the last token
    np.testing.assert_allclose(again, first, rtol=0, atol=2e-4)
