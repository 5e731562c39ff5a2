"""Score's prefix cache (services/model_host/runtimes/prefix_cache.py): a prompt that begins like
one just scored (every consensus question starts with the same decision instructions) prefills
only the rest, with the same option log-likelihoods; the cache stays within its token bound and
its memory is counted in the model's size. Tiny real ONNX decoders of both graph kinds."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.decision_prompt import SYSTEM, USER
from services.common.model_repository import ModelRepository
from services.model_host.engine.kv_slots import decoder_cache_bytes, kv_bytes_per_token, reserved_bytes_for
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.runtimes.prefix_cache import PREFIX_CACHE_TOKENS, PREFIX_CACHES_PER_DECODER, PrefixCache
from tiny_models import build_tiny_decoder, build_tiny_fused_decoder

OPTIONS = ["compliant", "non-compliant", "needs review"]
QUESTIONS = ["Is a voicemail naming a diagnosis allowed?", "Can we offer gift cards?", "Is this consent valid?"]


@pytest.fixture(scope="module", params=["fused", "optimum-style"])
def runtime(request, tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp(request.param))
    manifest = (build_tiny_fused_decoder if request.param == "fused" else build_tiny_decoder)(repository)
    return load_runtime(manifest, SessionSettings(intra_op_threads=1, optimized_cache=None))


def decision_ids(runtime, question: str) -> list[int]:
    asked = USER.format(prompt=question, options=" / ".join(OPTIONS))
    return runtime.prompt_ids([("system", SYSTEM), ("user", asked)], "")


def test_a_question_after_another_prefills_only_what_differs_and_scores_the_same(runtime):
    prompts = [decision_ids(runtime, q) for q in QUESTIONS]
    runtime.prefix_cache = PrefixCache(min_tokens=10**6)  # never reuses: the reference
    fresh = [runtime.score_options(ids, OPTIONS)[0] for ids in prompts]
    runtime.prefix_cache = PrefixCache()
    cached = [runtime.score_options(ids, OPTIONS)[0] for ids in prompts]
    shared = min(len(np.flatnonzero(np.cumprod(np.asarray(prompts[0][:len(p)]) == np.asarray(p[:len(prompts[0])])))) for p in prompts[1:])
    assert shared >= 8  # the instructions and the turn markers around them
    assert runtime.prefix_cache.reused_tokens >= 2 * shared  # the 2nd and 3rd question began from the 1st
    np.testing.assert_allclose(cached, fresh, rtol=0, atol=1e-4)


def test_the_same_prompt_again_runs_only_its_last_token(runtime):
    ids = decision_ids(runtime, QUESTIONS[0])
    runtime.prefix_cache = PrefixCache()
    first, _ = runtime.score_options(ids, OPTIONS)
    again, _ = runtime.score_options(ids, OPTIONS)
    assert runtime.prefix_cache.reused_tokens == min(len(ids) - 1, PREFIX_CACHE_TOKENS // 2)  # at most half the cache a prompt
    np.testing.assert_allclose(again, first, rtol=0, atol=1e-4)


def test_an_unrelated_prompt_reuses_nothing(runtime):
    runtime.prefix_cache = PrefixCache()
    runtime.score_options(decision_ids(runtime, QUESTIONS[0]), OPTIONS)
    runtime.score_options(runtime.encode("zebra " * 12), OPTIONS)  # a raw prompt: no shared beginning
    assert runtime.prefix_cache.reused_tokens == 0


def test_the_cache_keeps_within_its_bound_least_recently_used_out():
    cache = PrefixCache(capacity_tokens=40, min_tokens=4)
    past = {"k": np.zeros((1, 1, 30, 2), np.float32)}
    cache.add(list(range(30)), past)  # keeps the first 20 (half the capacity)
    cache.add(list(range(100, 130)), past)
    assert cache.held_tokens == 40
    assert cache.longest(list(range(10)) + [999])[0] == 10  # the first entry is now the most recent
    cache.add(list(range(200, 230)), past)  # evicts the least recent: the 100.. entry
    assert cache.held_tokens == 40
    assert cache.longest(list(range(100, 110)) + [999]) == (0, None)
    length, kept = cache.longest(list(range(0, 25)))
    assert length == 20 and kept["k"].shape == (1, 1, 20, 2)
    assert cache.longest([1, 2, 3]) == (0, None)  # shorter than min_tokens: not worth a second run


def test_the_prefix_cache_is_counted_in_a_decoders_size(runtime):
    facts = runtime.manifest.generation
    slots = reserved_bytes_for(facts, 4, 256)
    prefixes = PREFIX_CACHES_PER_DECODER * PREFIX_CACHE_TOKENS * kv_bytes_per_token(facts)
    assert decoder_cache_bytes(facts, 4, 256) == slots + prefixes
