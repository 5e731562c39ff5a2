"""The decoder engine (continuous batching) on real ONNX Runtime sessions of tiny models:
Mirador's fused graph (shared KV buffer, one ragged batch per step) and an optimum-style
graph (a cache per sequence). In-process: the engine's thread, the asyncio side, real sessions."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.common.model_repository import ModelRepository
from services.model_host.answers import GenerationSummary, SamplingSettings, Timings, TokenEvent
from services.model_host.engine import DecoderEngine, EngineSettings
from services.model_host.engine.kv_slots import PerSequenceSlots, SharedKVSlots
from services.model_host.engine.sequence import GenerationRequest
from services.model_host.loader import SessionSettings, load_runtime
from services.model_host.runtimes.prefix_cache import PrefixCache
from tests.tiny_models import build_tiny_decoder, build_tiny_fused_decoder, chat_tokenizer, chatml, greedy_reference

PROMPTS = ["hi", "tell me a story about the sea", "a", "what is two plus two and why", "ok then",
           "the quick brown fox jumps over the lazy dog again and again", "yes", "one more question please"]


def chat_ids(text: str) -> list[int]:
    """The prompt's ids the old way (markers split out of one formatted string): equal for ordinary text."""
    return chat_tokenizer().encode(chatml([("user", text)]), add_special_tokens=False).ids


def _runtime(manifest):
    return load_runtime(manifest, SessionSettings(providers=("CPUExecutionProvider",), intra_op_threads=1,
                                                  optimized_cache=None))


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return _runtime(build_tiny_fused_decoder(ModelRepository(tmp_path_factory.mktemp("fused"))))


@pytest.fixture(scope="module")
def optimum_style(tmp_path_factory):
    return _runtime(build_tiny_decoder(ModelRepository(tmp_path_factory.mktemp("plain"))))


def _request(text: str, max_tokens: int = 12, **sampling) -> GenerationRequest:
    import time

    return GenerationRequest("tiny", "1", [("user", text)], "", SamplingSettings(max_tokens=max_tokens, **sampling),
                             time.perf_counter(), Timings())


def _messages_request(messages: list[tuple[str, str]], max_tokens: int = 12) -> GenerationRequest:
    import time

    return GenerationRequest("tiny", "1", messages, "", SamplingSettings(max_tokens=max_tokens), time.perf_counter(),
                             Timings())


async def _collect(engine: DecoderEngine, request: GenerationRequest) -> tuple[list[int], GenerationSummary]:
    tokens, summary = [], None
    async for event in engine.generate(request):
        if isinstance(event, TokenEvent):
            tokens.append(event.token_id)
        else:
            summary = event
    return tokens, summary


def _engine(runtime, **settings) -> DecoderEngine:
    return DecoderEngine("tiny", runtime, EngineSettings(**{"max_num_seqs": 8, "max_context": 128,
                                                             "prefill_chunk_tokens": 4, **settings}))


def test_the_fused_graph_gets_shared_buffers_and_others_a_cache_per_sequence(fused, optimum_style):
    assert isinstance(_engine(fused).slots, SharedKVSlots)
    assert isinstance(_engine(optimum_style).slots, PerSequenceSlots)


@pytest.mark.parametrize("graph", ["fused", "optimum_style"])
def test_greedy_output_does_not_depend_on_the_batch(graph, request):
    runtime = request.getfixturevalue(graph)
    engine = _engine(runtime)
    try:
        async def scenario():
            alone = [await _collect(engine, _request(p)) for p in PROMPTS]
            together = await asyncio.gather(*(_collect(engine, _request(p)) for p in PROMPTS))
            return alone, together

        alone, together = asyncio.run(scenario())
        assert [t for t, _ in together] == [t for t, _ in alone]
        assert all(len(t) == 12 for t, _ in alone)  # the tiny model never says <|im_end|> by itself
        assert {s.finish_reason for _, s in together} == {"length"}
    finally:
        engine.stop()


@pytest.mark.parametrize("graph", ["fused", "optimum_style"])
def test_a_shared_beginning_comes_from_the_prefix_cache_and_changes_no_answer(graph, request):
    """Every chat here begins with the same system turn (and the conversations with the same
    turns): the first prompt prefills it, the others copy it from the engine's prefix cache, and
    each answer equals that of an engine keeping nothing (the same chunk computed the beginning)."""
    runtime = request.getfixturevalue(graph)
    cached, plain = _engine(runtime), _engine(runtime)
    plain.prefixes = PrefixCache(capacity_tokens=0)
    conversation = [("user", "hi"), ("assistant", "hello, how can I help"), ("user", "one more question please")]
    asks = [*([("user", p)] for p in PROMPTS), conversation, conversation[:2] + [("user", "and another")]]
    try:
        async def scenario(engine):
            return [await _collect(engine, _messages_request(messages)) for messages in asks]

        with_cache, without = asyncio.run(scenario(cached)), asyncio.run(scenario(plain))
        assert [t for t, _ in with_cache] == [t for t, _ in without]
        assert [s.confidence.token_logprobs for _, s in with_cache] == [s.confidence.token_logprobs for _, s in without]
        system_turn = runtime.prompt_ids_and_shared([("user", "x")], "")[1]
        two_turns = runtime.prompt_ids_and_shared(conversation, "")[1]
        assert 0 < system_turn < two_turns
        # every chat after the first took the system turn; the last conversation its first two turns
        assert cached.prefixes.reused_tokens == system_turn * (len(PROMPTS) - 1) + two_turns
        assert plain.prefixes.reused_tokens == 0
    finally:
        cached.stop()
        plain.stop()


def test_the_engine_matches_a_cache_free_reference(optimum_style):
    engine = _engine(optimum_style)
    try:
        tokens, summary = asyncio.run(_collect(engine, _request("hello there", max_tokens=8)))
        expected = greedy_reference(optimum_style.session, chat_ids("hello there"), 8)
        assert tokens == expected
        assert summary.prompt_tokens == len(chat_ids("hello there"))
    finally:
        engine.stop()


def test_more_sequences_than_slots_wait_for_a_free_slot(fused):
    engine = _engine(fused, max_num_seqs=2)
    try:
        async def scenario():
            return await asyncio.gather(*(_collect(engine, _request(p)) for p in PROMPTS[:5]))

        results = asyncio.run(scenario())
        assert all(len(tokens) == 12 for tokens, _ in results)
        assert sorted(engine.scheduler.free_slots) == [0, 1]  # a heap: its list order is not the point
    finally:
        engine.stop()


def test_a_cancelled_stream_frees_its_slot_and_leaves_the_others_untouched(fused):
    engine = _engine(fused, max_num_seqs=3)
    try:
        async def scenario():
            expected = [await _collect(engine, _request(p, max_tokens=40)) for p in PROMPTS[:2]]

            async def cancel_after(n: int):
                seen = 0
                async for event in engine.generate(_request(PROMPTS[2], max_tokens=40)):
                    seen += 1
                    if seen == n:
                        return  # leaving the stream = the client went away

            others = [asyncio.create_task(_collect(engine, _request(p, max_tokens=40))) for p in PROMPTS[:2]]
            await cancel_after(3)
            results = await asyncio.gather(*others)
            return expected, results

        expected, results = asyncio.run(scenario())
        assert [t for t, _ in results] == [t for t, _ in expected]
        assert sorted(engine.scheduler.free_slots) == [0, 1, 2] and not engine.scheduler.has_work()  # a heap
    finally:
        engine.stop()


def test_a_sequence_that_fills_its_context_says_so(fused):
    engine = _engine(fused, max_context=48)
    try:
        prompt_tokens = len(chat_ids("hi"))
        tokens, summary = asyncio.run(_collect(engine, _request("hi", max_tokens=500)))
        assert summary.finish_reason == "context_length"
        assert len(tokens) == 48 - prompt_tokens
        tokens, summary = asyncio.run(_collect(engine, _request("hi", max_tokens=3)))
        assert summary.finish_reason == "length" and len(tokens) == 3
    finally:
        engine.stop()


def test_a_prompt_longer_than_the_context_is_refused_with_what_to_change(fused):
    engine = _engine(fused, max_context=48)
    try:
        with pytest.raises(InvalidArgument, match="at most 47 prompt tokens"):
            asyncio.run(_collect(engine, _request("word " * 100)))
        tokens, _ = asyncio.run(_collect(engine, _request("hi", max_tokens=2)))  # the engine goes on
        assert len(tokens) == 2
    finally:
        engine.stop()


def test_jobs_run_on_the_engine_thread_between_steps(fused):
    import threading

    engine = _engine(fused)
    try:
        name = asyncio.run(engine.call(lambda: threading.current_thread().name))
        assert name == "engine tiny"
        with pytest.raises(ZeroDivisionError):
            asyncio.run(engine.call(lambda: 1 / 0))
    finally:
        engine.stop()


def test_seeded_sampling_is_reproducible_inside_a_batch(fused):
    engine = _engine(fused)
    try:
        async def scenario():
            alone = await _collect(engine, _request(PROMPTS[1], temperature=0.9, seed=11))
            together = await asyncio.gather(*(_collect(engine, _request(p, temperature=0.9, seed=11)) for p in PROMPTS))
            return alone, together

        alone, together = asyncio.run(scenario())
        assert together[1][0] == alone[0]
    finally:
        engine.stop()


def test_a_decode_step_leaves_a_slot_that_is_still_prefilling_untouched(fused):
    """Row 0 is mid-prefill (chunked) while row 1 decodes: the step must not write into row 0's cache."""
    import numpy as np

    prompt = chat_ids(PROMPTS[5])
    other = chat_ids(PROMPTS[1])
    alone = SharedKVSlots(fused, 2, 128)
    for start in range(0, len(prompt), 4):
        expected = alone.prefill(0, prompt[start:start + 4], start)

    slots = SharedKVSlots(fused, 2, 128)
    logits = slots.prefill(1, other, 0)
    length = len(other)
    for start in range(0, len(prompt), 4):
        actual = slots.prefill(0, prompt[start:start + 4], start)
        logits = slots.decode([1], [int(np.argmax(logits))], [length])[0]  # row 0 is not decoding
        length += 1
    np.testing.assert_array_equal(actual, expected)


def test_a_float16_graph_gets_float16_slots_half_the_budget_and_float32_logits(tmp_path):
    """The GPU variant of the fused graph (float16 weights, KV cache, logits) runs in the same engine:
    its slots are float16 buffers counted at half the bytes, and what sampling sees is float32 and
    close to the float32 graph's (same weights)."""
    repository = ModelRepository(tmp_path)
    fp32 = _runtime(build_tiny_fused_decoder(repository, "tiny-fp32"))
    fp16 = _runtime(build_tiny_fused_decoder(repository, "tiny-fp16", dtype="float16"))
    assert fp16.kv_dtype == np.float16 and fp16.kv_bytes_per_token() * 2 == fp32.kv_bytes_per_token()
    half, full = _engine(fp16), _engine(fp32)
    try:
        assert all(b.dtype == np.float16 for b in half.slots.buffers.values())
        assert half.slots.reserved_bytes * 2 == full.slots.reserved_bytes
        prompt = fp32.encode(PROMPTS[0])
        ours = half.slots.prefill(0, prompt, 0)
        reference = full.slots.prefill(0, prompt, 0)
        assert ours.dtype == np.float32
        assert np.abs(ours - reference).max() < 0.02 * np.abs(reference).max()
        stepped = half.slots.decode([0], [int(np.argmax(ours))], [len(prompt)])
        assert stepped.dtype == np.float32 and stepped.shape == (1, reference.shape[-1])
        tokens, summary = asyncio.run(_collect(half, _request(PROMPTS[1], max_tokens=6)))
        assert len(tokens) == summary.completion_tokens > 0
    finally:
        half.stop()
        full.stop()
