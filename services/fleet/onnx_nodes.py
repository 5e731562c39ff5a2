"""Small helpers that append nodes to the specialists' ONNX graphs."""

from __future__ import annotations

import numpy as np

OPSET = 18


class Nodes:
    """Appends nodes with unique, prefixed names to a graph."""

    def __init__(self, graph, prefix: str):
        self.graph, self.prefix, self.count = graph, prefix, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name("const")
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        out = out or self.name(op_type.lower())
        self.graph.node.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type), **attrs))
        return out


def set_outputs(graph, outputs: list[tuple[str, list]]) -> None:
    from onnx import TensorProto, helper

    del graph.output[:]
    for name, dims in outputs:
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))


def append_head(graph, nodes: Nodes, features: str, weights: np.ndarray, bias: np.ndarray,
                 temperature: float) -> None:
    """features [B, D] -> probabilities [B, L] = softmax((x W + b) / T)."""
    logits = nodes.op("Add", nodes.op("MatMul", features, nodes.const(weights)), nodes.const(bias))
    scaled = nodes.op("Div", logits, nodes.const(np.float32(temperature)))
    nodes.op("Softmax", scaled, out="probabilities", axis=-1)
    set_outputs(graph, [("probabilities", ["batch_size", int(weights.shape[1])])])
