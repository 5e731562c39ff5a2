"""A fused ONNX graph for llama-architecture decoders, written straight from GGUF weights.

No torch, no transformers: the weights come from a GGUF file (read with the `gguf`
package) and the graph is written with `onnx.helper`, using ONNX Runtime's fused
contrib ops (com.microsoft):

* `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization` for RMSNorm
  and the residual adds,
* `GroupQueryAttention` with `do_rotary=1` (cos/sin caches as initializers) on a
  packed QKV projection,
* `MatMulNBits` (block 32, accuracy_level 4) for the 8-bit and 4-bit variants, plain
  `MatMul` for float32.

Interface (what `DecoderRuntime` feeds and reads, like optimum's export):
``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, past+seq], ``logits_to_keep``
int64 [1] (logits are computed for the last k positions only),
``past_key_values.{i}.key|value`` float32 [batch, kv_heads, past, head_dim] →
``logits`` [batch, k, vocab], ``present.{i}.key|value`` [batch, kv_heads, past+seq,
head_dim]. There is no ``position_ids`` input: positions are the cache length plus
the token's index (GroupQueryAttention derives them itself).

Attention mask semantics: rows are left-aligned; each row's length is the sum of its
mask (GroupQueryAttention's per-row ``seqlens_k`` = sum - 1) and the mask's width is
the batch's longest row (``total_sequence_length``). So a batch of decode steps on
sequences of different lengths is one call: each row's mask holds ones for its own
past + 1 and zeros after (a ragged batch on a shared, preallocated cache; see
`services/model_host/engine/`). Right padding is fine in a first prompt (empty
cache), where the pads' logits and cache entries are garbage to ignore; a row with a
past must carry no padding after its new tokens (it would be taken for past), and
left padding or holes are NOT supported.

Batch limits (GroupQueryAttention, onnxruntime 1.31 CPU): batch > 1 works for a
prefill on an empty cache and for one-token steps, but a call with batch > 1, several
new tokens AND a non-empty cache fails ("batch_size must be 1 when sequence_length
> 1 and past context is given"). `score_options`' option rows after a shared prefill
would hit exactly that: for this graph they step together in lockstep instead, one
token per row per call (equal lengths, no padding).

Quantized weights (block 32 along K, accuracy_level 4 = int8 activations):

* Q8_0 sources (SmolLM2's token_embd) are stored exactly at 8 bits (codes + 128 with
  MatMulNBits' default zero point 128). When the tied lm_head is 8-bit, its
  MatMulNBits weights double as the embedding table (one copy on disk and in RAM).
* Everything else is re-quantized from the dequantized float32 values: asymmetric
  round-to-nearest with uint8 zero points, or with ``symmetric=True`` none (the
  default zero point; a little faster, about as accurate on these weights).
* Q4_1 blocks (w = d*q + m) keep a float minimum that MatMulNBits' integer zero
  point cannot hit (float zero points exist but fall back to a ~40x slower
  unpacked kernel), so re-quantizing them costs accuracy (SmolLM2: mean KL ~0.35
  nats against fp32). ``exact_q4_1=True`` keeps them exact: MatMulNBits on the
  original codes plus a small float MatMul of per-block input sums by the block
  minimums (KL ~0.004, like int8), at the price of 3 extra small nodes per matrix.

Graph shape per layer: SkipSimplifiedLayerNorm → packed QKV MatMul(NBits) →
GroupQueryAttention → O MatMul(NBits) → SkipSimplifiedLayerNorm → one gate+up
MatMul(NBits) → Split → SiLU (Sigmoid*x, fused by ORT into QuickGelu) * up → down.

The weights come from `services.fleet.gguf_weights`; `services.fleet.fused_versions` writes the
graph into the model repository (and is the command line).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.fleet.gguf_weights import BlockQuantized, LlamaHParams, as_dense, unpermute_rows

GRAPH_KIND = "mirador-llama-fused"
# Version of the graph's interface; 3: per-row lengths from the mask's sum (ragged batched decode on a
# shared KV buffer) and the `logits_to_keep` input. The fleet's recipes carry it, so graphs written by an older builder are rebuilt.
GRAPH_FORMAT = 3
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: essential for MatMulNBits speed on this CPU
IR_VERSION = 10     # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
OPSET = 21
MS_DOMAIN = "com.microsoft"


# --------------------------------------------------------------- quantization


def quantize_blocks(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round-to-nearest per block of 32 along K. weight [N, K] →
    codes uint8 [N, blocks, 32], scales float32 [N, blocks], zero points uint8 [N, blocks]."""
    n, k = weight.shape
    w = weight.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE).astype(np.float32)
    top = (1 << bits) - 1
    lo = np.minimum(w.min(axis=-1), 0.0)
    hi = np.maximum(w.max(axis=-1), 0.0)
    scale = (hi - lo) / top
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    zero = np.clip(np.round(-lo / scale), 0, top)
    codes = np.clip(np.round(w / scale[..., None]) + zero[..., None], 0, top).astype(np.uint8)
    return codes, scale, zero.astype(np.uint8)


def quantize_blocks_symmetric(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest (llama.cpp Q4_0 / Q8_0 style: the value of largest
    magnitude maps to code 0, i.e. -2^(bits-1)); MatMulNBits' default zero point 2^(bits-1)."""
    n, k = weight.shape
    w = weight.reshape(n, k // BLOCK_SIZE, BLOCK_SIZE).astype(np.float32)
    half = 1 << (bits - 1)
    extreme = np.take_along_axis(w, np.abs(w).argmax(-1)[..., None], -1)[..., 0]
    scale = (extreme / -half).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    codes = np.clip(np.round(w / safe[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    return codes, scale


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, blocks, 32] codes → MatMulNBits B [N, blocks, 32*bits/8]; 4-bit: low nibble first."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return zero.reshape(-1)
    n, blocks = zero.shape
    if blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
    return (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


# ----------------------------------------------------------------- the graph


class _Graph:
    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self.exact_q4_1 = False
        self.block_sums: dict[str, str] = {}  # input name → its sums over blocks of 32 along K

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, name: str, values: list[int] | int) -> str:
        return self.init(name, np.asarray(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], outputs: list[str] | int = 1, name: str | None = None,
             domain: str = "", **attrs: Any) -> list[str]:
        self._count += 1
        name = name or f"{op}_{self._count}"
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs


def _q8_0_inits(g: _Graph, name: str, weight: BlockQuantized) -> tuple[str, str]:
    """Exact 8-bit MatMulNBits weights of a Q8_0 tensor: (code + 128 - 128) * scale,
    with MatMulNBits' default zero point 128."""
    codes = (weight.codes.astype(np.int16) + 128).astype(np.uint8)
    return g.init(f"{name}.qweight", _pack(codes, 8)), g.init(f"{name}.scales", weight.scale.reshape(-1))


def _matmul_nbits(g: _Graph, name: str, inputs: list[str], n: int, k: int, bits: int,
                  output: str | None = None) -> str:
    return g.node("MatMulNBits", inputs, [output] if output else 1, name=name, domain=MS_DOMAIN, K=k, N=n,
                  bits=bits, block_size=BLOCK_SIZE, accuracy_level=ACCURACY_LEVEL)[0]


def _linear(g: _Graph, name: str, x: str, weight: Any, bits: int, symmetric: bool = False,
            output: str | None = None) -> str:
    """y = x @ weight.T for weight [N, K] (GGUF / PyTorch orientation)."""
    n, k = weight.shape
    if bits == 32:
        w = g.init(f"{name}.weight", as_dense(weight).T.copy())
        return g.node("MatMul", [x, w], [output] if output else 1, name=name)[0]
    if k % BLOCK_SIZE:
        raise ValueError(f"{name}: K={k} is not a multiple of the block size {BLOCK_SIZE}")
    inputs = [x]
    if bits == 8 and isinstance(weight, BlockQuantized) and weight.kind == "Q8_0":
        inputs += list(_q8_0_inits(g, name, weight))
    elif bits == 4 and g.exact_q4_1 and isinstance(weight, BlockQuantized) and weight.kind == "Q4_1":
        return _q4_1_exact(g, name, x, weight, output)
    elif symmetric:
        codes, scale = quantize_blocks_symmetric(as_dense(weight), bits)
        inputs += [g.init(f"{name}.qweight", _pack(codes, bits)), g.init(f"{name}.scales", scale.reshape(-1))]
    else:
        codes, scale, zero = quantize_blocks(as_dense(weight), bits)
        inputs += [g.init(f"{name}.qweight", _pack(codes, bits)), g.init(f"{name}.scales", scale.reshape(-1)),
                   g.init(f"{name}.zero_points", _pack_zero_points(zero, bits))]
    return _matmul_nbits(g, name, inputs, n, k, bits, output)


def _block_sum(g: _Graph, x: str, k: int) -> str:
    """x [B, S, K] → [B, S, K/32]: the sum of each block of 32 inputs (computed once per input)."""
    if x not in g.block_sums:
        # One small MatMul with a 0/1 block-indicator matrix (fewer nodes than Reshape + ReduceSum).
        indicator = f"block_indicator_{k}"  # [K, K/32], one per K
        if indicator not in g.block_sums:
            g.block_sums[indicator] = g.init(
                indicator, np.repeat(np.eye(k // BLOCK_SIZE, dtype=np.float32), BLOCK_SIZE, axis=0))
        g.block_sums[x] = g.node("MatMul", [x, indicator], name=f"{x}/block_sum")[0]
    return g.block_sums[x]


def _q4_1_exact(g: _Graph, name: str, x: str, weight: BlockQuantized, output: str | None) -> str:
    """Q4_1 blocks (w = d*q + m) kept exactly: MatMulNBits on the original codes with the
    default zero point 8 gives x @ (d*(q-8)); the per-block remainder r = m + 8d times
    each block's input sum adds the rest: y = MatMulNBits(x) + block_sum(x) @ r."""
    n, k = weight.shape
    inputs = [x, g.init(f"{name}.qweight", _pack(weight.codes, 4)), g.init(f"{name}.scales", weight.scale.reshape(-1))]
    main = _matmul_nbits(g, name, inputs, n, k, 4)
    remainder = (weight.minimum + 8.0 * weight.scale).T.astype(np.float32)  # [blocks, N]
    correction = g.node("MatMul", [_block_sum(g, x, k), g.init(f"{name}.block_offsets", remainder)],
                        name=f"{name}/offsets")[0]
    return g.node("Add", [main, correction], [output] if output else 1, name=f"{name}/add_offsets")[0]


def _concat_rows(parts: list[Any]) -> Any:
    if all(isinstance(p, BlockQuantized) for p in parts) and len({p.kind for p in parts}) == 1:
        return BlockQuantized(
            parts[0].kind,
            np.concatenate([p.scale for p in parts]),
            np.concatenate([p.codes for p in parts]),
            None if parts[0].minimum is None else np.concatenate([p.minimum for p in parts]),
        )
    return np.concatenate([as_dense(p) for p in parts])


def rope_caches(hp: LlamaHParams, positions: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_llama_model(hp: LlamaHParams, weights: Mapping[str, Any], bits: int, *,
                      lm_head_bits: int | None = None, max_positions: int | None = None,
                      unpermute_qk: bool = True, symmetric: bool = False, exact_q4_1: bool = False):
    """The fused decoder graph as an onnx.ModelProto.

    `weights` uses GGUF tensor names (token_embd.weight, blk.{i}.attn_q.weight, ...,
    output_norm.weight, optional output.weight); matrices are [out, in], either
    float arrays or `BlockQuantized`. `unpermute_qk` says the q/k rows are in
    llama.cpp's permuted order (true for any GGUF). `symmetric` drops the zero
    points of re-quantized weights (MatMulNBits' default zero point; a little
    faster, a little less accurate). `exact_q4_1` keeps Q4_1 source blocks exact at 4
    bits (their codes as they are, plus a small float MatMul on per-block input sums
    for the block minimums) instead of re-quantizing them."""
    from onnx import helper

    if bits not in (32, 8, 4):
        raise ValueError(f"bits must be 32, 8 or 4, not {bits}")
    lm_head_bits = bits if lm_head_bits is None else lm_head_bits
    positions = min(max_positions or hp.max_position_embeddings, hp.max_position_embeddings)
    g = _Graph()
    g.exact_q4_1 = exact_q4_1
    eps = float(hp.rms_norm_eps)

    attention = _attention_inputs(g, hp, positions)
    embed = weights["token_embd.weight"]
    tied = "output.weight" not in weights
    shared_head = (bits != 32 and tied and lm_head_bits == 8 and isinstance(embed, BlockQuantized)
                   and embed.kind == "Q8_0")
    residual = _embedding(g, hp, embed, bits, tied, shared_head)
    hidden = None  # output of the previous block (attention or MLP), not yet added to the residual
    for i in range(hp.num_layers):
        hidden, residual = _decoder_layer(g, hp, i, weights, hidden, residual, attention, bits, symmetric, unpermute_qk)

    out_norm = g.init("output_norm.weight", as_dense(weights["output_norm.weight"]))
    if hidden is None:  # no layers (tests)
        normed = g.node("SimplifiedLayerNormalization", [residual, out_norm], name="final_norm",
                        epsilon=eps, axis=-1, stash_type=1)[0]
    else:
        normed = g.node("SkipSimplifiedLayerNormalization", [hidden, residual, out_norm],
                        ["final_norm/out"], name="final_norm", domain=MS_DOMAIN, epsilon=eps)[0]
    _lm_head(g, hp, normed, embed if tied else weights["output.weight"], bits, lm_head_bits, tied, shared_head, symmetric)

    inputs, outputs = _graph_io(hp)
    graph = helper.make_graph(g.nodes, "mirador_llama_fused", inputs, outputs, g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
                             ir_version=IR_VERSION, producer_name="mirador.llama_graph")


@dataclass(frozen=True)
class _AttentionInputs:
    """What every GroupQueryAttention node reads besides its own q/k/v and cache."""

    seqlens_k: str
    total_sequence_length: str
    cos_cache: str
    sin_cache: str


def _attention_inputs(g: "_Graph", hp: LlamaHParams, positions: int) -> _AttentionInputs:
    """Lengths for GroupQueryAttention (see the module docstring): each row's own length from the
    mask's sum, the batch's longest from the mask's width; and the rotary caches."""
    from onnx import TensorProto

    total = g.node("Shape", ["attention_mask"], name="mask_shape", start=1, end=2)[0]        # [1] int64
    total_i32 = g.node("Cast", [total], name="total_len_i32", to=TensorProto.INT32)[0]
    total_scalar = g.node("Squeeze", [total_i32], name="total_sequence_length")[0]              # int32 scalar
    lengths = g.node("ReduceSum", ["attention_mask", g.const_i64("mask_sum_axis", [1])], name="row_lengths",
                     keepdims=0)[0]                                                             # [batch] int64
    lengths_i32 = g.node("Cast", [lengths], name="row_lengths_i32", to=TensorProto.INT32)[0]
    seqlens_k = g.node("Sub", [lengths_i32, g.init("one_i32", np.asarray([1], np.int32))], name="seqlens_k")[0]
    cos, sin = rope_caches(hp, positions)
    return _AttentionInputs(seqlens_k, total_scalar, g.init("cos_cache", cos), g.init("sin_cache", sin))


def _embedding(g: "_Graph", hp: LlamaHParams, embed, bits: int, tied: bool, shared_head: bool) -> str:
    """The token embeddings [batch, sequence, hidden]: fp32, the tied 8-bit head's own codes, or an
    8-bit table dequantized row by row."""
    from onnx import TensorProto

    d = hp.hidden_size
    if bits == 32:
        table = as_dense(embed)
        if not tied:
            return g.node("Gather", [g.init("token_embd.weight", table), "input_ids"], name="embed")[0]
        # One copy, [hidden, vocab]: the lm_head's MatMul weight; rows are gathered along axis 1.
        table_t = g.init("lm_head.weight", np.ascontiguousarray(table.T))
        picked = g.node("Gather", [table_t, "input_ids"], name="embed_gather", axis=1)[0]  # [d, B, S]
        return g.node("Transpose", [picked], name="embed", perm=[1, 2, 0])[0]
    if shared_head:
        # The tied 8-bit lm_head's MatMulNBits weights double as the embedding table:
        # (float(code) - 128) * scale is exactly the Q8_0 value. One copy on disk.
        q_name, s_name = _q8_0_inits(g, "lm_head", embed)
        vocab, blocks = embed.scale.shape
        gathered = g.node("Gather", [q_name, "input_ids"], name="embed_codes")[0]
        values = g.node("Cast", [gathered], name="embed_codes_f", to=TensorProto.FLOAT)[0]
        values = g.node("Add", [values, g.init("minus_128", np.asarray(-128.0, np.float32))], name="embed_center")[0]
        table_scales = g.node("Reshape", [s_name, g.const_i64("embed_scales_shape", [vocab, blocks, 1])],
                              name="embed_scales_table")[0]
        scales = g.node("Gather", [table_scales, "input_ids"], name="embed_scales")[0]
        values = g.node("Mul", [values, scales], name="embed_scale")[0]
        return g.node("Reshape", [values, g.const_i64("embed_shape", [0, 0, d])], name="embed")[0]
    # 8-bit table gathered row by row and dequantized: exact for Q8_0 sources.
    if isinstance(embed, BlockQuantized) and embed.kind == "Q8_0":
        codes, scale, offset = embed.codes, embed.scale, None                              # int8, w = s * q
    else:
        codes, scale, zero = quantize_blocks(as_dense(embed), 8)                            # uint8, w = s * (q - z)
        offset = -scale * zero.astype(np.float32)
    vocab, blocks = scale.shape
    gathered = g.node("Gather", [g.init("embed.qweight", codes), "input_ids"], name="embed_codes")[0]
    values = g.node("Cast", [gathered], name="embed_codes_f", to=TensorProto.FLOAT)[0]
    scales = g.node("Gather", [g.init("embed.scales", scale.reshape(vocab, blocks, 1)), "input_ids"],
                    name="embed_scales")[0]
    values = g.node("Mul", [values, scales], name="embed_scale")[0]
    if offset is not None:
        offsets = g.node("Gather", [g.init("embed.offsets", offset.reshape(vocab, blocks, 1)), "input_ids"],
                         name="embed_offsets")[0]
        values = g.node("Add", [values, offsets], name="embed_shift")[0]
    return g.node("Reshape", [values, g.const_i64("embed_shape", [0, 0, d])], name="embed")[0]


def _decoder_layer(g: "_Graph", hp: LlamaHParams, i: int, weights: Mapping[str, Any], hidden: str | None,
                   residual: str, attention: _AttentionInputs, bits: int, symmetric: bool,
                   unpermute_qk: bool) -> tuple[str, str]:
    """Block i: attention and MLP, each normed with the skip connection fused into the norm.
    Returns (its MLP output, the residual stream before it), to be added by the next norm."""
    p, eps = f"blk.{i}", float(hp.rms_norm_eps)
    attn_norm = g.init(f"{p}.attn_norm.weight", as_dense(weights[f"{p}.attn_norm.weight"]))
    if hidden is None:
        normed = g.node("SimplifiedLayerNormalization", [residual, attn_norm], name=f"{p}.attn_norm",
                        epsilon=eps, axis=-1, stash_type=1)[0]
    else:
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [hidden, residual, attn_norm],
                                        [f"{p}.attn_norm/out", "", "", f"{p}.resid_attn"],
                                        name=f"{p}.attn_norm", domain=MS_DOMAIN, epsilon=eps)
    wq, wk = weights[f"{p}.attn_q.weight"], weights[f"{p}.attn_k.weight"]
    if unpermute_qk:
        wq, wk = unpermute_rows(wq, hp.num_heads), unpermute_rows(wk, hp.num_kv_heads)
    qkv = _linear(g, f"{p}.attn_qkv", normed, _concat_rows([wq, wk, weights[f"{p}.attn_v.weight"]]), bits, symmetric)
    attn = g.node(
        "GroupQueryAttention",
        [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", attention.seqlens_k,
         attention.total_sequence_length, attention.cos_cache, attention.sin_cache],
        [f"{p}.attn/out", f"present.{i}.key", f"present.{i}.value"],
        name=f"{p}.attn", domain=MS_DOMAIN, num_heads=hp.num_heads, kv_num_heads=hp.num_kv_heads,
        scale=1.0 / math.sqrt(hp.head_dim), do_rotary=1, rotary_interleaved=0, local_window_size=-1,
    )[0]
    hidden = _linear(g, f"{p}.attn_output", attn, weights[f"{p}.attn_output.weight"], bits, symmetric)
    ffn_norm = g.init(f"{p}.ffn_norm.weight", as_dense(weights[f"{p}.ffn_norm.weight"]))
    normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [hidden, residual, ffn_norm],
                                    [f"{p}.ffn_norm/out", "", "", f"{p}.resid_ffn"],
                                    name=f"{p}.ffn_norm", domain=MS_DOMAIN, epsilon=eps)
    gate_up_weight = _concat_rows([weights[f"{p}.ffn_gate.weight"], weights[f"{p}.ffn_up.weight"]])
    gate_up = _linear(g, f"{p}.ffn_gate_up", normed, gate_up_weight, bits, symmetric)
    ffn = hp.intermediate_size
    gate, up = g.node("Split", [gate_up, g.const_i64(f"{p}.ffn_split", [ffn, ffn])], 2, name=f"{p}.ffn_split", axis=-1)
    sig = g.node("Sigmoid", [gate], name=f"{p}.ffn_sigmoid")[0]
    silu = g.node("Mul", [gate, sig], name=f"{p}.ffn_silu")[0]
    act = g.node("Mul", [silu, up], name=f"{p}.ffn_act")[0]
    return _linear(g, f"{p}.ffn_down", act, weights[f"{p}.ffn_down.weight"], bits, symmetric), residual


def _lm_head(g: "_Graph", hp: LlamaHParams, normed: str, head, bits: int, lm_head_bits: int, tied: bool,
             shared_head: bool, symmetric: bool) -> None:
    """The logits of the last `logits_to_keep` positions only: a prefill needs one row of logits, not
    one per prompt token (the head is a fifth of SmolLM2's weights, and 200 KB of logits per token)."""
    keep_from = g.node("Neg", ["logits_to_keep"], name="logits_keep_from")[0]
    normed = g.node("Slice", [normed, keep_from, g.const_i64("logits_keep_until", [2**62]),
                              g.const_i64("logits_keep_axis", [1])], name="logits_keep")[0]
    if lm_head_bits == 32 and bits == 32 and tied:
        g.node("MatMul", [normed, "lm_head.weight"], ["logits"], name="lm_head")
    elif shared_head:
        _matmul_nbits(g, "lm_head", [normed, "lm_head.qweight", "lm_head.scales"], hp.vocab_size, hp.hidden_size, 8,
                      "logits")
    else:
        _linear(g, "lm_head", normed, head, lm_head_bits, symmetric, output="logits")


def _graph_io(hp: LlamaHParams) -> tuple[list, list]:
    """Inputs (ids, mask, logits_to_keep, the past cache) and outputs (logits, the present cache)."""
    from onnx import TensorProto, helper

    f32, h = TensorProto.FLOAT, hp.head_dim
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", "kept_sequence", hp.vocab_size])]
    for i in range(hp.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", f32, ["batch", hp.num_kv_heads, "past_sequence", h]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", f32, ["batch", hp.num_kv_heads, "total_sequence", h]))
    return inputs, outputs


def save_model(model, path: Path) -> None:
    """Single file when under protobuf's 2 GB limit, else external data beside it."""
    import onnx

    if model.ByteSize() < (2 << 30) - (64 << 20):
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + "_data", size_threshold=1024)
