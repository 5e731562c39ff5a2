"""Per-layer sensitivity: how far the next-token distribution moves (mean KL against
fp32, over every position of the calibration windows) when only one layer is
quantized to 8, 4 or 2 bits. Layers are the MatMuls and the token embedding's
Gather (its table fed as a graph input too, fake-quantized as GatherBlockQuantized
stores it).

Fast path: ONE ONNX Runtime session of the decoder in which every layer's weight
is a graph input. Each probe is one forward pass that feeds the original weights
except the probed one, which is fake-quantized exactly as MatMulNBits stores it
(`quant.pack` / `quant.dequantize`). No session is built per probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx

from services.quantizer import quant
from services.quantizer.model import PROBE_PREFIX, DecoderGraph, Layer, decoder_feeds, log_softmax, session_options

DEFAULT_CALIBRATION = "calibration.txt"  # packaged: Mirador's own prose + Python stdlib docstrings (data/README.md)
DEFAULT_HELDOUT = "heldout.txt"
DEFAULT_WINDOWS = 4      # calibration windows, spread over the whole text ...
DEFAULT_WINDOW_TOKENS = 64  # ... of this many tokens: 256 tokens per probe, one probe per layer (10 min for SmolLM2)

Progress = Callable[[str, int, int, str], None]  # phase, step, total, layer


class Cancelled(Exception):
    """The caller asked to stop."""


@dataclass
class TextSource:
    name: str
    text: str

    @classmethod
    def packaged(cls, filename: str) -> "TextSource":
        text = resources.files("services.quantizer").joinpath("data", filename).read_text(encoding="utf-8")
        return cls(f"packaged:{filename}", text)

    @classmethod
    def from_file(cls, path: str | Path) -> "TextSource":
        path = Path(path)
        return cls(str(path), path.read_text(encoding="utf-8", errors="replace"))


def token_windows(tokenizer, text: str, windows: int, length: int) -> np.ndarray:
    """Up to `windows` non-overlapping windows of `length` tokens spread evenly over the whole text
    (its beginning, its end and between): [n, length] int64.

    Raises ValueError when the text holds fewer than `length` tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    n = min(windows, len(ids) // length)
    if n == 0:
        raise ValueError(f"the text holds {len(ids)} tokens; at least {length} are needed")
    starts = [round(i * (len(ids) - length) / (n - 1)) if n > 1 else 0 for i in range(n)]
    return np.asarray([ids[s: s + length] for s in starts], dtype=np.int64)


@dataclass
class LayerSensitivity:
    layer: Layer
    kl: dict[int, float] = field(default_factory=dict)  # bits -> mean KL
    estimated: set[int] = field(default_factory=set)     # bits whose KL was estimated, not probed


class PackCache:
    """Packed (MatMulNBits) form of each (layer, bits), made once and shared by the probe and the writer."""

    def __init__(self, decoder: DecoderGraph, block_size: int):
        self.decoder, self.block_size = decoder, block_size
        self._packs: dict[tuple[str, int], quant.Packed] = {}
        # layer -> mean square of each of its K inputs on the calibration windows (Prober.importance):
        # the float-minimum search minimises the error weighted by it. Empty: unweighted.
        self.importance: dict[str, np.ndarray] = {}

    def get(self, layer: Layer, bits: int) -> quant.Packed:
        key = (self.decoder.pack_key(layer), bits)  # an embedding and its untied head share one packing
        if key not in self._packs:
            weight = self.decoder.weight(layer)
            # An embedding shares its packing with its head: the head's inputs weight the search.
            head = self.decoder.paired_head(layer) if layer.kind == "gather" else None
            importance = self.importance.get((head or layer).name)
            if quant.is_float_min(bits):
                self._packs[key] = quant.pack_float_min(weight, quant.nbits(bits), self.block_size, importance)
            elif quant.is_searched(bits):
                self._packs[key] = quant.pack_searched(weight, quant.nbits(bits), self.block_size, importance)
            else:
                self._packs[key] = quant.pack(weight, bits, self.block_size)
        return self._packs[key]

    def fake(self, layer: Layer, bits: int) -> np.ndarray:
        return quant.dequantize(self.get(layer, bits))


class Prober:
    """One session; weights as inputs; fp32 reference distribution computed once."""

    def __init__(self, decoder: DecoderGraph, windows: np.ndarray, threads: int = 0):
        import onnxruntime as ort

        self.decoder, self.windows = decoder, windows
        model = decoder.probe_model()
        # Each MatMul's input as an extra output, read once with the fp32 weights (importance).
        node_inputs = {n.name: n.input[0] for n in model.graph.node if n.input}
        inputs = {layer.name: node_inputs[layer.node] for layer in decoder.layers
                  if layer.kind == "matmul" and layer.node in node_inputs}
        outputs = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
        for name in sorted(set(inputs.values()) - outputs):
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.feeds = decoder_feeds(self.session, windows)
        for layer in decoder.layers:
            self.feeds[PROBE_PREFIX + layer.name] = (decoder.table(layer) if layer.kind == "gather"
                                                     else decoder.weight(layer))
        names = sorted(set(inputs.values()) - {i.name for i in model.graph.input})
        logits, *xs = self.session.run(["logits"] + names, self.feeds)
        squares = {name: np.mean(np.square(x, dtype=np.float64).reshape(-1, x.shape[-1]), axis=0)
                   for name, x in zip(names, xs)}
        self.importance = {layer: squares[x].astype(np.float32) for layer, x in inputs.items()
                           if squares[x].shape[0] == decoder.layer(layer).shape[0]}
        self.ref_logp = log_softmax(logits)
        self.ref_p = np.exp(self.ref_logp)
        self.ref_top1 = logits.argmax(-1)

    def logits(self, replacements: dict[str, np.ndarray]) -> np.ndarray:
        """Logits with some layers' [K, N] weights (as packed) replaced."""
        feeds = dict(self.feeds)
        for name, weight in replacements.items():
            feeds[PROBE_PREFIX + name] = self.decoder.graph_array(self.decoder.layer(name), weight)
        return self.session.run(["logits"], feeds)[0]

    def kl(self, replacements: dict[str, np.ndarray]) -> float:
        logq = log_softmax(self.logits(replacements))
        return float(np.mean(np.sum(self.ref_p * (self.ref_logp - logq), axis=-1)))


def analyze(
    decoder: DecoderGraph,
    windows: np.ndarray,
    packs: PackCache,
    bits: Iterable[int] = quant.BITS,
    *,
    estimate: Iterable[int] = (),
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    threads: int = 0,
    prober: "Prober | None" = None,
) -> list[LayerSensitivity]:
    """Measure every layer at every bit-width in `bits` (one forward pass per probe).

    Bit-widths in `estimate` (and not in `bits`) are not probed: their KL is the
    nearest measured bit-width's KL scaled by the ratio of squared weight errors,
    KL_b ~= KL_m * e_b / e_m with e = sum_k E[x_k^2] sum_n (W - Q(W))_kn^2 (the squared weight
    error weighted by the mean square of each input, Prober.importance; unweighted for the
    embedding), the second-order behaviour of KL for small perturbations. Used by default for 8 bits, whose weight error is
    ~1/17^2 of 4-bit's, to save a third of the probes, and for the float-minimum codes (quant.Q4F,
    Q2F), estimated from the measured bit-width nearest in bits (the same layer, a smaller or larger
    weight error of the same kind). The estimates are corrected by measured joint KLs in the
    allocation (pipeline.Quantizer.allocate_calibrated)."""
    bits = tuple(sorted(set(bits), reverse=True))
    estimate = tuple(b for b in sorted(set(estimate), reverse=True) if b not in bits)
    if estimate and not bits:
        raise ValueError("estimating needs at least one measured bit-width")
    prober = prober or Prober(decoder, windows, threads)
    results = []
    total = len(decoder.layers)
    for i, layer in enumerate(decoder.layers):
        if should_stop and should_stop():
            raise Cancelled("stopped during the sensitivity analysis")
        if progress:
            progress("sensitivity", i, total, layer.name)
        entry = LayerSensitivity(layer)
        if layer.kind == "gather" and layer.shape[0] % packs.block_size:
            results.append(entry)  # GatherBlockQuantized needs whole blocks along the table's width: fp32 only
            continue
        for b in bits:
            entry.kl[b] = max(0.0, prober.kl({layer.name: packs.fake(layer, b)}))
        weight = decoder.weight(layer)
        errors: dict[int, float] = {}

        importance = prober.importance.get(layer.name)  # [K]: the error that reaches the output

        def error(code: int) -> float:
            if code not in errors:
                squared = np.sum((packs.fake(layer, code) - weight) ** 2, axis=1, dtype=np.float64)
                errors[code] = float(squared @ importance if importance is not None else squared.sum())
            return errors[code]

        for b in estimate:
            if layer.kind == "gather" and quant.is_float_min(b):
                continue  # GatherBlockQuantized has integer zero points only
            m = min(bits, key=lambda x: (abs(quant.nbits(x) - quant.nbits(b)), x))
            entry.kl[b] = entry.kl[m] * (error(b) / error(m)) if error(m) > 0 else 0.0
            entry.estimated.add(b)
        results.append(entry)
    if progress:
        progress("sensitivity", total, total, "")
    return results


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start
