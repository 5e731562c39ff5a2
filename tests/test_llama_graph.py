"""The fused llama graph builder on a tiny random model (no GGUF file, no torch):
the graph against a numpy reference forward, KV-cache consistency, right-padded
batches, and the quantized variants."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from services.fleet.gguf_weights import BlockQuantized, LlamaHParams
from services.fleet.llama_graph import build_llama_model, quantize_blocks

HP = LlamaHParams(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64)


def _gguf_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permute of q/k rows (HF rotate-half → interleaved)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q8_0(w: np.ndarray) -> BlockQuantized:
    blocks = w.reshape(w.shape[0], -1, 32)
    scale = (np.abs(blocks).max(-1) / 127).astype(np.float32)
    codes = np.round(blocks / scale[..., None]).astype(np.int8)
    return BlockQuantized("Q8_0", scale, codes)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(7)
    d, f = HP.hidden_size, HP.intermediate_size
    hf = {"embed": _q8_0(rng.normal(0, 0.5, (HP.vocab_size, d)).astype(np.float32)).dense(),
          "final_norm": (1 + 0.1 * rng.normal(size=d)).astype(np.float32)}
    gguf = {"token_embd.weight": _q8_0(hf["embed"]), "output_norm.weight": hf["final_norm"]}
    for i in range(HP.num_layers):
        w = lambda *shape: rng.normal(0, 0.15, shape).astype(np.float32)
        layer = {"q": w(HP.q_size, d), "k": w(HP.kv_size, d), "v": w(HP.kv_size, d), "o": w(d, HP.q_size),
                 "gate": w(f, d), "up": w(f, d), "down": w(d, f),
                 "n1": (1 + 0.1 * rng.normal(size=d)).astype(np.float32),
                 "n2": (1 + 0.1 * rng.normal(size=d)).astype(np.float32)}
        hf[i] = layer
        p = f"blk.{i}"
        gguf.update({
            f"{p}.attn_q.weight": _gguf_permute(layer["q"], HP.num_heads),
            f"{p}.attn_k.weight": _gguf_permute(layer["k"], HP.num_kv_heads),
            f"{p}.attn_v.weight": layer["v"], f"{p}.attn_output.weight": layer["o"],
            f"{p}.ffn_gate.weight": layer["gate"], f"{p}.ffn_up.weight": layer["up"],
            f"{p}.ffn_down.weight": layer["down"],
            f"{p}.attn_norm.weight": layer["n1"], f"{p}.ffn_norm.weight": layer["n2"],
        })
    return hf, gguf


def _reference_logits(hf, ids: list[int]) -> np.ndarray:
    """Hugging Face LlamaForCausalLM's forward in numpy (rotate-half rotary, tied lm_head)."""
    def rms(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + HP.rms_norm_eps) * g

    n, h, kvh = len(ids), HP.head_dim, HP.num_kv_heads
    inv = 1.0 / HP.rope_theta ** (np.arange(0, h, 2) / h)
    ang = np.outer(np.arange(n), inv)
    cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)

    def rope(x):  # [heads, n, h]
        rot = np.concatenate([-x[..., h // 2:], x[..., : h // 2]], -1)
        return x * cos + rot * sin

    x = hf["embed"][ids].astype(np.float64)
    for i in range(HP.num_layers):
        L = hf[i]
        y = rms(x, L["n1"])
        q = rope((y @ L["q"].T).reshape(n, HP.num_heads, h).transpose(1, 0, 2))
        k = rope((y @ L["k"].T).reshape(n, kvh, h).transpose(1, 0, 2))
        v = (y @ L["v"].T).reshape(n, kvh, h).transpose(1, 0, 2)
        group = HP.num_heads // kvh
        k, v = np.repeat(k, group, 0), np.repeat(v, group, 0)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(h) + np.triu(np.full((n, n), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + (probs @ v).transpose(1, 0, 2).reshape(n, -1) @ L["o"].T
        y = rms(x, L["n2"])
        gate = y @ L["gate"].T
        x = x + ((gate / (1 + np.exp(-gate))) * (y @ L["up"].T)) @ L["down"].T
    return rms(x, hf["final_norm"]) @ hf["embed"].T


def _session(model):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _empty_past(batch: int = 1) -> dict[str, np.ndarray]:
    return {f"past_key_values.{i}.{kind}": np.zeros((batch, HP.num_kv_heads, 0, HP.head_dim), np.float32)
            for i in range(HP.num_layers) for kind in ("key", "value")}


def _run(session, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]):
    names = [o.name for o in session.get_outputs()]
    keep = np.asarray([ids.shape[1]], np.int64)  # every position's logits
    outputs = session.run(names, {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep, **past})
    presents = {name.replace("present.", "past_key_values."): value for name, value in zip(names[1:], outputs[1:])}
    return outputs[0], presents


@pytest.fixture(scope="module")
def fp32_session(tiny):
    return _session(build_llama_model(HP, tiny[1], 32))


IDS = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71]


def test_fp32_graph_matches_numpy_reference(tiny, fp32_session):
    ids = np.asarray([IDS], np.int64)
    logits, presents = _run(fp32_session, ids, np.ones_like(ids), _empty_past())
    np.testing.assert_allclose(logits[0], _reference_logits(tiny[0], IDS), atol=2e-4, rtol=1e-4)
    assert presents["past_key_values.1.value"].shape == (1, HP.num_kv_heads, len(IDS), HP.head_dim)


def test_prefill_then_steps_equal_full_sequence(tiny, fp32_session):
    full = _reference_logits(tiny[0], IDS)
    ids = np.asarray([IDS[:6]], np.int64)
    logits, past = _run(fp32_session, ids, np.ones_like(ids), _empty_past())
    np.testing.assert_allclose(logits[0], full[:6], atol=2e-4, rtol=1e-4)
    for position in range(6, len(IDS)):
        step = np.asarray([[IDS[position]]], np.int64)
        logits, past = _run(fp32_session, step, np.ones((1, position + 1), np.int64), past)
        np.testing.assert_allclose(logits[0, 0], full[position], atol=2e-4, rtol=1e-4)
    # A multi-token chunk after a cache (GroupQueryAttention's "subsequent prompt").
    ids = np.asarray([IDS[:4]], np.int64)
    _, past = _run(fp32_session, ids, np.ones_like(ids), _empty_past())
    logits, _ = _run(fp32_session, np.asarray([IDS[4:]], np.int64), np.ones((1, len(IDS)), np.int64), past)
    np.testing.assert_allclose(logits[0], full[4:], atol=2e-4, rtol=1e-4)


def _padded_options(prefix_len: int, options: list[list[int]]):
    width = max(map(len, options))
    batch_ids = np.zeros((len(options), width), np.int64)
    mask = np.zeros((len(options), prefix_len + width), np.int64)
    mask[:, :prefix_len] = 1
    for row, option in enumerate(options):
        batch_ids[row, : len(option)] = option
        mask[row, prefix_len: prefix_len + len(option)] = 1
    return batch_ids, mask


def test_option_rows_after_shared_prefill(tiny, fp32_session):
    """score_options' inputs: option rows on the prompt's cache.

    GroupQueryAttention (onnxruntime 1.31 CPU) refuses batch > 1 with several new
    tokens on a non-empty cache, so such rows run one at a time, unpadded, or step in lockstep (the graph
    reads each row's length from its mask's sum: padding after new tokens would be
    taken for part of the past)."""
    prefix, options = IDS[:5], [[40, 41, 42, 43], [50], [60, 61]]
    ids = np.asarray([prefix], np.int64)
    _, past = _run(fp32_session, ids, np.ones_like(ids), _empty_past())
    batch_ids, mask = _padded_options(len(prefix), options)
    batch_past = {name: np.repeat(value, len(options), 0) for name, value in past.items()}
    with pytest.raises(Exception, match="batch_size must be 1"):
        _run(fp32_session, batch_ids, mask, batch_past)
    for option in options:
        row = np.asarray([option], np.int64)
        logits, _ = _run(fp32_session, row, np.ones((1, len(prefix) + len(option)), np.int64), past)
        expected = _reference_logits(tiny[0], prefix + option)[len(prefix):]
        np.testing.assert_allclose(logits[0], expected, atol=2e-4, rtol=1e-4)


def test_batched_prefill_right_padded_and_batched_step(tiny, fp32_session):
    rows = [IDS[:6], IDS[2:5]]
    batch_ids, mask = _padded_options(0, rows)
    logits, past = _run(fp32_session, batch_ids, mask, _empty_past(2))
    for row, ids in enumerate(rows):
        np.testing.assert_allclose(logits[row, : len(ids)], _reference_logits(tiny[0], ids), atol=2e-4, rtol=1e-4)
    # One decode step for both rows (equal lengths: no padding).
    rows = [IDS[:4], IDS[4:8]]
    ids = np.asarray(rows, np.int64)
    _, past = _run(fp32_session, ids, np.ones_like(ids), _empty_past(2))
    step = np.asarray([[IDS[8]], [IDS[9]]], np.int64)
    logits, _ = _run(fp32_session, step, np.ones((2, 5), np.int64), past)
    for row, ids in enumerate(rows):
        expected = _reference_logits(tiny[0], ids + [int(step[row, 0])])[-1]
        np.testing.assert_allclose(logits[row, 0], expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, tolerance", [(8, 0.05), (4, 0.4)])
def test_quantized_variants_stay_close(tiny, bits, tolerance):
    model = build_llama_model(HP, tiny[1], bits)
    ops = {node.op_type for node in model.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert "MatMul" not in ops
    session = _session(model)
    ids = np.asarray([IDS], np.int64)
    logits, _ = _run(session, ids, np.ones_like(ids), _empty_past())
    reference = _reference_logits(tiny[0], IDS)
    error = np.abs(logits[0] - reference).max() / np.abs(reference).max()
    assert error < tolerance, error


def _q4_1(w: np.ndarray) -> BlockQuantized:
    blocks = w.reshape(w.shape[0], -1, 32)
    low, high = blocks.min(-1), blocks.max(-1)
    scale = ((high - low) / 15).astype(np.float32)
    codes = np.clip(np.round((blocks - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    return BlockQuantized("Q4_1", scale, codes, low.astype(np.float32))


def test_exact_q4_1_keeps_the_block_minimums(tiny):
    """Q4_1 matrices at 4 bits: re-quantizing loses the float minimums; exact_q4_1 keeps
    them (left: int8 activations of accuracy_level 4), so it tracks the reference closely."""
    hf, gguf = tiny
    q4_hf = {"embed": hf["embed"], "final_norm": hf["final_norm"]}
    q4_gguf = dict(gguf)
    for i in range(HP.num_layers):
        q4_hf[i] = dict(hf[i])
        for key, suffix in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"),
                            ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
            blocks = _q4_1(gguf[f"blk.{i}.{suffix}.weight"])
            q4_gguf[f"blk.{i}.{suffix}.weight"] = blocks
            q4_hf[i][key] = blocks.dense()
        # The reference wants q/k rows in Hugging Face order: undo the GGUF permutation.
        for key, suffix, heads in (("q", "attn_q", HP.num_heads), ("k", "attn_k", HP.num_kv_heads)):
            dense = q4_gguf[f"blk.{i}.{suffix}.weight"].dense()
            rows = dense.shape[0]
            order = np.arange(rows).reshape(heads, rows // heads // 2, 2).transpose(0, 2, 1).reshape(-1)
            q4_hf[i][key] = dense[order]
    ids = np.asarray([IDS], np.int64)
    reference = _reference_logits(q4_hf, IDS)
    errors = {}
    for exact in (False, True):
        session = _session(build_llama_model(HP, q4_gguf, 4, lm_head_bits=8, exact_q4_1=exact))
        logits, _ = _run(session, ids, np.ones_like(ids), _empty_past())
        errors[exact] = np.abs(logits[0] - reference).max() / np.abs(reference).max()
    assert errors[True] < 0.06, errors  # int8 activations (accuracy_level 4) remain
    assert errors[True] < errors[False] / 4, errors


def test_q8_0_embedding_is_exact_in_the_8bit_graph(tiny):
    """A Q8_0 token_embd (SmolLM2's) is stored exactly, once: the tied 8-bit lm_head's
    MatMulNBits codes (+128) and scales double as the embedding table."""
    hf, gguf = tiny
    model = build_llama_model(HP, gguf, 8)
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    assert not any(name.startswith("embed.") for name in inits)  # one table, shared with lm_head
    codes = inits["lm_head.qweight"].astype(np.float32) - 128
    table = (codes * inits["lm_head.scales"].reshape(HP.vocab_size, -1, 1)).reshape(HP.vocab_size, HP.hidden_size)
    np.testing.assert_array_equal(table, hf["embed"])
    # The graph's gather of that shared table: a 0-layer model's logits are norm(embed) @ embed.T.
    zero_layers = LlamaHParams(**{**HP.__dict__, "num_layers": 0})
    session = _session(build_llama_model(zero_layers, gguf, 8))
    ids = np.asarray([[3, 50, 7]], np.int64)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                      "logits_to_keep": np.asarray([ids.shape[1]], np.int64)})[0]
    x = hf["embed"][ids[0]].astype(np.float64)
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + HP.rms_norm_eps) * hf["final_norm"]
    np.testing.assert_allclose(logits[0], x @ hf["embed"].T, rtol=0.02, atol=0.05)


def test_quantize_blocks_round_trip():
    w = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    for bits, tolerance in ((8, 0.02), (4, 0.3)):
        codes, scale, zero = quantize_blocks(w, bits)
        back = (codes.astype(np.float32) - zero[..., None]) * scale[..., None]
        assert np.abs(back.reshape(w.shape) - w).max() < tolerance
