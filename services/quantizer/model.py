"""An ONNX decoder as the quantizer sees it: its MatMul weights, and forward passes.

`DecoderGraph.load` reads an optimum-style decoder (input_ids, attention_mask,
position_ids, past_key_values.*, logits), rewrites Gemm nodes with a constant
weight as MatMul (+ Add), and lists every MatMul whose right operand is a 2-D
float initializer, or the Transpose of one (a tied lm_head). Those are the layers
the quantizer measures and gives bits to.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PROBE_PREFIX = "mirador_probe::"


class NotADecoderError(ValueError):
    """The graph lacks the inputs/outputs of a text-generation decoder."""


@dataclass(frozen=True)
class Layer:
    """One quantizable MatMul weight."""

    name: str                 # weight initializer name (for a tied lm_head, the table's name + ".T")
    node: str                 # MatMul node name
    shape: tuple[int, int]    # (K, N): the weight as the MatMul multiplies by it
    tied_to: str | None = None  # initializer this weight is the transpose of (shared with a Gather)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def label(self) -> str:
        """A readable name: the node's path without the op suffix."""
        node = self.node.strip("/")
        return node[: -len("/MatMul")] if node.endswith("/MatMul") else node


def _rewrite_gemm(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> int:
    """Gemm(A, B[, C]) with a constant 2-D B and transA=0 -> MatMul(A, alpha*B') [+ beta*C]."""
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if attrs.get("transB", 0):
            weight = weight.T
        weight = np.ascontiguousarray(weight * np.float32(attrs.get("alpha", 1.0)))
        new_name = f"{node.input[1]}__gemm_as_matmul"
        graph.initializer.append(numpy_helper.from_array(weight, new_name))
        inits[new_name] = graph.initializer[-1]
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{out}__matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], new_name], [mm_out], name=f"{node.name}/MatMul"))
        if has_bias:
            beta = np.float32(attrs.get("beta", 1.0))
            bias = node.input[2]
            if beta != 1.0:
                scaled = f"{out}__beta"
                graph.initializer.append(numpy_helper.from_array(np.array(beta, np.float32), scaled + "_c"))
                nodes.append(helper.make_node("Mul", [bias, scaled + "_c"], [scaled], name=f"{node.name}/beta"))
                bias = scaled
            nodes.append(helper.make_node("Add", [mm_out, bias], [out], name=f"{node.name}/Add"))
        rewritten += 1
    if rewritten:
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        keep = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return rewritten


class DecoderGraph:
    def __init__(self, model: onnx.ModelProto, source: str = "model"):
        self.model = model
        self.source = source
        graph = model.graph
        inputs = {i.name for i in graph.input}
        outputs = [o.name for o in graph.output]
        if "input_ids" not in inputs or "logits" not in outputs:
            raise NotADecoderError(
                f"{source} is not a decoder: it needs an `input_ids` input and a `logits` output "
                f"(it has inputs {sorted(inputs)[:6]} and outputs {outputs[:6]})"
            )
        self.inits = {t.name: t for t in graph.initializer}
        self.gemms_rewritten = _rewrite_gemm(graph, self.inits)
        self.inits = {t.name: t for t in graph.initializer}
        producers = {o: n for n in graph.node for o in n.output}
        self.layers: list[Layer] = []
        self._node_index: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            if node.op_type != "MatMul" or len(node.input) != 2:
                continue
            if not node.name:
                node.name = f"MatMul_{index}"
            weight = node.input[1]
            tied = None
            if weight in self.inits:
                tensor = self.inits[weight]
            else:
                producer = producers.get(weight)
                if producer is None or producer.op_type != "Transpose" or producer.input[0] not in self.inits:
                    continue
                perm = [a.ints for a in producer.attribute if a.name == "perm"]
                if perm and list(perm[0]) != [1, 0]:
                    continue
                tensor = self.inits[producer.input[0]]
                tied = tensor.name
            if len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
                continue
            K, N = (tensor.dims[1], tensor.dims[0]) if tied else (tensor.dims[0], tensor.dims[1])
            name = f"{tied}.T" if tied else weight
            self.layers.append(Layer(name, node.name, (int(K), int(N)), tied))
            self._node_index[node.name] = index
        if not self.layers:
            raise NotADecoderError(f"{source} has no MatMul with a constant float weight to quantize")
        self._weights: dict[str, np.ndarray] = {}

    @classmethod
    def load(cls, path: str | Path) -> "DecoderGraph":
        try:
            model = onnx.load(str(path), load_external_data=True)
        except Exception as exc:  # noqa: BLE001 - a broken file gets a readable reason
            raise NotADecoderError(f"{path} is not a readable ONNX model: {exc}") from None
        return cls(model, source=str(path))

    # ---- facts

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def node_of(self, layer: Layer) -> onnx.NodeProto:
        return self.model.graph.node[self._node_index[layer.node]]

    def weight(self, layer: Layer) -> np.ndarray:
        """The float32 [K, N] weight (cached)."""
        if layer.name not in self._weights:
            source = layer.tied_to or layer.name
            array = numpy_helper.to_array(self.inits[source]).astype(np.float32, copy=False)
            self._weights[layer.name] = np.ascontiguousarray(array.T if layer.tied_to else array)
        return self._weights[layer.name]

    def initializer_bytes(self, exclude: set[str] = frozenset()) -> int:
        """Bytes of the raw data of every initializer not in `exclude`."""
        total = 0
        for t in self.model.graph.initializer:
            if t.name in exclude:
                continue
            count = int(np.prod(t.dims)) if t.dims else 1
            total += count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        return total

    def tied_tables(self) -> set[str]:
        return {layer.tied_to for layer in self.layers if layer.tied_to}

    def untied_weight_names(self) -> set[str]:
        return {layer.name for layer in self.layers if not layer.tied_to}

    def kv_shape(self) -> dict[str, list]:
        """Past-cache inputs and their (batch, heads, 0, head_dim) shapes."""
        shapes = {}
        for value in self.model.graph.input:
            if value.name.startswith("past_key_values."):
                dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
                shapes[value.name] = dims
        return shapes

    # ---- derived graphs

    def probe_model(self) -> onnx.ModelProto:
        """The same graph with every layer's weight as a graph input (named PROBE_PREFIX + name)."""
        model = _shallow_copy_without_initializers(self.model)  # never copies 500 MB of weights
        graph = model.graph
        untied = self.untied_weight_names()
        keep = [t for t in self.model.graph.initializer if t.name not in untied]
        graph.initializer.extend(keep)
        for layer in self.layers:
            node = graph.node[self._node_index[layer.node]]
            node.input[1] = PROBE_PREFIX + layer.name
            graph.input.append(helper.make_tensor_value_info(PROBE_PREFIX + layer.name, TensorProto.FLOAT,
                                                             list(layer.shape)))
        _prune_dead_nodes(graph)
        return model


def _shallow_copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    saved = list(graph.initializer)
    del graph.initializer[:]
    try:
        clone = copy.deepcopy(model)
    finally:
        graph.initializer.extend(saved)
    return clone


def _prune_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs is used (e.g. the tied lm_head's Transpose)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        alive = [n for n in graph.node if any(o in used for o in n.output)]
        if len(alive) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(alive)
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


# ------------------------------------------------------------------ running a decoder


def decoder_feeds(session, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Full-sequence forward feeds: all-ones mask, positions 0..S-1, empty past."""
    batch, steps = input_ids.shape
    feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64)}
    for value in session.get_inputs():
        name = value.name
        if name == "attention_mask":
            feeds[name] = np.ones((batch, steps), np.int64)
        elif name == "position_ids":
            feeds[name] = np.ascontiguousarray(np.broadcast_to(np.arange(steps, dtype=np.int64), (batch, steps)))
        elif name.startswith("past_key_values."):
            dims = [d if isinstance(d, int) else 0 for d in value.shape]
            dims[0], dims[2] = batch, 0
            feeds[name] = np.zeros(dims, np.float32)
    return feeds


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def mean_kl(ref_logp: np.ndarray, ref_p: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(ref || softmax(logits))."""
    logq = log_softmax(logits)
    return float(np.mean(np.sum(ref_p * (ref_logp - logq), axis=-1)))


def session_options(threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # On a shared, busy machine spinning worker threads steal the cores they wait for.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
