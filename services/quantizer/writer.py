"""Writes a mixed-precision model: each chosen layer's MatMul becomes a MatMulNBits
node (com.microsoft, accuracy_level=4, the configured block size) holding that
layer's bits; fp32 layers stay MatMul. The token embedding's Gather, when it gets
bits, becomes GatherBlockQuantized (uint8 data, 3-D [V, H/b, b] form, quantize_axis 2)
followed by a Reshape to [..., H]. Same graph inputs and outputs as the source, so the
model host serves the result unchanged.

An lm_head tied to the embedding in the source (untied by model.DecoderGraph):
- both fp32: written tied again (MatMul over Transpose(table)), as small as the source;
- one quantized: each has its own weight (the fp32 one keeps a full fp32 table);
- both at the same bits: the Gather reads the head's packed MatMulNBits data
  (one copy; each keeps its own scales and zero points, whose layouts differ).

A float-minimum code (quant.Q4F / Q2F, MatMuls only) is MatMulNBits with the default zero point
plus `block_sum(x) @ offsets` (an Add after it), block_sum(x) being x times a 0/1 [K, blocks]
indicator: one indicator initializer per K and one block-sum MatMul per input, shared by every
float-minimum layer reading it (see quant.py).

`item_bytes` gives the exact initializer bytes of each choice; `predicted_weight_bytes`
sums them, and the tests check it equals the written model's initializer bytes.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from services.common.model_repository import ModelManifest, ModelRepository
from services.quantizer import quant
from services.quantizer.model import DecoderGraph, Layer, _prune_dead_nodes, _shallow_copy_without_initializers
from services.quantizer.sensitivity import PackCache

ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
NODE_OVERHEAD_BYTES = 512  # allowance per MatMulNBits node for its names and attributes on disk


def item_bytes(decoder: DecoderGraph, item: tuple[Layer, ...], labels: tuple[int, ...], block_size: int) -> int:
    """Exact initializer bytes of one allocation item (a layer, or an embedding + its tied head) at `labels`."""
    if len(item) == 1:
        layer, b = item[0], labels[0]
        K, N = layer.shape
        if layer.kind == "gather":
            return quant.gather_bytes(K, N, b, block_size)
        if b == quant.FP32 and layer.tied_to:  # written tied again: the table (a fixed initializer) serves it
            return 0
        return quant.quantized_bytes(K, N, b, block_size)
    (emb, _), (e, h) = item, labels
    K, N = emb.shape
    if e == h == quant.FP32:
        return 4 * K * N  # one shared fp32 table, as in the source
    shared = e == h
    return quant.gather_bytes(K, N, e, block_size, share_data=shared) + quant.quantized_bytes(K, N, h, block_size)


def indicator_bytes(K: int, block_size: int) -> int:
    """Bytes of the float [K, blocks] 0/1 matrix whose product with x sums x over each block."""
    return 4 * K * quant.k_blocks(K, block_size)


def shared_bytes(decoder: DecoderGraph, bits: Mapping[str, int], block_size: int) -> int:
    """Initializers several layers share: one block-sum indicator per K among float-minimum layers."""
    ks = {layer.shape[0] for layer in decoder.layers if quant.is_float_min(bits.get(layer.name, quant.FP32))}
    return sum(indicator_bytes(K, block_size) for K in ks)


def max_shared_bytes(decoder: DecoderGraph, block_size: int) -> int:
    """`shared_bytes` with every MatMul at a float-minimum code: what an allocation reserves for them."""
    return sum(indicator_bytes(K, block_size) for K in {l.shape[0] for l in decoder.layers if l.kind == "matmul"})


def predicted_weight_bytes(decoder: DecoderGraph, bits: Mapping[str, int], block_size: int) -> int:
    """Exact bytes of every initializer of the written model (see `build_model`)."""
    total = decoder.initializer_bytes(exclude=decoder.weight_names()) + shared_bytes(decoder, bits, block_size)
    for item in decoder.items():
        total += item_bytes(decoder, item, tuple(bits.get(layer.name, quant.FP32) for layer in item), block_size)
    return total


def graph_overhead_bytes(decoder: DecoderGraph) -> int:
    """On-disk bytes of the graph itself (everything but initializer data)."""
    return len(_shallow_copy_without_initializers(decoder.model).SerializeToString())


def _safe(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def build_model(
    decoder: DecoderGraph, packs: PackCache, bits: Mapping[str, int], accuracy_level: int = ACCURACY_LEVEL
) -> onnx.ModelProto:
    """The source graph with MatMulNBits / GatherBlockQuantized for every layer whose bits are not FP32."""
    model = _shallow_copy_without_initializers(decoder.model)
    graph = model.graph
    replaced: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    by_node = {n.name: i for i, n in enumerate(graph.node)}
    replacement: dict[int, list[onnx.NodeProto]] = {}  # node index -> the nodes written in its place
    data_names: dict[tuple[str, int], str] = {}       # (pack key, bits) -> MatMulNBits data written
    indicators: dict[int, str] = {}                   # K -> block-sum indicator initializer
    block_sums: dict[str, str] = {}                   # input -> its block sums (float-minimum layers)
    # Heads first (the Gather may share their data), in graph order (a shared block sum precedes its users).
    order = sorted(decoder.layers, key=lambda layer: (layer.kind == "gather", by_node[layer.node]))
    for layer in order:
        b = bits.get(layer.name, quant.FP32)
        index = by_node[layer.node]
        old = graph.node[index]
        if b == quant.FP32:
            if layer.tied_to:  # retie: MatMul(x, Transpose(table)); the untied copy is dropped
                transpose = copy.deepcopy(decoder.retie_transpose(layer.name))
                node = copy.deepcopy(old)
                node.input[1] = transpose.output[0]
                replacement[index] = [transpose, node]
                replaced.add(layer.name)
            continue
        packed = packs.get(layer, b)
        base = _safe(layer.name)
        head = decoder.paired_head(layer) if layer.kind == "gather" else None
        if head is None or bits.get(head.name, quant.FP32) != quant.FP32:  # else the retied head reads the table
            replaced.add(layer.name)
        if layer.kind == "matmul" and quant.is_float_min(b):
            K, N, x = layer.shape[0], layer.shape[1], old.input[0]
            q = quant.nbits(b)
            names = [f"{base}_Q{q}f", f"{base}_scales", f"{base}_offsets"]
            new_inits += [numpy_helper.from_array(packed.data, names[0]),
                          numpy_helper.from_array(packed.scales, names[1]),
                          numpy_helper.from_array(packed.offsets, names[2])]
            nodes = []
            if K not in indicators:
                indicators[K] = f"block_sum_indicator_K{K}_b{packs.block_size}"
                blocks = quant.k_blocks(K, packs.block_size)
                ind = np.repeat(np.eye(blocks, dtype=np.float32), packs.block_size, axis=0)[:K]
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(ind), indicators[K]))
            if x not in block_sums:
                block_sums[x] = f"{_safe(x)}/block_sums_b{packs.block_size}"
                nodes.append(helper.make_node("MatMul", [x, indicators[K]], [block_sums[x]],
                                              name=f"{_safe(x)}/block_sum"))
            stem = f"{old.name}_Q{q}f"
            nodes += [
                helper.make_node("MatMulNBits", [x, names[0], names[1]], [f"{stem}/scaled"], name=stem,
                                 domain=MS_DOMAIN, K=K, N=N, bits=q, block_size=packs.block_size,
                                 accuracy_level=accuracy_level),
                helper.make_node("MatMul", [block_sums[x], names[2]], [f"{stem}/offsets"], name=f"{stem}/offsets"),
                helper.make_node("Add", [f"{stem}/scaled", f"{stem}/offsets"], list(old.output), name=f"{stem}/add"),
            ]
            replacement[index] = nodes
            continue
        name_b, b = quant.code_name(b), quant.nbits(b)  # a searched code is written as its plain bits
        if layer.kind == "matmul":
            names = [f"{base}_Q{name_b}", f"{base}_scales", f"{base}_zero_points"]
            new_inits += [numpy_helper.from_array(packed.data, names[0]),
                          numpy_helper.from_array(packed.scales, names[1]),
                          numpy_helper.from_array(packed.zero_points, names[2])]
            data_names[(decoder.pack_key(layer), name_b)] = names[0]
            replacement[index] = [helper.make_node(
                "MatMulNBits", [old.input[0], *names], list(old.output), name=f"{old.name}_Q{b}", domain=MS_DOMAIN,
                K=layer.shape[0], N=layer.shape[1], bits=b, block_size=packs.block_size,
                accuracy_level=accuracy_level)]
            continue
        data, scales, zero_points = quant.gather_arrays(packed)
        names = [f"{base}_gather_Q{name_b}", f"{base}_gather_scales", f"{base}_gather_zero_points"]
        shared = data_names.get((decoder.pack_key(layer), name_b))
        if shared:
            names[0] = shared
        else:
            new_inits.append(numpy_helper.from_array(data, names[0]))
        new_inits += [numpy_helper.from_array(scales, names[1]), numpy_helper.from_array(zero_points, names[2])]
        out, indices, stem = old.output[0], old.input[1], f"{old.name}_Q{b}"
        replacement[index] = [
            helper.make_node("GatherBlockQuantized", [names[0], indices, names[1], names[2]], [f"{stem}/blocks"],
                             name=stem, domain=MS_DOMAIN, bits=b, block_size=packs.block_size, gather_axis=0,
                             quantize_axis=2),
            helper.make_node("Shape", [indices], [f"{stem}/indices_shape"], name=f"{stem}/Shape"),
            helper.make_node("Constant", [], [f"{stem}/width"], name=f"{stem}/width",
                             value=numpy_helper.from_array(np.array([layer.shape[0]], np.int64))),
            helper.make_node("Concat", [f"{stem}/indices_shape", f"{stem}/width"], [f"{stem}/shape"],
                             name=f"{stem}/Concat", axis=0),
            helper.make_node("Reshape", [f"{stem}/blocks", f"{stem}/shape"], [out], name=f"{stem}/Reshape"),
        ]
    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(replacement.get(i, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(t for t in decoder.model.graph.initializer if t.name not in replaced)
    graph.initializer.extend(new_inits)
    _prune_dead_nodes(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return model


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
               for t in model.graph.initializer)


def next_version(repository: ModelRepository, name: str) -> str:
    numeric = [int(v) for v in repository.versions(name) if v.isdigit()]
    return str(max(numeric, default=0) + 1)


def stage_files(
    folder: Path, model: onnx.ModelProto, source: ModelManifest, layer_bits: Mapping[str, int],
    facts: dict, output_name: str, version: str,
) -> ModelManifest:
    """Writes model.onnx (+ the source's tokenizer) into a staging folder; returns the manifest to publish."""
    onnx.save(model, str(folder / "model.onnx"))
    files = {"model": "model.onnx"}
    if "tokenizer" in source.files:
        shutil.copyfile(source.path_of("tokenizer"), folder / "tokenizer.json")
        files["tokenizer"] = "tokenizer.json"
    extra = {k: v for k, v in source.extra.items() if k not in ("quantization",)}
    extra["quantization"] = {
        "method": ("mixed-precision MatMulNBits + GatherBlockQuantized (blockwise; 8/4/2: RTN, integer zero point; "
                   "4f/2f: searched scale and float minimum, written as MatMulNBits + block-sum offsets)"),
        "source_model": source.reference,
        "layer_bits": dict(layer_bits),
        **facts,
    }
    return ModelManifest(
        name=output_name, version=version, task=source.task, files=files, architecture=source.architecture,
        source={"kind": "quantizer", "model": source.reference}, licence=source.licence,
        generation=json.loads(json.dumps(source.generation)), extra=extra,
    )
