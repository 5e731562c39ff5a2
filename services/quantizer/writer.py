"""Writes a mixed-precision model: each chosen layer's MatMul becomes a MatMulNBits
node (com.microsoft, accuracy_level=4, the configured block size) holding that
layer's bits; fp32 layers stay MatMul. Same graph inputs and outputs as the source,
so the model host serves the result unchanged.

A tied lm_head (MatMul over Transpose(embedding table)) that gets bits receives its
own quantized copy; the fp32 table stays for the embedding Gather.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from services.common.model_repository import ModelManifest, ModelRepository
from services.quantizer import quant
from services.quantizer.model import DecoderGraph, _prune_dead_nodes, _shallow_copy_without_initializers
from services.quantizer.sensitivity import PackCache

ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
NODE_OVERHEAD_BYTES = 512  # allowance per MatMulNBits node for its names and attributes on disk


def predicted_weight_bytes(decoder: DecoderGraph, bits: Mapping[str, int], block_size: int) -> int:
    """Exact bytes of every initializer of the written model (see `build_model`)."""
    replaced = {name for name, b in bits.items() if b != quant.FP32 and not decoder.layer(name).tied_to}
    total = decoder.initializer_bytes(exclude=replaced)
    for name, b in bits.items():
        if b != quant.FP32:
            K, N = decoder.layer(name).shape
            total += quant.quantized_bytes(K, N, b, block_size)
    return total


def graph_overhead_bytes(decoder: DecoderGraph) -> int:
    """On-disk bytes of the graph itself (everything but initializer data)."""
    return len(_shallow_copy_without_initializers(decoder.model).SerializeToString())


def build_model(
    decoder: DecoderGraph, packs: PackCache, bits: Mapping[str, int], accuracy_level: int = ACCURACY_LEVEL
) -> onnx.ModelProto:
    """The source graph with MatMulNBits for every layer whose bits are not FP32."""
    model = _shallow_copy_without_initializers(decoder.model)
    graph = model.graph
    replaced: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    by_node = {n.name: i for i, n in enumerate(graph.node)}
    for layer in decoder.layers:
        b = bits.get(layer.name, quant.FP32)
        if b == quant.FP32:
            continue
        packed = packs.get(layer, b)
        index = by_node[layer.node]
        old = graph.node[index]
        base = layer.name.replace(":", "_").replace("/", "_")
        names = [f"{base}_Q{b}", f"{base}_scales", f"{base}_zero_points"]
        new_inits += [numpy_helper.from_array(packed.data, names[0]), numpy_helper.from_array(packed.scales, names[1]),
                      numpy_helper.from_array(packed.zero_points, names[2])]
        node = helper.make_node(
            "MatMulNBits", [old.input[0], *names], list(old.output), name=f"{old.name}_Q{b}", domain=MS_DOMAIN,
            K=layer.shape[0], N=layer.shape[1], bits=b, block_size=packs.block_size, accuracy_level=accuracy_level,
        )
        graph.node[index].CopyFrom(node)
        if not layer.tied_to:
            replaced.add(layer.name)
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
        "method": "mixed-precision MatMulNBits (blockwise RTN, asymmetric, integer zero point)",
        "source_model": source.reference,
        "layer_bits": dict(layer_bits),
        **facts,
    }
    return ModelManifest(
        name=output_name, version=version, task=source.task, files=files, architecture=source.architecture,
        source={"kind": "quantizer", "model": source.reference}, licence=source.licence,
        generation=json.loads(json.dumps(source.generation)), extra=extra,
    )
