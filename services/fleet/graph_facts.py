"""Reading an exported ONNX graph's inputs and outputs, so the manifest can tell a
serving loop how to feed it (especially the past_key_values naming of decoders)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# optimum names cache tensors "past_key_values.3.key" (inputs) and "present.3.value"
# (outputs); match any "<prefix><layer><sep><key|value>" so other exporters work too.
_CACHE_NAME = re.compile(r"^(?P<prefix>.*?)(?P<layer>\d+)(?P<sep>[._/])(?P<kind>key|value)$")


class GraphFactsError(ValueError):
    pass


def graph_io(model_path: Path) -> tuple[list[str], list[str]]:
    """Input and output names of an ONNX model, without loading its weights."""
    import onnx  # build-time only

    model = onnx.load(str(model_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    outputs = [o.name for o in model.graph.output]
    return inputs, outputs


def _cache_pattern(names: list[str], what: str) -> tuple[str | None, int]:
    matches = [m for m in map(_CACHE_NAME.match, names) if m]
    if not matches:
        return None, 0
    prefixes = {(m["prefix"], m["sep"]) for m in matches}
    if len(prefixes) != 1:
        raise GraphFactsError(f"{what} cache tensors use several naming patterns: {sorted(prefixes)}")
    (prefix, sep), = prefixes
    layers = sorted({int(m["layer"]) for m in matches})
    if layers != list(range(len(layers))):
        raise GraphFactsError(f"{what} cache layers are not 0..N-1: {layers}")
    expected = {f"{prefix}{layer}{sep}{kind}" for layer in layers for kind in ("key", "value")}
    missing = expected - {m.string for m in matches}
    if missing:
        raise GraphFactsError(f"{what} cache tensors missing: {sorted(missing)}")
    return f"{prefix}{{layer}}{sep}{{kind}}", len(layers)


def describe_decoder_io(inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    """Manifest `generation` facts about a decoder graph's inputs and outputs."""
    input_pattern, input_layers = _cache_pattern(inputs, "input")
    output_pattern, output_layers = _cache_pattern(outputs, "output")
    if input_pattern is None or output_pattern is None:
        raise GraphFactsError(
            "decoder graph has no past_key_values inputs/outputs; export it with a "
            "'-with-past' task so generation can reuse its KV cache"
        )
    if input_layers != output_layers:
        raise GraphFactsError(f"graph takes {input_layers} cache layers but returns {output_layers}")
    plain_inputs = [name for name in inputs if not _CACHE_NAME.match(name)]
    plain_outputs = [name for name in outputs if not _CACHE_NAME.match(name)]
    return {
        "input_names": plain_inputs,
        "output_names": plain_outputs,
        "past_key_values": {
            "input_pattern": input_pattern,
            "output_pattern": output_pattern,
            "kinds": ["key", "value"],
            "num_layers": input_layers,
            # Axis layout the optimum llama export uses; head counts are in the facts.
            "layout": ["batch", "num_kv_heads", "sequence", "head_dim"],
        },
    }


def describe_encoder_io(inputs: list[str], outputs: list[str]) -> dict[str, Any]:
    return {"input_names": list(inputs), "output_names": list(outputs)}
