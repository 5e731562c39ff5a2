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
> 1 and past context is given"). `score_options`' batched option rows after a shared
prefill hit exactly that: run those rows one at a time (batch 1, right padding is
fine) for this graph.

GGUF specifics handled here: llama.cpp's converter permutes the rows of
attn_q / attn_k for its interleaved rotary; they are un-permuted back to the
Hugging Face order (rotate-half rotary, ``rotary_interleaved=0``), so the cache
matches the optimum export's. A missing ``output.weight`` means tied embeddings
(lm_head = token_embd). RMSNorm epsilon and rope theta come from the metadata.

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

CLI: ``python -m services.fleet.llama_graph --gguf PATH --bits 32|8|4 [--out ROOT]``
writes a model-repository version (default repository, names ``<base>-fused``,
``<base>-fused-int8``, ``<base>-fused-int4``; ``--exact-q4-1`` → ``-fused-int4-exact``).
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_KIND = "mirador-llama-fused"
# Version of the graph's interface; 3: per-row lengths from the mask's sum (ragged batched decode on a
# shared KV buffer) and the `logits_to_keep` input. The fleet's recipes carry it, so graphs written by an older builder are rebuilt.
GRAPH_FORMAT = 3
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: essential for MatMulNBits speed on this CPU
IR_VERSION = 10     # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default
OPSET = 21
MS_DOMAIN = "com.microsoft"


# ----------------------------------------------------------------------- weights


@dataclass(frozen=True)
class LlamaHParams:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass
class BlockQuantized:
    """A GGUF tensor kept in its block form, so 8-bit can be stored exactly.

    kind "Q8_0": w = scale * codes (codes int8).  kind "Q4_1": w = scale * codes + minimum
    (codes 0..15). Arrays are [rows, blocks(, 32)]; rows are output features."""

    kind: str
    scale: np.ndarray            # float32 [rows, blocks]
    codes: np.ndarray            # [rows, blocks, 32]
    minimum: np.ndarray | None = None  # float32 [rows, blocks] (Q4_1)

    @property
    def shape(self) -> tuple[int, int]:
        rows, blocks, size = self.codes.shape
        return rows, blocks * size

    def dense(self) -> np.ndarray:
        w = self.scale[..., None] * self.codes.astype(np.float32)
        if self.minimum is not None:
            w = w + self.minimum[..., None]
        return w.reshape(self.shape).astype(np.float32)

    def take_rows(self, order: np.ndarray) -> BlockQuantized:
        return BlockQuantized(self.kind, self.scale[order], self.codes[order],
                              None if self.minimum is None else self.minimum[order])


Weight = "np.ndarray | BlockQuantized"


def as_dense(weight: Any) -> np.ndarray:
    return weight.dense() if isinstance(weight, BlockQuantized) else np.asarray(weight, dtype=np.float32)


def _unpermute_rows(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of q/k rows (interleaved → rotate-half)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    # gguf row (h, i, j) holds HF row (h, j, i) with j in {0,1}, i < half.
    order = np.arange(rows).reshape(heads, half, 2).transpose(0, 2, 1).reshape(-1)
    if isinstance(weight, BlockQuantized):
        return weight.take_rows(order)
    return np.asarray(weight)[order]


# ------------------------------------------------------------------ reading GGUF


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _block_tensor(kind: str, data: np.ndarray) -> BlockQuantized:
    rows = data.shape[0]
    if kind == "Q8_0":
        blocks = data.reshape(rows, -1, 34)
        return BlockQuantized("Q8_0", _f16(blocks[..., 0:2]), blocks[..., 2:].copy().view(np.int8))
    if kind == "Q4_1":
        blocks = data.reshape(rows, -1, 20)
        packed = blocks[..., 4:]
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.uint8)
        return BlockQuantized("Q4_1", _f16(blocks[..., 0:2]), codes, _f16(blocks[..., 2:4]))
    raise ValueError(f"unsupported block type {kind}")


def read_gguf(path: str | Path) -> tuple[LlamaHParams, dict[str, Any], dict[str, Any]]:
    """(hparams, weights by GGUF name, metadata) from a llama-architecture GGUF file.

    Q8_0 and Q4_1 tensors stay in block form; other quantized types are dequantized
    with `gguf.quants.dequantize`."""
    try:
        import gguf  # build-time only
    except ImportError as error:
        raise ImportError("reading GGUF needs the `gguf` package (pip install gguf; the fleet's build "
                          "venv has it)") from error

    reader = gguf.GGUFReader(str(path))

    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}; this builder handles llama only")
    weights: dict[str, Any] = {}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in ("F32", "F16", "BF16"):
            rows = [int(n) for n in reversed(tensor.shape.tolist())]
            weights[tensor.name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(rows)
        elif kind in ("Q8_0", "Q4_1"):
            weights[tensor.name] = _block_tensor(kind, np.asarray(tensor.data))
        else:
            dense = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            weights[tensor.name] = dense.reshape([int(n) for n in reversed(tensor.shape.tolist())])
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    embed = weights["token_embd.weight"]
    hp = LlamaHParams(
        vocab_size=int(field("llama.vocab_size", embed.shape[0])),
        hidden_size=hidden,
        intermediate_size=int(field("llama.feed_forward_length")),
        num_layers=int(field("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
        head_dim=int(field("llama.attention.key_length", field("llama.rope.dimension_count", hidden // heads))),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field("llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(field("llama.context_length", 2048)),
    )
    if field("llama.rope.scaling.type") not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {field('llama.rope.scaling.type')!r} is not supported")
    metadata = {
        "name": field("general.name"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "chat_template": field("tokenizer.chat_template"),
        "file_type": field("general.file_type"),
    }
    return hp, weights, metadata


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
        wq, wk = _unpermute_rows(wq, hp.num_heads), _unpermute_rows(wk, hp.num_kv_heads)
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


# ----------------------------------------------------------------- repository


def variant_name(base: str, bits: int, exact_q4_1: bool = False) -> str:
    if bits == 32:
        return f"{base}-fused"
    return f"{base}-fused-int{bits}" + ("-exact" if exact_q4_1 and bits == 4 else "")


def _find_base(repository, gguf_path: Path, base_name: str | None):
    """The repository model whose tokenizer and chat facts the fused graph reuses."""
    if base_name:
        return repository.get(base_name)
    for manifest in repository.list_models():
        source_file = str(manifest.source.get("file", ""))
        if source_file and Path(source_file).name == gguf_path.name and "tokenizer" in manifest.files:
            return manifest
    raise SystemExit(f"no model in {repository.root} was built from {gguf_path.name}; "
                     "pass --base NAME (a model whose tokenizer.json and chat facts to reuse)")


def to_float16(model):
    """The float graph in float16 end to end (weights, activations, KV cache, logits), for GPU
    providers: ONNX Runtime's own converter; integer inputs (ids, mask) stay as they are."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)


def write_fused(folder: Path, gguf_path: Path, base, bits: int, *, lm_head_bits: int | None = None,
                symmetric: bool = False, exact_q4_1: bool = False, dtype: str = "float32") -> tuple[dict, dict]:
    """Writes model.onnx (and the base model's tokenizer.json) into `folder`; returns the
    manifest's `generation` and `extra` facts. `base` is the repository model whose
    tokenizer and chat facts the fused graph reuses. `dtype` float16 (bits 32 only): the
    GPU variant, float16 weights, KV cache and logits."""
    if dtype not in ("float32", "float16") or (dtype == "float16" and bits != 32):
        raise ValueError(f"dtype {dtype!r} with {bits} bits: float16 is for the float graph (bits 32) only")
    started = time.perf_counter()
    hp, weights, metadata = read_gguf(gguf_path)
    read_s = time.perf_counter() - started
    model = build_llama_model(hp, weights, bits, lm_head_bits=lm_head_bits, symmetric=symmetric,
                              exact_q4_1=exact_q4_1)
    if dtype == "float16":
        model = to_float16(model)
    graph_s = time.perf_counter() - started - read_s
    save_model(model, folder / "model.onnx")
    shutil.copyfile(base.path_of("tokenizer"), folder / "tokenizer.json")
    generation = dict(base.generation)
    generation.update({
        "input_names": ["input_ids", "attention_mask", "logits_to_keep"],
        "output_names": ["logits"],
        # GroupQueryAttention refuses batch > 1 with several new tokens on a non-empty cache.
        "batched_continuation": False,
        "past_key_values": {
            "input_pattern": "past_key_values.{layer}.{kind}",
            "output_pattern": "present.{layer}.{kind}",
            "kinds": ["key", "value"],
            "num_layers": hp.num_layers,
            "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
        },
        "num_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_kv_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_size": hp.hidden_size,
        "vocab_size": hp.vocab_size,
        "max_position_embeddings": hp.max_position_embeddings,
        "dtype": dtype,  # of the KV cache and the logits
        # GroupQueryAttention takes one preallocated buffer as both past and present (IO binding)
        # and per-row lengths: the model host's engine decodes its sequences as one ragged batch.
        "kv_cache": "shared-buffer",
    })
    extra = {
        "graph": GRAPH_KIND,
        "graph_format": GRAPH_FORMAT,
        "bits": bits,
        "lm_head_bits": lm_head_bits or bits,
        "exact_q4_1": exact_q4_1 and bits == 4,
        "zero_points": None if bits == 32 else ("default (symmetric)" if symmetric else "uint8 per block"),
        "block_size": BLOCK_SIZE if bits != 32 else None,
        "accuracy_level": ACCURACY_LEVEL if bits != 32 else None,
        "attention_mask": "per-row lengths from its sum: left-aligned rows, no left padding",
        "batch_limits": "batch > 1 with several new tokens on a non-empty cache is refused by "
                        "GroupQueryAttention (score_options' option rows): run such rows one at a time",
        "tokenizer_from": base.reference,
        "hparams": asdict(hp),
        "gguf": {"file": gguf_path.name, "file_type": metadata.get("file_type")},
        "build_timings": {"read_gguf_s": round(read_s, 1), "graph_s": round(graph_s, 1)},
    }
    return generation, extra


def build_version(gguf_path: Path, bits: int, repository, *, base_name: str | None = None, name: str | None = None,
                  version: str = "1", replace: bool = False, lm_head_bits: int | None = None,
                  symmetric: bool = False, exact_q4_1: bool = False, log=print):
    from services.common.model_repository import ModelManifest

    base = _find_base(repository, gguf_path, base_name)
    name = name or variant_name(base.name, bits, exact_q4_1)
    started = time.perf_counter()

    def build(folder: Path) -> ModelManifest:
        generation, extra = write_fused(folder, gguf_path, base, bits, lm_head_bits=lm_head_bits,
                                        symmetric=symmetric, exact_q4_1=exact_q4_1)
        return ModelManifest(
            name=name, version=version, task="text-generation", files={"model": "model.onnx", "tokenizer": "tokenizer.json"},
            architecture="llama", source=dict(base.source), licence=base.licence, generation=generation,
            extra={**extra, "built_by": "python -m services.fleet.llama_graph"},
        )

    manifest = repository.write_version(name, version, build, replace=replace)
    log(f"{manifest.reference}: {manifest.size_bytes / 2**20:.0f} MiB in {time.perf_counter() - started:.0f} s "
        f"→ {manifest.directory}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.fleet.llama_graph", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, required=True, help="llama-architecture GGUF file")
    parser.add_argument("--bits", type=int, choices=(32, 8, 4), action="append", required=True,
                        help="32 (float MatMul) or 8/4 (MatMulNBits); repeat to build several")
    parser.add_argument("--out", type=Path, default=None,
                        help="model repository root (default: $MIRADOR_MODEL_REPOSITORY or ~/.cache/mirador/models)")
    parser.add_argument("--base", default=None, help="repository model to take tokenizer.json and chat facts from "
                        "(default: the one whose manifest names this GGUF file)")
    parser.add_argument("--name", default=None, help="model name (default: <base>-fused[-int8|-int4])")
    parser.add_argument("--version", default="1")
    parser.add_argument("--lm-head-bits", type=int, choices=(32, 8, 4), default=None,
                        help="bits of the output projection (default: same as --bits)")
    parser.add_argument("--symmetric", action="store_true",
                        help="no zero points for re-quantized weights (faster MatMulNBits, less accurate)")
    parser.add_argument("--exact-q4-1", action="store_true",
                        help="4-bit: keep Q4_1 blocks exact (codes as they are + a float MatMul on block sums "
                             "for the minimums); default name <base>-fused-int4-exact, lm_head 8-bit")
    parser.add_argument("--replace", action="store_true", help="overwrite an existing version")
    args = parser.parse_args(argv)
    from services.common.model_repository import ModelRepository

    repository = ModelRepository(args.out)
    if args.name and len(args.bits) > 1:
        parser.error("--name with several --bits would write them all to one name")
    for bits in args.bits:
        lm_head_bits = args.lm_head_bits
        if lm_head_bits is None and args.exact_q4_1 and bits == 4:
            lm_head_bits = 8
        build_version(args.gguf, bits, repository, base_name=args.base, name=args.name, version=args.version,
                      replace=args.replace, lm_head_bits=lm_head_bits, symmetric=args.symmetric,
                      exact_q4_1=args.exact_q4_1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
