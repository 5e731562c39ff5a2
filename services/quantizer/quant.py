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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (8, 4, 2)
BLOCK_SIZES = (16, 32, 64, 128, 256)
FP32 = 0  # "bits" of a layer kept in float32


@dataclass(frozen=True)
class Packed:
    bits: int
    block_size: int
    K: int
    N: int
    data: np.ndarray         # uint8 [N, k_blocks, blob]
    scales: np.ndarray       # float32 [N * k_blocks]
    zero_points: np.ndarray  # uint8 [N * zp_per_column]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes + self.zero_points.nbytes


def k_blocks(K: int, block_size: int) -> int:
    return (K + block_size - 1) // block_size


def quantized_bytes(K: int, N: int, bits: int, block_size: int) -> int:
    """Bytes of the MatMulNBits initializers (B, scales, zero points) of a K x N weight;
    4 * K * N for bits == FP32. Exact: equals `Packed.nbytes`."""
    if bits == FP32:
        return 4 * K * N
    blocks = k_blocks(K, block_size)
    per_byte = 8 // bits
    return N * (blocks * (block_size * bits // 8) + 4 * blocks + (blocks + per_byte - 1) // per_byte)


def gather_bytes(K: int, N: int, bits: int, block_size: int, share_data: bool = False) -> int:
    """Bytes of a GatherBlockQuantized table holding the K x N weight (an N x K embedding table):
    data [N, K/b, b*q/8] (none when shared with a MatMulNBits of the same packing), scales
    float [N, K/b, 1], zero points uint8 [N, K/b, 1]. 4 * K * N for bits == FP32."""
    if bits == FP32:
        return 4 * K * N
    if K % block_size:
        raise ValueError(f"a Gather table of width {K} needs a block size dividing it, not {block_size}")
    blocks = K // block_size
    data = 0 if share_data else N * blocks * (block_size * bits // 8)
    return data + 4 * N * blocks + N * blocks


def gather_arrays(packed: Packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, scales, zero_points) of GatherBlockQuantized for a table packed as its transpose."""
    N, blocks = packed.N, k_blocks(packed.K, packed.block_size)
    if packed.K % packed.block_size:
        raise ValueError("a Gather table needs a block size dividing its width")
    zero_points = _unpack(packed.zero_points.reshape(N, -1), packed.bits, blocks).reshape(N, blocks, 1)
    return packed.data, packed.scales.reshape(N, blocks, 1), np.ascontiguousarray(zero_points, dtype=np.uint8)


def pack(weight: np.ndarray, bits: int, block_size: int) -> Packed:
    """Quantize a float32 [K, N] MatMul weight the way MatMulNBits stores it."""
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_2bits, quantize_matmul_4bits, quantize_matmul_8bits,
    )

    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    weight = np.asarray(weight, dtype=np.float32)
    K, N = weight.shape
    blocks = k_blocks(K, block_size)
    pad = blocks * block_size - K
    padded = np.ascontiguousarray(np.pad(weight, ((0, pad), (0, 0))) if pad else weight)
    per_byte = 8 // bits
    data = np.zeros((N, blocks, block_size * bits // 8), dtype=np.uint8)
    zero_points = np.zeros((N, (blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((N, blocks), dtype=np.float32)
    kernel = {2: quantize_matmul_2bits, 4: quantize_matmul_4bits, 8: quantize_matmul_8bits}[bits]
    kernel(data, padded, scales, zero_points, block_size, N, K + pad, False)
    return Packed(bits, block_size, K, N, data, scales.reshape(-1), zero_points.reshape(-1))


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
    zp = _unpack(packed.zero_points.reshape(N, -1), packed.bits, blocks).reshape(N, blocks, 1)
    scales = packed.scales.reshape(N, blocks, 1)
    w = (q.astype(np.float32) - zp.astype(np.float32)) * scales
    return np.ascontiguousarray(w.reshape(N, blocks * bs)[:, : packed.K].T)


def fake_quantize(weight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Quantize then dequantize: what the layer computes with at `bits`."""
    return dequantize(pack(weight, bits, block_size))
