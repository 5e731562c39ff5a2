"""Llama-architecture weights as Mirador's graph writers take them: hyperparameters and tensors
read from a GGUF file (with the `gguf` package, build time only), Q8_0 and Q4_1 tensors kept in
their block form so that 8-bit can be stored exactly.

GGUF specifics handled here: llama.cpp's converter permutes the rows of
attn_q / attn_k for its interleaved rotary; they are un-permuted back to the
Hugging Face order (rotate-half rotary, ``rotary_interleaved=0``), so the cache
matches the optimum export's. A missing ``output.weight`` means tied embeddings
(lm_head = token_embd). RMSNorm epsilon and rope theta come from the metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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


def unpermute_rows(weight: Any, heads: int) -> Any:
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
