"""An ONNX decoder as the quantizer sees it: its weights, and forward passes.

`DecoderGraph.load` reads an optimum-style decoder (input_ids, attention_mask,
position_ids, past_key_values.*, logits), rewrites Gemm nodes with a constant
weight as MatMul (+ Add), and lists the layers the quantizer measures and gives
bits to:

- every MatMul whose right operand is a 2-D float initializer;
- the token embedding: a Gather (axis 0) of a 2-D float initializer by `input_ids`.
  It is packed as its transpose (K = hidden, N = vocab), see quant.py;
- an lm_head tied to the embedding (MatMul over Transpose(table)) is *untied* here:
  it gets its own initializer `<table>.T` (the transposed table) and is a plain
  MatMul layer like any other. `ties` remembers the pair, so a model whose embedding
  and head both stay fp32 is written tied again (no bigger than the source), and a
  head quantized at the embedding's bits shares its packed data with the Gather.
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
    tied_to: str | None = None  # the embedding table this (untied) lm_head was the transpose of in the source
    kind: str = "matmul"        # "matmul", or "gather" (the token embedding; `name` is its table)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def label(self) -> str:
        """A readable name: the node's path without the op suffix."""
        node = self.node.strip("/")
        for suffix in ("/MatMul", "/Gather"):
            if node.endswith(suffix):
                return node[: -len(suffix)]
        return node


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
        self.source_initializer_bytes = self.initializer_bytes()  # before untying: the fp32 baseline
        self.ties: dict[str, str] = {}               # untied lm_head layer name -> embedding table
        self._retie: dict[str, onnx.NodeProto] = {}  # untied lm_head layer name -> its source Transpose
        self._split_transposed_embedding()
        self._untie()
        self.layers: list[Layer] = []
        self._node_index: dict[str, int] = {}
        input_names = {i.name for i in graph.input}
        for index, node in enumerate(graph.node):
            if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] == "input_ids" \
                    and node.input[1] in input_names and node.input[0] in self.inits:
                axis = [a.i for a in node.attribute if a.name == "axis"]
                tensor = self.inits[node.input[0]]
                if (axis and axis[0] != 0) or len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
                    continue
                if not node.name:
                    node.name = f"Gather_{index}"
                V, H = int(tensor.dims[0]), int(tensor.dims[1])
                self.layers.append(Layer(tensor.name, node.name, (H, V), None, "gather"))
                self._node_index[node.name] = index
                continue
            if node.op_type != "MatMul" or len(node.input) != 2:
                continue
            if not node.name:
                node.name = f"MatMul_{index}"
            weight = node.input[1]
            if weight not in self.inits:
                continue
            tensor = self.inits[weight]
            if len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
                continue
            K, N = tensor.dims[0], tensor.dims[1]
            self.layers.append(Layer(weight, node.name, (int(K), int(N)), self.ties.get(weight)))
            self._node_index[node.name] = index
        if not any(layer.kind == "matmul" for layer in self.layers):
            raise NotADecoderError(f"{source} has no MatMul with a constant float weight to quantize")
        self._weights: dict[str, np.ndarray] = {}

    def _split_transposed_embedding(self) -> None:
        """Mirador's fused graph keeps ONE fp32 table, [hidden, vocab]: the lm_head's MatMul weight, from
        which the embedding gathers columns (Gather axis 1, then Transpose to [batch, seq, hidden]). Here
        the embedding gets its own [vocab, hidden] table read by a plain Gather (axis 0), the form every
        layer rule below knows, and the head is recorded as tied to it: both fp32 are written tied again
        (one table), both at the same bits share one packed copy."""
        graph = self.model.graph
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        for gather in graph.node:
            axis = [a.i for a in gather.attribute if a.name == "axis"]
            if gather.op_type != "Gather" or list(gather.input[1:]) != ["input_ids"] or axis != [1] \
                    or gather.input[0] not in self.inits:
                continue
            table_t = self.inits[gather.input[0]]
            after = consumers.get(gather.output[0], [])
            if len(table_t.dims) != 2 or table_t.data_type != TensorProto.FLOAT or len(after) != 1 \
                    or after[0].op_type != "Transpose" \
                    or [list(a.ints) for a in after[0].attribute if a.name == "perm"] != [[1, 2, 0]]:
                continue
            transpose = after[0]
            rows = f"{table_t.name}.rows"
            array = numpy_helper.to_array(table_t).astype(np.float32, copy=False)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), rows))
            self.inits[rows] = graph.initializer[-1]
            gather.input[0] = rows
            del gather.attribute[:]
            gather.output[0] = transpose.output[0]
            graph.node.remove(transpose)
            heads = [n for n in consumers.get(table_t.name, []) if n.op_type == "MatMul" and n.input[1] == table_t.name]
            if heads:
                self.ties[table_t.name] = rows
                self._retie[table_t.name] = helper.make_node(
                    "Transpose", [rows], [f"{rows}/transposed"], name=f"{rows}/Transpose", perm=[1, 0])
            _prune_dead_nodes(graph)
            self.inits = {t.name: t for t in graph.initializer}
            return

    def _untie(self) -> None:
        """MatMul(x, Transpose(table)) -> MatMul(x, `<table>.T`), a new initializer."""
        graph = self.model.graph
        producers = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] in self.inits:
                continue
            producer = producers.get(node.input[1])
            if producer is None or producer.op_type != "Transpose" or producer.input[0] not in self.inits:
                continue
            perm = [a.ints for a in producer.attribute if a.name == "perm"]
            table = self.inits[producer.input[0]]
            if (perm and list(perm[0]) != [1, 0]) or len(table.dims) != 2 or table.data_type != TensorProto.FLOAT:
                continue
            name = f"{table.name}.T"
            if name not in self.inits:
                array = numpy_helper.to_array(table).astype(np.float32, copy=False)
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array.T), name))
                self.inits[name] = graph.initializer[-1]
            self._retie[name] = copy.deepcopy(producer)
            self._retie[name].input[0] = table.name
            self.ties[name] = table.name
            node.input[1] = name
        if self.ties:
            _prune_dead_nodes(graph)
            self.inits = {t.name: t for t in graph.initializer}

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
        """The float32 [K, N] weight as packed (an embedding's: its transposed table; cached)."""
        key = self.pack_key(layer)
        if key not in self._weights:
            if layer.kind == "gather" and key == layer.name:
                self._weights[key] = np.ascontiguousarray(self.table(layer).T)
            else:
                self._weights[key] = numpy_helper.to_array(self.inits[key]).astype(np.float32, copy=False)
        return self._weights[key]

    def table(self, layer: Layer) -> np.ndarray:
        """An embedding layer's [V, H] table as the Gather reads it."""
        return numpy_helper.to_array(self.inits[layer.name]).astype(np.float32, copy=False)

    def graph_array(self, layer: Layer, weight: np.ndarray) -> np.ndarray:
        """A [K, N] weight in the orientation its node reads it (a Gather reads the transpose)."""
        return np.ascontiguousarray(weight.T) if layer.kind == "gather" else weight

    def pack_key(self, layer: Layer) -> str:
        """Layers with the same key have the same packed form: an embedding and its untied head."""
        if layer.kind == "gather":
            return next((head for head, table in self.ties.items() if table == layer.name), layer.name)
        return layer.name

    def paired_head(self, layer: Layer) -> Layer | None:
        """The untied lm_head of an embedding layer, if the source tied them."""
        head = next((h for h, table in self.ties.items() if table == layer.name), None)
        return self.layer(head) if head else None

    def items(self) -> list[tuple[Layer, ...]]:
        """Allocation items: each layer alone, except an embedding and its tied head, which are one
        item (their sizes depend on each other: both fp32 share one table, same bits share data)."""
        gathers = {layer.name for layer in self.layers if layer.kind == "gather"}
        heads = {table: head for head, table in self.ties.items() if table in gathers}
        paired = set(heads.values())
        out = []
        for layer in self.layers:
            if layer.name in paired:
                continue
            if layer.kind == "gather" and layer.name in heads:
                out.append((layer, self.layer(heads[layer.name])))
            else:
                out.append((layer,))
        return out

    def retie_transpose(self, head: str) -> onnx.NodeProto:
        return self._retie[head]

    def initializer_bytes(self, exclude: set[str] = frozenset()) -> int:
        """Bytes of the raw data of every initializer not in `exclude`."""
        total = 0
        for t in self.model.graph.initializer:
            if t.name in exclude:
                continue
            count = int(np.prod(t.dims)) if t.dims else 1
            total += count * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        return total

    def weight_names(self) -> set[str]:
        """Initializers that are layer weights (MatMul weights, embedding tables, untied heads)."""
        return {layer.name for layer in self.layers}

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
        weights = self.weight_names()
        graph.initializer.extend(t for t in self.model.graph.initializer if t.name not in weights)
        for layer in self.layers:
            node = graph.node[self._node_index[layer.node]]
            slot = 0 if layer.kind == "gather" else 1
            node.input[slot] = PROBE_PREFIX + layer.name
            shape = [layer.shape[1], layer.shape[0]] if layer.kind == "gather" else list(layer.shape)
            graph.input.append(helper.make_tensor_value_info(PROBE_PREFIX + layer.name, TensorProto.FLOAT, shape))
        _prune_dead_nodes(graph)
        return model


def _shallow_copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its graph's initializers, leaving `model` untouched. (Emptying and
    refilling `model.graph.initializer` around a deepcopy, as this once did, copies every initializer
    back into the source's protobuf arena (upb), which only frees with the source: ~0.6 GB more per
    call on SmolLM2, 13 GB over one quantize run.)"""
    clone = onnx.ModelProto()
    _copy_fields(model, clone, skip="graph")
    _copy_fields(model.graph, clone.graph, skip="initializer")
    return clone


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if not isinstance(value, (str, bytes)) and hasattr(value, "extend"):  # a repeated field
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


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
        elif name == "logits_to_keep":  # Mirador's fused graph: every position's logits
            feeds[name] = np.asarray([steps], np.int64)
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
