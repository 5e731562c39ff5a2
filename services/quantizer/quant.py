"""Blockwise weight quantization exactly as ONNX Runtime's MatMulNBits stores it.

Packing uses ONNX Runtime's own kernels (`quantize_matmul_{2,4,8}bits`, asymmetric,
integer zero point, round to nearest), and `dequantize` inverts that packing, so a
fake-quantized weight fed to the sensitivity probe is bit for bit the weight the
written MatMulNBits node computes with (before accuracy_level=4's int8 activations).

Layout (MatMulNBits, K x N weight, block b, q bits):
  B            uint8 [N, ceil(K/b), b*q/8]   (column n's blocks along K; low bits first)
  scales       float [N * ceil(K/b)]
  zero_points  uint8 [N * ceil(ceil(K/b)*q/8)]

An embedding table E [V, H] is packed as the MatMul weight E^T (K = H, N = V): row v
of the table is column n of that weight, so `B` is, byte for byte, the data of a
GatherBlockQuantized (com.microsoft, uint8 data, `bits`, gather_axis 0) that reads the
table as [V, H/b, b] blocks quantized along the last axis (quantize_axis 2, one block
per [v, k] row). Its scales and zero points are [V, H/b, 1] (one zero point per byte,
low bits). Checked against ONNX Runtime 1.31 for 2, 4 and 8 bits and blocks 16..256
(tests/test_quantizer.py). A tied lm_head quantized at the same bits as the embedding
can therefore share `B` with it (MatMulNBits wants B 3-D, so the Gather uses the 3-D
form too, followed by a Reshape to [..., H]).

Float-minimum codes (`Q4F`, `Q2F`): each block holds w = s * q + m with a float minimum m,
which an integer zero point cannot express. MatMulNBits accepts float zero points, but
ONNX Runtime runs them on a ~40x slower unpacked kernel (services/fleet/llama_graph.py,
the `int4-exact` graph), so they are written the way that graph writes Q4_1: MatMulNBits
with its default zero point z = 2^(bits-1) (no zero_points input) computes x @ (s (q - z)),
and a small float MatMul adds the rest, block_sum(x) @ (m + z s) ("offsets", [blocks, N]).
Their scale and minimum are searched per block (`pack_float_min`), not just min/max.

Searched integer codes (`Q4S`, `Q2S`): exactly ORT's 4/2-bit storage and node (integer zero points,
the same bytes, GatherBlockQuantized-compatible), but each block's scale and zero point are searched
to minimise the activation-weighted error (`pack_searched`) instead of min/max rounding. On SmolLM2-135M
every layer at 4s moves the calibration output a third as much as ORT's RTN (joint KL 0.16 vs 0.50);
part of that is the per-block offset RTN's integer zero point leaves on these Q4_1-derived weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (8, 4, 2)   # integer zero point, ONNX Runtime's own round-to-nearest packing
FLOAT_MIN = 10     # code = FLOAT_MIN + bits: a float per-block minimum (see the module doc)
Q4F, Q2F = FLOAT_MIN + 4, FLOAT_MIN + 2
SEARCHED = 20      # code = SEARCHED + bits: integer zero point (ORT's packing), searched scale and zero point
Q4S, Q2S = SEARCHED + 4, SEARCHED + 2
CODES = BITS + (Q4F, Q2F, Q4S, Q2S)
BLOCK_SIZES = (16, 32, 64, 128, 256)
FP32 = 0  # "bits" of a layer kept in float32


def nbits(code: int) -> int:
    """Bits per stored weight of a code (32 for FP32)."""
    return 32 if code == FP32 else code - SEARCHED if code > SEARCHED else code - FLOAT_MIN if code > FLOAT_MIN else code


def is_float_min(code: int) -> bool:
    return FLOAT_MIN < code < SEARCHED


def is_searched(code: int) -> bool:
    """An integer-zero-point code (stored exactly as ORT's 4/2-bit) whose scale and zero point are searched."""
    return code > SEARCHED


def code_name(code: int) -> str:
    """"fp32", "8", "4", "2", "4f", "2f", "4s", "2s"."""
    if code == FP32:
        return "fp32"
    return f"{nbits(code)}f" if is_float_min(code) else f"{nbits(code)}s" if is_searched(code) else str(code)


@dataclass(frozen=True)
class Packed:
    bits: int
    block_size: int
    K: int
    N: int
    data: np.ndarray         # uint8 [N, k_blocks, blob]
    scales: np.ndarray       # float32 [N * k_blocks]
    zero_points: np.ndarray  # uint8 [N * zp_per_column]; empty for float-minimum codes (default zero point)
    offsets: np.ndarray | None = None  # float32 [k_blocks, N]: m + z s, float-minimum codes only
    searched: bool = False             # integer zero point with a searched scale (pack_searched)

    @property
    def code(self) -> int:
        return self.bits + FLOAT_MIN if self.offsets is not None else self.bits + SEARCHED if self.searched else self.bits

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.nbytes
        return self.data.nbytes + self.scales.nbytes + self.zero_points.nbytes + extra


def k_blocks(K: int, block_size: int) -> int:
    return (K + block_size - 1) // block_size


def quantized_bytes(K: int, N: int, bits: int, block_size: int) -> int:
    """Bytes of the MatMulNBits initializers (B, scales, zero points or offsets) of a K x N weight;
    4 * K * N for bits == FP32. Exact: equals `Packed.nbytes`. `bits` is a code (see CODES)."""
    if bits == FP32:
        return 4 * K * N
    blocks = k_blocks(K, block_size)
    if is_float_min(bits):
        return N * blocks * (block_size * nbits(bits) // 8 + 4 + 4)
    bits = nbits(bits)
    per_byte = 8 // bits
    return N * (blocks * (block_size * bits // 8) + 4 * blocks + (blocks + per_byte - 1) // per_byte)


def gather_bytes(K: int, N: int, bits: int, block_size: int, share_data: bool = False) -> int:
    """Bytes of a GatherBlockQuantized table holding the K x N weight (an N x K embedding table):
    data [N, K/b, b*q/8] (none when shared with a MatMulNBits of the same packing), scales
    float [N, K/b, 1], zero points uint8 [N, K/b, 1]. 4 * K * N for bits == FP32."""
    if bits == FP32:
        return 4 * K * N
    if is_float_min(bits):
        raise ValueError("GatherBlockQuantized has no float-minimum form here; use 8, 4 or 2 bits")
    if K % block_size:
        raise ValueError(f"a Gather table of width {K} needs a block size dividing it, not {block_size}")
    blocks = K // block_size
    data = 0 if share_data else N * blocks * (block_size * nbits(bits) // 8)
    return data + 4 * N * blocks + N * blocks


def gather_arrays(packed: Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, scales, zero_points) of GatherBlockQuantized for a table packed as its transpose."""
    if packed.offsets is not None:
        raise ValueError("GatherBlockQuantized has no float-minimum form here")
    N, blocks = packed.N, k_blocks(packed.K, packed.block_size)
    if packed.K % packed.block_size:
        raise ValueError("a Gather table needs a block size dividing its width")
    zero_points = _unpack(packed.zero_points.reshape(N, -1), packed.bits, blocks).reshape(N, blocks, 1)
    return packed.data, packed.scales.reshape(N, blocks, 1), np.ascontiguousarray(zero_points, dtype=np.uint8)


def pack(weight: np.ndarray, bits: int, block_size: int) -> Packed:
    """Quantize a float32 [K, N] MatMul weight the way MatMulNBits stores it (`bits` a code)."""
    if bits in (Q4F, Q2F):
        return pack_float_min(weight, nbits(bits), block_size)
    if bits in (Q4S, Q2S):
        return pack_searched(weight, nbits(bits), block_size)
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits,
    )

    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    weight, K, N, blocks, pad = _in_blocks(weight, block_size)
    padded = np.ascontiguousarray(np.pad(weight, ((0, pad), (0, 0))) if pad else weight)
    per_byte = 8 // bits
    data = np.zeros((N, blocks, block_size * bits // 8), dtype=np.uint8)
    zero_points = np.zeros((N, (blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((N, blocks), dtype=np.float32)
    kernel = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    kernel(data, padded, scales, zero_points, block_size, N, K + pad, False)
    return Packed(bits, block_size, K, N, data, scales.reshape(-1), zero_points.reshape(-1))


def _in_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, int, int, int, int]:
    """(the weight as float32 [K, N], K, N, blocks along K, rows of padding to a whole block)."""
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    weight = np.asarray(weight, dtype=np.float32)
    K, N = weight.shape
    blocks = k_blocks(K, block_size)
    return weight, K, N, blocks, blocks * block_size - K


SEARCH_STEPS = 10  # inverse scales tried per block by pack_float_min (besides plain min/max)


def pack_float_min(weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
                   steps: int = SEARCH_STEPS) -> Packed:
    """Blocks of w ~= s * q + m (q in 0..2^bits - 1, s and m float), chosen per block to minimise
    sum_k a_k (w_k - s q_k - m)^2 with a = `importance` ([K], e.g. the inputs' mean squares; ones by
    default). Candidates: plain min/max rounding (kept as is, so the result is never worse than it),
    and `steps` inverse scales (2^bits - 1 + d) / (max - min), d in [-1, 1] (llama.cpp's
    make_qkx2_quants), each rounded from the block minimum and then refitted: for fixed codes q
    the best (s, m) is a 2x2 weighted least-squares solve. Vectorised over all blocks at once."""
    if bits not in (4, 2):
        raise ValueError(f"float-minimum packing is for 4 or 2 bits, not {bits}")
    weight, K, N, blocks, pad = _in_blocks(weight, block_size)
    w = np.pad(weight, ((0, pad), (0, 0))).T.reshape(N, blocks, block_size)
    a = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32).reshape(K)
    a = np.pad(a, (0, pad)).reshape(1, blocks, block_size)  # padding rows multiply nothing: weight 0
    # Padded entries take the block's first value so they do not widen its range.
    if pad:
        w[:, -1, block_size - pad:] = w[:, -1, :1]
    top = (1 << bits) - 1
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)

    uniform = importance is None
    wa = w if uniform else a * w
    base = np.einsum("nbk,nbk->nb", w, wa, dtype=np.float64)[..., None]  # sum a w^2

    def error(s, m, q, aq, saq, saqq, saqw):
        # sum a (w - s q - m)^2 expanded over the block sums (float64: the fits can be near exact)
        s, m = s.astype(np.float64), m.astype(np.float64)
        return base - 2 * s * saqw - 2 * m * sa_w + s * s * saqq + 2 * s * m * saq + m * m * sa

    def sums(q):
        aq = q if uniform else a * q
        return (aq, np.sum(aq, axis=-1, keepdims=True, dtype=np.float64),
                np.einsum("nbk,nbk->nb", aq, q, dtype=np.float64)[..., None],
                np.einsum("nbk,nbk->nb", q, wa, dtype=np.float64)[..., None])

    sa = np.broadcast_to(np.sum(a, axis=-1, keepdims=True, dtype=np.float64), lo.shape)
    sa_w = np.sum(wa, axis=-1, keepdims=True, dtype=np.float64)
    best_s = (span / top).astype(np.float32)
    best_m = lo.copy()
    best_q = np.rint(np.clip((w - lo) / best_s, 0, top)).astype(np.float32)
    best_err = error(best_s, best_m, best_q, *sums(best_q))
    for d in np.linspace(-1.0, 1.0, steps) if steps else ():
        q = np.rint(np.clip((w - lo) * ((top + d) / span), 0, top)).astype(np.float32)
        aq, saq, saqq, saqw = sums(q)
        det = saqq * sa - saq * saq
        ok = det > 1e-9 * np.maximum(saqq * sa, 1e-30)
        safe = np.where(ok, det, 1.0)
        s = np.where(ok, (sa * saqw - saq * sa_w) / safe, best_s).astype(np.float32)
        m = np.where(ok, (saqq * sa_w - saq * saqw) / safe, best_m).astype(np.float32)
        err = error(s, m, q, aq, saq, saqq, saqw)
        better = err < best_err
        if not better.any():
            continue
        best_s, best_m, best_err = np.where(better, s, best_s), np.where(better, m, best_m), np.where(better, err, best_err)
        best_q = np.where(better, q, best_q)
    q = best_q.astype(np.uint8)
    zero = 1 << (bits - 1)  # MatMulNBits' default zero point
    data = _pack_codes(q.reshape(N * blocks, block_size), bits).reshape(N, blocks, block_size * bits // 8)
    scales = best_s[..., 0].astype(np.float32)                          # [N, blocks]
    offsets = (best_m[..., 0] + zero * best_s[..., 0]).astype(np.float32)  # [N, blocks]
    return Packed(bits, block_size, K, N, np.ascontiguousarray(data), scales.reshape(-1),
                  np.zeros(0, np.uint8), np.ascontiguousarray(offsets.T))


SEARCH_SHRINK = 0.35  # pack_searched tries ranges down to (1 - SEARCH_SHRINK) of the block's own
# Ranges tried per block end by pack_searched and refits per range. On SmolLM2-135M (every layer at 4 bits,
# calibration joint KL; RTN 0.499): 3 ranges 0.191, 5 ranges 0.160 (1 refit or 2 alike), 8 ranges 0.153;
# 5 with 1 refit packs the whole model in ~17 s on 2 cores.
SEARCHED_STEPS, SEARCHED_REFITS = 5, 1


def pack_searched(weight: np.ndarray, bits: int, block_size: int, importance: np.ndarray | None = None,
                  steps: int = SEARCHED_STEPS, refits: int = SEARCHED_REFITS) -> Packed:
    """ORT's integer-zero-point packing (same bytes, same MatMulNBits node) with each block's scale s
    and zero point z chosen to minimise sum_k a_k (w_k - s (q_k - z))^2, a = `importance` ([K], the
    inputs' mean squares; ones by default), instead of plain min/max rounding.

    Candidates per block: ORT's own round-to-nearest (range widened to hold 0: kept as is, so the
    result is never worse than RTN under the weighting), and `steps` ranges [lo', hi'] shrunk from
    the block's [lo, hi] at either end (clipping outliers trades their error for finer steps), each
    rounded, its zero point rounded to an integer, then the scale refitted for the fixed codes
    (weighted least squares, s = sum a w (q - z) / sum a (q - z)^2) and the codes rounded once more
    with it. Vectorised over all blocks at once."""
    if bits not in (4, 2):
        raise ValueError(f"searched packing is for 4 or 2 bits, not {bits}")
    weight, K, N, blocks, pad = _in_blocks(weight, block_size)
    w = np.pad(weight, ((0, pad), (0, 0))).T.reshape(N, blocks, block_size)
    a = np.ones(K, np.float32) if importance is None else np.asarray(importance, np.float32).reshape(K)
    a = np.pad(a, (0, pad)).reshape(1, blocks, block_size)  # padding rows multiply nothing: weight 0
    top = float((1 << bits) - 1)
    lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)

    base = np.einsum("nbk,nbk->nb", a * w, w)[..., None].astype(np.float64)  # sum a w^2

    def codes(s, z):  # one expression everywhere, so the final codes are the ones the search scored
        return np.clip(np.rint(w / s) + z, 0, top)

    def sums(s, z):  # (sum a w (q - z), sum a (q - z)^2) per block
        q = codes(s, z)
        q -= z
        aq = a * q
        return (np.einsum("nbk,nbk->nb", aq, w)[..., None].astype(np.float64),
                np.einsum("nbk,nbk->nb", aq, q)[..., None].astype(np.float64))

    def fit(lo_, hi_, refit: bool):
        s = np.where(hi_ > lo_, (hi_ - lo_) / top, 1.0).astype(np.float32)
        z = np.clip(np.rint(-lo_ / s), 0, top)
        saqw, saqq = sums(s, z)
        for _ in range(refits if refit else 0):  # least-squares scale for these codes, then round again
            s = np.where((saqq > 0) & (saqw > 0), saqw / np.where(saqq > 0, saqq, 1.0), s).astype(np.float32)
            saqw, saqq = sums(s, z)
        return s, z, base - 2 * s * saqw + np.square(s, dtype=np.float64) * saqq  # sum a (w - s (q - z))^2

    # ORT's RTN: the range widened to include 0, scale (hi - lo) / top, zero point rounded.
    best_s, best_z, best_err = fit(np.minimum(lo, 0), np.maximum(hi, 0), refit=False)
    span = hi - lo
    for i in range(steps):
        for lo_cut, hi_cut in ((i, i), (i, 0), (0, i)) if i else ((0, 0),):
            shrink = SEARCH_SHRINK * np.array([lo_cut, hi_cut], np.float32) / max(steps - 1, 1)
            s, z, err = fit(lo + shrink[0] * span, hi - shrink[1] * span, refit=True)
            better = err < best_err
            best_s, best_z, best_err = np.where(better, s, best_s), np.where(better, z, best_z), np.minimum(err, best_err)
    best_q = codes(best_s, best_z)
    data = _pack_codes(best_q.astype(np.uint8).reshape(N * blocks, block_size), bits)
    per_byte = 8 // bits
    z = best_z[..., 0].astype(np.uint8)                                            # [N, blocks]
    z = np.pad(z, ((0, 0), (0, (-blocks) % per_byte)))
    zero_points = _pack_codes(z, bits) if bits < 8 else z
    return Packed(bits, block_size, K, N, np.ascontiguousarray(data.reshape(N, blocks, block_size * bits // 8)),
                  best_s[..., 0].astype(np.float32).reshape(-1), np.ascontiguousarray(zero_points).reshape(-1),
                  searched=True)


def _pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, count] codes < 2^bits -> [rows, count * bits / 8] uint8, low bits first."""
    if bits == 8:
        return q.astype(np.uint8)
    per_byte = 8 // bits
    q = q.astype(np.uint8).reshape(q.shape[0], -1, per_byte)
    out = np.zeros(q.shape[:2], np.uint8)
    for i in range(per_byte):
        out |= q[:, :, i] << np.uint8(i * bits)
    return out


def _unpack(values: np.ndarray, bits: int, count: int) -> np.ndarray:
    """uint8 rows holding 8/bits values each (low bits first) -> [rows, count] uint8."""
    if bits == 8:
        return values[:, :count]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    out = (values[:, :, None] >> shifts) & mask
    return out.reshape(values.shape[0], -1)[:, :count]


def dequantize(packed: Packed) -> np.ndarray:
    """The float32 [K, N] weight a MatMulNBits node holding `packed` multiplies by."""
    N, blocks, bs = packed.N, k_blocks(packed.K, packed.block_size), packed.block_size
    q = _unpack(packed.data.reshape(N, -1), packed.bits, blocks * bs).reshape(N, blocks, bs)
    scales = packed.scales.reshape(N, blocks, 1)
    if packed.offsets is not None:  # s (q - z) + (m + z s)
        w = (q.astype(np.float32) - float(1 << (packed.bits - 1))) * scales + packed.offsets.T[..., None]
        return np.ascontiguousarray(w.reshape(N, blocks * bs)[:, : packed.K].T)
    zp = _unpack(packed.zero_points.reshape(N, -1), packed.bits, blocks).reshape(N, blocks, 1)
    w = (q.astype(np.float32) - zp.astype(np.float32)) * scales
    return np.ascontiguousarray(w.reshape(N, blocks * bs)[:, : packed.K].T)


def fake_quantize(weight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Quantize then dequantize: what the layer computes with at `bits`."""
    return dequantize(pack(weight, bits, block_size))
