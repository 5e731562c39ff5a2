"""Blockwise weight quantization exactly as ONNX Runtime's MatMulNBits stores it.

Packing uses ONNX Runtime's own kernels (`quantize_matmul_{2,4,8}bits`, asymmetric,
integer zero point, round to nearest), and `dequantize` inverts that packing, so a
fake-quantized weight fed to the sensitivity probe is bit for bit the weight the
written MatMulNBits node computes with (before accuracy_level=4's int8 activations).

Layout (MatMulNBits, K x N weight, block b, q bits):
  B            uint8 [N, ceil(K/b), b*q/8]   (column n's blocks along K; low bits first)
  scales       float [N * ceil(K/b)]
  zero_points  uint8 [N * ceil(ceil(K/b)*q/8)]
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
