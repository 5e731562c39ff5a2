"""The quantizer: knapsack, packing, the sensitivity probe, the writer, the pipeline on
a tiny real decoder, bad inputs, interruption, and the Quantize RPC on a real process."""

from __future__ import annotations

import itertools
import random
import shutil

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mirador.v1 import quantizer_pb2, quantizer_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from conftest import write_config
from services.cli.supervisor import Mesh
from services.common.config import load_config
from services.common.model_repository import STAGING_DIRNAME, ModelRepository
from services.model_host.loader import SessionSettings, load_runtime
from services.quantizer import allocation, quant
from services.quantizer.allocation import BudgetError, Option
from services.quantizer.model import DecoderGraph, NotADecoderError, decoder_feeds, log_softmax
from services.quantizer.pipeline import Cancelled, QuantizeOptions, Quantizer
from services.quantizer.sensitivity import PackCache, Prober, TextSource
from services.quantizer.writer import build_model, initializer_bytes, item_bytes
from tiny_models import build_tiny_decoder, build_tiny_encoder, decoder_forward, open_session

FAST = dict(windows=2, window_tokens=32, eval_windows=2, eval_tokens=32, search_steps=2, sweep_points=1)


# --------------------------------------------------------------------------- knapsack


def _random_items(rng: random.Random, n: int, integer: bool):
    items = []
    for _ in range(n):
        size = rng.randint(1, 40)
        costs = [32 * size, 8 * size + 3, 4 * size + 2, 2 * size + 1]
        if not integer:
            costs = [c + rng.random() for c in costs]
        kl2 = rng.random()
        penalties = [0.0, kl2 * rng.random() * 0.05, kl2 * rng.random() * 0.4, kl2]
        items.append([Option(b, c, p) for b, c, p in zip((0, 8, 4, 2), costs, penalties)])
    return items


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_equals_brute_force_on_integer_costs(seed):
    rng = random.Random(seed)
    items = _random_items(rng, rng.randint(1, 6), integer=True)
    lo, hi = sum(min(o.cost for o in it) for it in items), sum(max(o.cost for o in it) for it in items)
    budget = rng.uniform(lo, hi)
    solved = allocation.solve(items, budget, unit=1.0)
    best, _ = allocation.brute_force(items, budget)
    assert solved.penalty == pytest.approx(best, abs=1e-12)
    assert solved.cost <= budget


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_respects_the_budget_exactly_on_real_costs(seed):
    rng = random.Random(100 + seed)
    items = _random_items(rng, rng.randint(2, 6), integer=False)
    lo, hi = sum(min(o.cost for o in it) for it in items), sum(max(o.cost for o in it) for it in items)
    budget = rng.uniform(lo, hi)
    unit = rng.choice([1.0, 2.0, 5.0])
    solved = allocation.solve(items, budget, unit=unit)
    real = sum(items[i][j].cost for i, j in enumerate(solved.choice))
    assert real == pytest.approx(solved.cost) and real <= budget
    best, _ = allocation.brute_force(items, budget)
    assert solved.penalty >= best - 1e-12  # never better than the true optimum ...
    tighter = allocation.brute_force(items, budget - unit * len(items))
    if tighter is not None:  # ... and never worse than the optimum with one unit per item less room
        assert solved.penalty <= tighter[0] + 1e-12


@pytest.mark.parametrize("seed", range(20))
def test_dropping_dominated_options_changes_no_knapsack_solution(seed):
    """A searched code costs its plain code's bytes with less error: the plain one is dominated and
    dropped, and the exact knapsack's optimum over the pruned items equals brute force over all."""
    from services.quantizer.pipeline import _undominated

    assert [o.label for o in _undominated([Option("4", 10, 0.5), Option("4s", 10, 0.2), Option("8", 20, 0.01),
                                           Option("2", 5, 3.0), Option("2s", 5, 1.0), Option("4f", 12, 0.3)])] == [
        "2s", "4s", "8"]
    rng = random.Random(seed)
    items = [[Option(i, rng.randint(1, 6), round(rng.random(), 3)) for i in range(rng.randint(2, 5))]
             for _ in range(4)]
    budget = rng.randint(6, 20)
    best = brute_force_or_none(items, budget)
    pruned = [_undominated(options) for options in items]
    if best is None:
        with pytest.raises(BudgetError):
            allocation.solve(pruned, budget)
    else:
        assert allocation.solve(pruned, budget).penalty == pytest.approx(best)


def brute_force_or_none(items, budget):
    found = allocation.brute_force(items, budget)
    return None if found is None else found[0]


def test_knapsack_below_the_cheapest_choice_is_a_budget_error():
    items = [[Option(0, 100, 0), Option(2, 10, 1)]] * 3
    with pytest.raises(BudgetError, match="cheapest"):
        allocation.solve(items, 29.0)


# --------------------------------------------------------------------------- packing


def matmulnbits(packed, K: int, N: int, bits: int, block: int, a: np.ndarray) -> np.ndarray:
    """`a` times `packed` as ONNX Runtime's MatMulNBits computes it (one node, fp32 accumulation)."""
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "Z"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=0)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        initializer=[numpy_helper.from_array(packed.data, "B"), numpy_helper.from_array(packed.scales, "S"),
                     numpy_helper.from_array(packed.zero_points, "Z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("bits, K, N, block", [(8, 96, 40, 16), (4, 64, 48, 32), (2, 70, 24, 32), (4, 200, 3, 64)])
def test_packing_matches_what_matmulnbits_computes(bits, K, N, block):
    rng = np.random.default_rng(bits + K)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    packed = quant.pack(weight, bits, block)
    assert packed.nbytes == quant.quantized_bytes(K, N, bits, block)
    a = rng.standard_normal((5, K)).astype(np.float32)
    y = matmulnbits(packed, K, N, bits, block, a)
    np.testing.assert_allclose(y, a @ quant.dequantize(packed), atol=1e-4)
    error = np.abs(quant.dequantize(packed) - weight).mean() / np.abs(weight).mean()
    assert error < {8: 0.01, 4: 0.15, 2: 0.7}[bits]


@pytest.mark.parametrize("code, K, N, block", [(quant.Q4F, 64, 48, 32), (quant.Q4F, 200, 3, 64),
                                               (quant.Q2F, 70, 24, 32), (quant.Q2F, 96, 40, 16)])
def test_float_minimum_codes_are_what_matmulnbits_plus_block_offsets_compute(code, K, N, block):
    """MatMulNBits at its default zero point plus block_sum(x) @ offsets (the writer's form) computes
    x @ dequantize(packed); the bytes are `quantized_bytes`."""
    rng = np.random.default_rng(code + K)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    packed = quant.pack(weight, code, block)
    assert packed.code == code and packed.nbytes == quant.quantized_bytes(K, N, code, block)
    blocks = quant.k_blocks(K, block)
    indicator = np.repeat(np.eye(blocks, dtype=np.float32), block, axis=0)[:K]
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y0"], domain="com.microsoft", K=K, N=N,
                              bits=quant.nbits(code), block_size=block, accuracy_level=0),
             helper.make_node("MatMul", ["A", "I"], ["sums"]), helper.make_node("MatMul", ["sums", "O"], ["Y1"]),
             helper.make_node("Add", ["Y0", "Y1"], ["Y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
        initializer=[numpy_helper.from_array(packed.data, "B"), numpy_helper.from_array(packed.scales, "S"),
                     numpy_helper.from_array(indicator, "I"), numpy_helper.from_array(packed.offsets, "O")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    a = rng.standard_normal((5, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(y, a @ quant.dequantize(packed), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 2])
def test_float_minimum_search_beats_min_max_rounding_and_is_exact_on_a_q4_1_grid(bits):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((256, 64)).astype(np.float32)
    importance = rng.random(256).astype(np.float32) + 0.1

    def err(packed, a=None):
        a = np.ones(256, np.float32) if a is None else a
        return float(np.sum(a[:, None] * (quant.dequantize(packed) - weight) ** 2))

    plain = quant.pack_float_min(weight, bits, 32, steps=0)  # min/max rounding only
    searched = quant.pack_float_min(weight, bits, 32)
    weighted = quant.pack_float_min(weight, bits, 32, importance=importance)
    assert err(searched) < 0.95 * err(plain)
    assert err(weighted, importance) <= err(searched, importance) + 1e-6
    assert err(quant.pack(weight, bits, 32)) > err(searched)  # integer zero point, ORT's RTN
    # Weights on a Q4_1 grid (w = d q + m, q in 0..15, as SmolLM2's GGUF stores them): 4f is exact.
    d, m = rng.random((64, 8, 1)) * 0.01, -rng.random((64, 8, 1)) * 0.05
    q = rng.integers(0, 16, (64, 8, 32))
    q[:, :, 0], q[:, :, 1] = 0, 15
    grid = np.ascontiguousarray((d * q + m).reshape(64, 256).T.astype(np.float32))
    if bits == 4:
        assert np.abs(quant.dequantize(quant.pack(grid, quant.Q4F, 32)) - grid).max() < 1e-6
        assert np.abs(quant.dequantize(quant.pack(grid, 4, 32)) - grid).max() > 1e-4


@pytest.mark.parametrize("code, K, N, block", [(quant.Q4S, 64, 48, 32), (quant.Q4S, 200, 3, 64),
                                               (quant.Q2S, 70, 24, 32), (quant.Q2S, 96, 40, 16)])
def test_searched_codes_are_ort_packing_that_matmulnbits_computes_with_less_weighted_error(code, K, N, block):
    """4s/2s: the bytes and node of ORT's 4/2-bit (integer zero points), what MatMulNBits computes is
    x @ dequantize(packed), and the activation-weighted error is below ORT's RTN (never above)."""
    rng = np.random.default_rng(code + K)
    weight = rng.standard_normal((K, N)).astype(np.float32)
    weight[rng.integers(0, K, 3), rng.integers(0, N, 3)] *= 6  # a few outliers, as real weights have
    importance = (rng.random(K) ** 3 + 0.01).astype(np.float32)
    bits = quant.nbits(code)
    packed = quant.pack_searched(weight, bits, block, importance)
    assert packed.code == code and quant.code_name(code) == f"{bits}s"
    assert packed.nbytes == quant.quantized_bytes(K, N, code, block) == quant.quantized_bytes(K, N, bits, block)
    a = rng.standard_normal((5, K)).astype(np.float32)
    y = matmulnbits(packed, K, N, bits, block, a)
    np.testing.assert_allclose(y, a @ quant.dequantize(packed), atol=1e-3, rtol=1e-4)

    def err(p):
        return float(np.sum(importance[:, None] * (quant.dequantize(p) - weight) ** 2))

    rtn = quant.pack(weight, bits, block)
    assert err(packed) < 0.9 * err(rtn)
    assert err(quant.pack_searched(weight, bits, block, importance, steps=0)) == pytest.approx(err(rtn), rel=1e-5)


def test_searched_code_on_a_q4_1_grid_beats_rtn_and_the_embedding_shares_it_with_the_head():
    """On weights dequantized from Q4_1 (SmolLM2's case: a float minimum RTN's integer zero point misses),
    4s has less error than RTN, and a table packed at 4s reads back through GatherBlockQuantized."""
    rng = np.random.default_rng(7)
    d, m = rng.random((64, 8, 1)) * 0.01 + 1e-3, -rng.random((64, 8, 1)) * 0.05
    q = rng.integers(0, 16, (64, 8, 32))
    grid = np.ascontiguousarray((d * q + m).reshape(64, 256).T.astype(np.float32))
    rtn, searched = quant.pack(grid, 4, 32), quant.pack(grid, quant.Q4S, 32)
    assert np.sum((quant.dequantize(searched) - grid) ** 2) < 0.8 * np.sum((quant.dequantize(rtn) - grid) ** 2)
    data, scales, zero_points = quant.gather_arrays(searched)
    assert data is searched.data and data.nbytes + scales.nbytes + zero_points.nbytes == quant.gather_bytes(
        256, 64, quant.Q4S, 32)


@pytest.mark.parametrize("bits, block", [(8, 16), (8, 32), (4, 32), (4, 64), (2, 32), (2, 128)])
def test_gather_block_quantized_reads_the_transposed_packing(bits, block):
    """GatherBlockQuantized (uint8, 3-D [V, H/b, b] form) over the MatMulNBits packing of E^T returns
    exactly the dequantized rows; its bytes are `gather_bytes`; a MatMulNBits can share its data."""
    rng = np.random.default_rng(bits * block)
    V, H = 40, 256
    table = rng.standard_normal((V, H)).astype(np.float32)
    packed = quant.pack(np.ascontiguousarray(table.T), bits, block)
    data, scales, zero_points = quant.gather_arrays(packed)
    assert data.nbytes + scales.nbytes + zero_points.nbytes == quant.gather_bytes(H, V, bits, block)
    assert scales.nbytes + zero_points.nbytes == quant.gather_bytes(H, V, bits, block, share_data=True)
    nodes = [
        helper.make_node("GatherBlockQuantized", ["D", "I", "S", "Z"], ["G"], domain="com.microsoft",
                         bits=bits, block_size=block, gather_axis=0, quantize_axis=2),
        helper.make_node("Shape", ["I"], ["shape_i"]),
        helper.make_node("Constant", [], ["width"], value=numpy_helper.from_array(np.array([H], np.int64))),
        helper.make_node("Concat", ["shape_i", "width"], ["shape"], axis=0),
        helper.make_node("Reshape", ["G", "shape"], ["X"]),
        helper.make_node("MatMulNBits", ["X", "D", "MS", "MZ"], ["Y"], domain="com.microsoft",
                         K=H, N=V, bits=bits, block_size=block, accuracy_level=0),  # shares D with the Gather
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("I", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None), helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(data, "D"), numpy_helper.from_array(scales, "S"),
                     numpy_helper.from_array(zero_points, "Z"), numpy_helper.from_array(packed.scales, "MS"),
                     numpy_helper.from_array(packed.zero_points, "MZ")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    indices = rng.integers(0, V, size=(3, 5)).astype(np.int64)
    x, y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"I": indices})
    reference = quant.dequantize(packed).T  # [V, H]
    np.testing.assert_array_equal(x, reference[indices])
    np.testing.assert_allclose(y, reference[indices] @ reference.T, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------- tiny decoder


def _tie_head(repository: ModelRepository, source, name: str):
    """The tiny decoder with its lm_head replaced by the transpose of the embedding table (tied, as in SmolLM2)."""
    model = onnx.load(str(source.path_of("model")))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    head = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits][-1]
    table = gather.input[0]
    transpose = helper.make_node("Transpose", [table], ["tied_head_weight"], name="/lm_head/Transpose", perm=[1, 0])
    old_weight, head.input[1] = head.input[1], "tied_head_weight"
    graph.node.insert(list(graph.node).index(head), transpose)
    graph.initializer.remove(inits[old_weight])

    def build(folder):
        onnx.save(model, str(folder / "model.onnx"))
        shutil.copyfile(source.path_of("tokenizer"), folder / "tokenizer.json")
        return type(source)(name=name, version="1", task=source.task, files=dict(source.files),
                            architecture=source.architecture, source=source.source, licence=source.licence,
                            generation=source.generation, extra=source.extra)

    return repository.write_version(name, "1", build)


@pytest.fixture(scope="module")
def tied(tiny):
    repository, manifest = tiny
    return repository, _tie_head(repository, manifest, "tiny-tied")




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    repository = ModelRepository(tmp_path_factory.mktemp("quantizer") / "models")
    # MatMulNBits wants K a multiple of the block: hidden 64, MLP 256.
    manifest = build_tiny_decoder(repository, "tiny-lm", kv_heads=2, head_dim=32, num_layers=2)
    return repository, manifest


def test_probe_equals_quantizing_that_layer_by_rebuilding_the_model(tiny):
    _, manifest = tiny
    decoder = DecoderGraph.load(manifest.path_of("model"))
    packs = PackCache(decoder, 32)
    windows = np.random.default_rng(0).integers(3, 200, size=(2, 24))
    prober = Prober(decoder, windows)
    layer = decoder.layers[4]
    probed = prober.logits({layer.name: packs.fake(layer, 4)})
    rebuilt = build_model(decoder, packs, {layer.name: 4}, accuracy_level=0)  # exact int math, no int8 activations
    session = ort.InferenceSession(rebuilt.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], decoder_feeds(session, windows))[0]
    np.testing.assert_allclose(probed, logits, atol=2e-3, rtol=1e-4)
    ref = log_softmax(prober.logits({}))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - log_softmax(logits)), -1)))
    assert prober.kl({layer.name: packs.fake(layer, 4)}) == pytest.approx(kl, rel=1e-3, abs=1e-7)
    assert kl > 0


def test_eight_bit_model_is_registered_loads_and_stays_close_to_fp32(tiny):
    repository, manifest = tiny
    quantizer = Quantizer(manifest)
    result = quantizer.run(repository, QuantizeOptions(budget_bits=8.0, output_name="tiny-lm-q8", **FAST))
    published = result.manifest
    assert published.reference == "tiny-lm-q8:1" and repository.get("tiny-lm-q8").version == "1"
    layer_bits = published.extra["quantization"]["layer_bits"]
    assert set(layer_bits.values()) == {8}  # 8 bits everywhere costs exactly the budget and beats 4/2
    assert published.generation == manifest.generation
    model = onnx.load(str(published.path_of("model")))
    assert {n.op_type for n in model.graph.node} >= {"MatMulNBits"}
    assert all(dict((a.name, helper.get_attribute_value(a)) for a in n.attribute)["accuracy_level"] == 4
               for n in model.graph.node if n.op_type == "MatMulNBits")
    assert initializer_bytes(model) == quantizer.weight_bytes(layer_bits)
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(str(manifest.path_of("model"))).graph.input]
    # The model host loads it like any model, and its logits stay close to fp32.
    runtime = load_runtime(published, SessionSettings())
    prompt = [1, 40, 50, 60, 70, 80, 90]
    _, logits = runtime.prefill(prompt)
    reference, _ = decoder_forward(open_session(manifest), [prompt])
    assert np.abs(logits - reference[0, -1]).max() < 0.05 * np.abs(reference[0, -1]).max()
    assert int(np.argmax(logits)) == int(np.argmax(reference[0, -1]))
    assert result.report_path.is_file() and result.plot_path.is_file()
    assert "| fp32 |" in result.report_path.read_text()
    names = [v.name for v in result.variants]
    assert names[:4] == ["fp32", "uniform-8", "uniform-4", "mixed@uniform-4-size"]


def test_budget_in_mb_is_respected_on_disk(tiny):
    repository, manifest = tiny
    quantizer = Quantizer(manifest)
    result = quantizer.run(repository, QuantizeOptions(budget_mb=0.70, output_name="tiny-lm-mb", **FAST))
    size = result.manifest.path_of("model").stat().st_size
    assert size <= 0.70e6
    bits = result.manifest.extra["quantization"]["layer_bits"]
    assert len(set(bits.values())) > 1  # mixed


def test_tied_head_is_untied_and_every_embedding_head_choice_is_written_exactly(tied):
    """Embedding (Gather) x tied lm_head at fp32/8/4/2/4s/2s: exact initializer bytes, fp32/fp32 written tied
    (the source's size, the source's logits), same bits share the packed data, and the probe (tables
    fed as graph inputs) computes what the written model computes."""
    _, manifest = tied
    decoder = DecoderGraph.load(manifest.path_of("model"))
    emb = next(layer for layer in decoder.layers if layer.kind == "gather")
    head = next(layer for layer in decoder.layers if layer.tied_to)
    assert head.tied_to == emb.name and head.shape == emb.shape and (emb, head) in decoder.items()
    assert len(decoder.items()) == len(decoder.layers) - 1
    packs = PackCache(decoder, 32)
    windows = np.random.default_rng(1).integers(3, 200, size=(2, 16))
    prober = Prober(decoder, windows)
    source = open_session(manifest)
    reference = source.run(["logits"], decoder_feeds(source, windows))[0]
    np.testing.assert_allclose(prober.logits({}), reference, rtol=1e-5, atol=1e-4)
    for e, h in itertools.product((0, 8, 4, 2, quant.Q4S, quant.Q2S), repeat=2):
        bits = {emb.name: e, head.name: h}
        model = build_model(decoder, packs, bits, accuracy_level=0)
        assert initializer_bytes(model) == quantizer_bytes(decoder, bits), (e, h)
        assert quantizer_bytes(decoder, bits) - quantizer_bytes(decoder, {}) == (
            item_bytes(decoder, (emb, head), (e, h), 32) - 4 * emb.numel)
        ops = [n.op_type for n in model.graph.node]
        retied = any(n.op_type == "Transpose" and n.input[0] == emb.name for n in model.graph.node)
        assert ("GatherBlockQuantized" in ops) == (e != 0) and retied == (h == 0)
        if e == h == 0:
            assert initializer_bytes(model) == decoder.source_initializer_bytes
        if e == h != 0:
            gbq = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
            mm = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
            assert gbq.input[0] == mm.input[1]  # one packed copy of the table
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], decoder_feeds(session, windows))[0]
        replacements = {layer.name: packs.fake(layer, b) for layer, b in ((emb, e), (head, h)) if b}
        np.testing.assert_allclose(prober.logits(replacements), logits, atol=2e-3, rtol=1e-4)
        if e == h == 0:
            np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-4)
        if e == h == 8:
            assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max()
    assert prober.kl({emb.name: packs.fake(emb, 2)}) > prober.kl({emb.name: packs.fake(emb, 4)}) > 0


def test_float_minimum_layers_are_written_exactly_and_compute_what_the_probe_feeds(tied):
    """Every MatMul at 4f or 2f (the head too, beside an integer-coded or fp32 embedding): exact initializer
    bytes (one block-sum indicator per K, one block sum per input), and the written model computes what
    the probe computes with the dequantized weights."""
    _, manifest = tied
    decoder = DecoderGraph.load(manifest.path_of("model"))
    packs = PackCache(decoder, 32)
    windows = np.random.default_rng(2).integers(3, 200, size=(2, 16))
    prober = Prober(decoder, windows)
    emb = next(layer for layer in decoder.layers if layer.kind == "gather")
    matmuls = [layer for layer in decoder.layers if layer.kind == "matmul"]
    for code, emb_code in ((quant.Q4F, 4), (quant.Q2F, 0), (quant.Q4F, 8)):
        bits = {**{layer.name: code for layer in matmuls}, emb.name: emb_code}
        bits[matmuls[1].name] = 4  # an integer-coded neighbour reading the same input as a float-minimum one
        model = build_model(decoder, packs, bits, accuracy_level=0)
        assert initializer_bytes(model) == quantizer_bytes(decoder, bits), code
        ops = [n.op_type for n in model.graph.node]
        inputs = {layer.node: next(n for n in decoder.model.graph.node if n.name == layer.node).input[0]
                  for layer in matmuls if bits[layer.name] == code}
        assert ops.count("MatMulNBits") == len(matmuls) and ops.count("Add") >= len(inputs)
        block_sums = [n for n in model.graph.node if n.name.endswith("/block_sum")]
        assert len(block_sums) == len(set(inputs.values()))  # one per input, shared
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], decoder_feeds(session, windows))[0]
        replacements = {name: packs.fake(decoder.layer(name), b) for name, b in bits.items() if b}
        np.testing.assert_allclose(prober.logits(replacements), logits, atol=2e-3, rtol=1e-4)


def quantizer_bytes(decoder, bits):
    from services.quantizer.writer import predicted_weight_bytes

    return predicted_weight_bytes(decoder, bits, 32)


def test_tied_eight_bit_run_quantizes_the_embedding_and_loads_in_the_model_host(tied):
    repository, manifest = tied
    quantizer = Quantizer(manifest)
    result = quantizer.run(repository, QuantizeOptions(budget_bits=8.0, output_name="tiny-tied-q8", **FAST))
    layer_bits = result.manifest.extra["quantization"]["layer_bits"]
    assert set(layer_bits.values()) == {8} and len(layer_bits) == len(quantizer.decoder.layers)
    model = onnx.load(str(result.manifest.path_of("model")))
    ops = {n.op_type for n in model.graph.node}
    assert {"GatherBlockQuantized", "MatMulNBits"} <= ops and "Gather" not in {
        n.op_type for n in model.graph.node if "input_ids" in n.input}
    assert initializer_bytes(model) == quantizer.weight_bytes(layer_bits)
    source_bytes = initializer_bytes(onnx.load(str(manifest.path_of("model"))))
    assert quantizer.decoder.source_initializer_bytes == source_bytes
    assert result.variants[0].weight_bytes == source_bytes  # the fp32 baseline is the tied source
    runtime = load_runtime(result.manifest, SessionSettings())
    prompt = [1, 40, 50, 60, 70, 80, 90]
    _, logits = runtime.prefill(prompt)
    reference, _ = decoder_forward(open_session(manifest), [prompt])
    assert np.abs(logits - reference[0, -1]).max() < 0.05 * np.abs(reference[0, -1]).max()
    assert int(np.argmax(logits)) == int(np.argmax(reference[0, -1]))
    names = [v.name for v in result.variants]
    assert names[:8] == ["fp32", "uniform-8", "uniform-4", "mixed@uniform-4-size", "uniform-8-all",
                         "uniform-4-all", "uniform-4s-all", "mixed@uniform-4-all-size"]


def test_byte_budgets_with_the_embedding_and_tied_head_are_exact(tied, tmp_path):
    _, manifest = tied
    quantizer = Quantizer(manifest)
    windows = quantizer.windows(TextSource.packaged("calibration.txt"), 2, 32)
    quantizer.analyze(windows)
    decoder = quantizer.decoder
    smallest = quantizer.weight_bytes(quantizer.uniform_all_bits(2))
    largest = decoder.source_initializer_bytes
    assert quantizer.weight_bytes({layer.name: 0 for layer in decoder.layers}) == largest
    fixed = decoder.initializer_bytes(exclude=decoder.weight_names())
    for fraction in (0.0, 0.1, 0.25, 0.4, 0.6, 1.0):
        budget = smallest + fraction * (largest - smallest)
        bits = quantizer.allocate_bytes(budget)
        assert quantizer.weight_bytes(bits) <= budget
        model = build_model(decoder, quantizer.packs, bits)
        assert initializer_bytes(model) == quantizer.weight_bytes(bits)
        path = tmp_path / f"m{fraction}.onnx"
        onnx.save(model, str(path))
        assert path.stat().st_size <= quantizer.size_on_disk(quantizer.weight_bytes(bits), len(decoder.layers))
    assert set(quantizer.allocate_bytes(largest + 1024 * len(decoder.items())).values()) == {0}  # unit slack
    with pytest.raises(BudgetError):
        quantizer.allocate_bytes(smallest - 1)
    # The measured-interaction re-solve: within budget, never worse than round 0 by its own measure.
    budget = smallest + 0.15 * (largest - smallest)
    log: list = []
    calibrated = quantizer.allocate_calibrated(budget, rounds=2, log=log)
    assert quantizer.weight_bytes(calibrated) <= budget and log and log[0]["applied"] == {}
    assert quantizer.joint_kl(calibrated) == pytest.approx(min(r["joint"] for r in log))
    assert log[0]["predicted"] == pytest.approx(quantizer.predicted_kl(quantizer.allocate_bytes(budget)))
    assert quantizer.interaction == {}
    # Optimal among fp32/4-bit choices: brute force over the same items (the pair as one item).
    items = [options for _, options in quantizer._items((0, 4), lambda item, combo: item_bytes(
        decoder, item, combo, 32))]
    smallest = quantizer.weight_bytes(quantizer.uniform_all_bits(4))
    for fraction in (0.05, 0.3, 0.7):
        budget = smallest + fraction * (largest - smallest)
        solved = allocation.solve(items, budget - fixed, unit=1024.0)
        best = allocation.brute_force(items, budget - fixed)
        assert best is not None and solved.penalty >= best[0] - 1e-12
        tighter = allocation.brute_force(items, budget - fixed - 1024.0 * len(items))
        if tighter is not None:
            assert solved.penalty <= tighter[0] + 1e-12


def test_a_second_run_gets_the_next_version(tiny):
    repository, manifest = tiny
    options = QuantizeOptions(budget_bits=4.0, output_name="tiny-lm-v", **FAST)
    Quantizer(manifest).run(repository, options)
    Quantizer(manifest).run(repository, options)
    assert repository.versions("tiny-lm-v") == ["1", "2"]


def test_bad_inputs_have_clear_errors(tiny, tmp_path):
    repository, manifest = tiny
    quantizer = Quantizer(manifest)
    with pytest.raises(BudgetError, match="below the smallest"):
        quantizer.run(repository, QuantizeOptions(budget_mb=0.3, output_name="tiny-lm-small", **FAST))
    with pytest.raises(ValueError, match="tokens"):
        quantizer.run(repository, QuantizeOptions(budget_bits=4, calibration=TextSource("short", "hi"), **FAST))
    encoder = build_tiny_encoder(ModelRepository(tmp_path / "models"), "tiny-embed")
    with pytest.raises(NotADecoderError, match="not a decoder"):
        Quantizer(encoder)
    assert not repository.exists("tiny-lm-small")


@pytest.mark.parametrize("stop_in", ["sensitivity", "evaluation", "writing"])
def test_an_interrupted_run_registers_nothing(tiny, stop_in):
    repository, manifest = tiny
    seen = []

    def progress(phase, step, total, layer):
        seen.append(phase)

    def should_stop():
        return stop_in in seen

    with pytest.raises(Cancelled):
        Quantizer(manifest).run(repository, QuantizeOptions(budget_bits=4, output_name="tiny-lm-stop", **FAST),
                                progress, should_stop)
    assert not repository.exists("tiny-lm-stop")
    assert not list((repository.root / STAGING_DIRNAME).iterdir())


# --------------------------------------------------------------------------- the service


FLEET = """
fleet:
  tiny-lm: {task: text-generation, tier: hot}
  tiny-embed: {task: embedding, tier: hot}
  missing-lm: {task: text-generation, tier: cold}
routes:
  chat: {primary: tiny-lm}
"""


@pytest.fixture(scope="module")
def quantizer_process(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qservice")
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "tiny-lm", kv_heads=2, head_dim=32, num_layers=2)
    build_tiny_encoder(repository, "tiny-embed")
    (directory / "models" / "calibration").mkdir()
    (directory / "models" / "calibration" / "text.txt").write_text(TextSource.packaged("heldout.txt").text)
    (directory / "outside.txt").write_text("some text " * 200)
    mesh = Mesh(load_config(write_config(directory, body=FLEET)), log_dir=directory / "logs", services=("quantizer",))
    mesh.start()
    try:
        with grpc.insecure_channel(mesh.config.services.quantizer.address) as channel:
            yield quantizer_pb2_grpc.QuantizerStub(channel), repository, directory
    finally:
        mesh.stop()


def test_quantize_rpc_streams_progress_then_a_report(quantizer_process):
    stub, repository, _ = quantizer_process
    request = quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_bits_per_weight=4.5,
                                            calibration_path="calibration/text.txt")
    events = list(stub.Quantize(request, timeout=120))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "report" and kinds.count("report") == 1 and kinds.count("progress") >= 14
    phases = [e.progress.phase for e in events[:-1]]
    assert phases[0] == "sensitivity" and "allocation" in phases and phases[-1] == "writing"
    sensitivity = [e.progress for e in events[:-1] if e.progress.phase == "sensitivity"]
    assert sensitivity[-1].step == sensitivity[-1].total == 14 and all(p.elapsed_s >= 0 for p in sensitivity)
    report = events[-1].report
    assert (report.output_model, report.output_version) == ("tiny-lm-mixed", "1")
    assert repository.get("tiny-lm-mixed").extra["quantization"]["source_model"] == "tiny-lm:1"
    assert len(report.layers) == 14 and all({s.bits for s in layer.sensitivities} == {8, 4, 2} for layer in report.layers)
    assert {v.name for v in report.variants} >= {"fp32", "uniform-8", "uniform-4", "mixed@uniform-4-size"}
    assert "calibration/text.txt" in report.calibration and report.report_path.endswith("report.md")


def test_analyze_rpc_returns_sensitivities_only(quantizer_process):
    stub, repository, _ = quantizer_process
    before = repository.model_names()
    reply = stub.Analyze(quantizer_pb2.AnalyzeRequest(model="tiny-lm", bits=[4, 2]), timeout=60)
    assert len(reply.layers) == 14 and all(layer.bits == 0 for layer in reply.layers)
    assert all([s.bits for s in layer.sensitivities] == [4, 2] for layer in reply.layers)
    assert all(layer.sensitivities[0].kl < layer.sensitivities[1].kl for layer in reply.layers)
    assert repository.model_names() == before


@pytest.mark.parametrize("request_, code, phrase", [
    (quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=0.2), grpc.StatusCode.INVALID_ARGUMENT, "below the smallest"),
    (quantizer_pb2.QuantizeRequest(model="tiny-embed", budget_mb=1), grpc.StatusCode.INVALID_ARGUMENT, "measures decoders"),
    (quantizer_pb2.QuantizeRequest(model="missing-lm", budget_mb=1), grpc.StatusCode.FAILED_PRECONDITION, "mirador fleet build"),
    (quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=1, calibration_path="nope.txt"), grpc.StatusCode.NOT_FOUND, "no such file"),
    (quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=1, calibration_path="../outside.txt"), grpc.StatusCode.INVALID_ARGUMENT, "outside the model repository"),
    (quantizer_pb2.QuantizeRequest(model="tiny-lm", budget_mb=1, calibration_path="/etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "outside the model repository"),
])
def test_quantize_rpc_bad_inputs(quantizer_process, request_, code, phrase):
    stub, repository, _ = quantizer_process
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Quantize(request_, timeout=60))
    assert caught.value.code() == code, caught.value.details()
    assert phrase in caught.value.details()
    assert not repository.exists("tiny-lm-mixed") or repository.versions("tiny-lm-mixed") == ["1"]


def test_a_budget_is_never_answered_worse_than_a_uniform_allocation_within_it(tied):
    """On the calibration windows, what is written for a budget moves the output no more than any
    uniform allocation within the same budget (the report says which won and by how much)."""
    repository, manifest = tied
    quantizer = Quantizer(manifest)
    result = quantizer.run(repository, QuantizeOptions(budget_bits=4.0, output_name="tiny-tied-b4", **FAST))
    written = result.manifest.extra["quantization"]["layer_bits"]
    assert quantizer.mean_bits(written) <= 4.0
    # --budget-bits 4 is uniform-4-all's size: the mix is compared at equal size
    assert quantizer.weight_bytes(written) <= quantizer.weight_bytes(quantizer.uniform_all_bits(4))
    for bits in (quantizer.uniform_all_bits(4), quantizer.uniform_all_bits(quant.Q4S), quantizer.uniform_all_bits(2),
                 quantizer.uniform_all_bits(quant.Q2S)):
        if quantizer.mean_bits(bits) <= 4.0:
            assert quantizer.joint_kl(written) <= quantizer.joint_kl(bits) + 1e-12
    assert "Never worse than uniform" in result.report_path.read_text()


def test_a_mix_that_measures_worse_than_uniform_in_its_budget_is_replaced_and_the_report_says_so(tied):
    _, manifest = tied
    quantizer = Quantizer(manifest)
    quantizer.analyze(quantizer.windows(TextSource.packaged("calibration.txt"), 2, 32), measure=(4, 2))
    u4_all = quantizer.uniform_all_bits(4)
    # a poor mix of the same nominal size: half the weights at 2 bits, the largest layers at 8
    layers = sorted(quantizer.decoder.layers, key=lambda layer: layer.numel, reverse=True)
    poor = {layer.name: 2 for layer in layers}
    for layer in layers:
        trial = {**poor, layer.name: 8}
        if quantizer.mean_bits(trial) <= 4.0:
            poor = trial
    assert quantizer.mean_bits(poor) <= 4.0 and quantizer.joint_kl(poor) > quantizer.joint_kl(u4_all)
    bits, name, notes = quantizer.never_worse_than_uniform(poor, "poor-mix", QuantizeOptions(budget_bits=4.0),
                                                           {"uniform-4-all": u4_all})
    assert bits == u4_all and name == "uniform-4-all (within the budget)"
    assert "uniform-4-all is what was written" in notes[0] and "poor-mix" in notes[0]
    kept, kept_name, _ = quantizer.never_worse_than_uniform(u4_all, "a-good-mix", QuantizeOptions(budget_bits=4.0),
                                                            {"uniform-4-all": u4_all})
    assert kept_name == "a-good-mix"  # a tie keeps the mix
