"""The quantizer on Mirador's fused llama graph (one fp32 table shared by the embedding and the head),
and the fleet recipe that builds the default per-layer quantized model through it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from services.common.model_repository import ModelRepository
from services.fleet.builder import BUILT, UP_TO_DATE, build_model as build_fleet_model
from services.fleet.recipes import SOURCE_QUANTIZED, Recipe
from services.model_host.answers import GenerationSummary, SamplingSettings, Timings, TokenEvent
from services.model_host.engine.kv_slots import SharedKVSlots
from services.model_host.engine import DecoderEngine, EngineSettings
from services.model_host.engine.sequence import GenerationRequest
from services.model_host.loader import SessionSettings, load_runtime
from services.quantizer.model import DecoderGraph, decoder_feeds
from services.quantizer.pipeline import QuantizeOptions, Quantizer
from services.quantizer.sensitivity import PackCache
from services.quantizer.writer import build_model, initializer_bytes
from tiny_models import build_tiny_fused_decoder

FAST = dict(windows=2, window_tokens=32, eval_windows=2, eval_tokens=32, search_steps=2, sweep_points=0)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp("quantizer-fused") / "models")
    return repository, build_tiny_fused_decoder(repository, "tiny-fused")


def _logits(model: onnx.ModelProto | str, windows: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["logits"], decoder_feeds(session, windows))[0]


def test_the_shared_table_becomes_an_embedding_layer_tied_to_the_head(fused):
    _, manifest = fused
    path = str(manifest.path_of("model"))
    decoder = DecoderGraph.load(path)
    gather = next(layer for layer in decoder.layers if layer.kind == "gather")
    head = next(layer for layer in decoder.layers if layer.tied_to)
    assert head.tied_to == gather.name and head.shape == gather.shape  # (hidden, vocab)
    assert (gather, head) in decoder.items()
    # the fp32 baseline is the source's one table, not two
    assert decoder.source_initializer_bytes == initializer_bytes(onnx.load(path))
    windows = np.random.default_rng(0).integers(3, 90, size=(2, 12))
    reference = _logits(path, windows)
    packs = PackCache(decoder, 32)
    both_fp32 = build_model(decoder, packs, {}, accuracy_level=0)
    assert initializer_bytes(both_fp32) == decoder.source_initializer_bytes  # written tied again
    np.testing.assert_allclose(_logits(both_fp32, windows), reference, rtol=1e-5, atol=1e-4)
    both_8 = build_model(decoder, packs, {gather.name: 8, head.name: 8}, accuracy_level=0)
    gbq = next(n for n in both_8.graph.node if n.op_type == "GatherBlockQuantized")
    mm = next(n for n in both_8.graph.node if n.op_type == "MatMulNBits")
    assert gbq.input[0] == mm.input[1]  # one packed copy shared by the embedding and the head
    logits = _logits(both_8, windows)
    assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()


def test_without_a_budget_the_smallest_mix_within_tolerance_is_written_and_served(fused, tmp_path):
    repository, manifest = fused
    quantizer = Quantizer(manifest)
    plan = quantizer.plan(QuantizeOptions(ppl_tolerance=0.02, **FAST))
    rows = {v.name: v for v in plan.variants}
    chosen = next(v for v in plan.variants if v.bits == plan.chosen and v.name == plan.chosen_name)
    limit = rows["fp32"].perplexity * 1.02
    assert chosen.perplexity <= limit
    # nothing measured within tolerance is smaller than what is written
    assert all(v.weight_bytes >= chosen.weight_bytes for v in plan.variants
               if v.perplexity <= limit and v.name != "fp32")
    assert "mixed@uniform-8-all-size" in rows
    assert plan.budget == {"smallest_within_perplexity": 0.02}

    written = quantizer.write(tmp_path, plan, "tiny-fused-mixed", "1")
    assert (tmp_path / "report.md").read_text().count(f"`{plan.chosen_name}` row") == 1
    assert (tmp_path / "size_vs_perplexity.png").stat().st_size > 0
    assert written.generation == manifest.generation  # same inputs, same shared-buffer KV cache
    assert written.extra["quantization"]["layer_bits"] == plan.chosen
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(manifest.path_of("model"))).graph.input]


def test_the_fleet_builds_the_quantized_recipe_once_and_the_host_engine_serves_it(fused):
    repository, manifest = fused
    recipe = Recipe(
        name="tiny-fused-mixed", version="1", task="text-generation", package="none", package_version="0",
        source_kind=SOURCE_QUANTIZED, source_path="-", export_task="mirador-quantizer/1", licence="Apache-2.0",
        depends_on=(manifest.name,), quantize={"ppl_tolerance": 0.02, **FAST})
    first = build_fleet_model(repository, recipe, cache_dir=repository.root / "cache", progress=False)
    assert first.status == BUILT, first.error
    built = first.manifest
    assert built.files["report"] == "report.md" and built.path_of("report").is_file()
    assert built.extra["quantization"]["source_model"] == manifest.reference
    assert built.extra["depends_on"]
    again = build_fleet_model(repository, recipe, cache_dir=repository.root / "cache", progress=False)
    assert again.status == UP_TO_DATE

    # the model host's batched engine serves it: shared-buffer KV slots, a greedy answer to the end
    engine = DecoderEngine("tiny-fused-mixed", load_runtime(built, SessionSettings()),
                           EngineSettings(max_num_seqs=2, max_context=128, prefill_chunk_tokens=8))
    try:
        assert isinstance(engine.slots, SharedKVSlots)

        async def ask():
            request = GenerationRequest("tiny-fused-mixed", "1", [("user", "hello there")], "",
                                        SamplingSettings(max_tokens=6), time.perf_counter(), Timings())
            return [event async for event in engine.generate(request)]

        events = asyncio.run(ask())
    finally:
        engine.stop()
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    summary = events[-1]
    assert isinstance(summary, GenerationSummary) and len(tokens) == summary.completion_tokens > 0
