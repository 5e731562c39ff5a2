"""Mixed precision on a genuinely fp32-trained model: minilm-l6 (all-MiniLM-L6-v2), the encoder
behind the router's and the topics route's heads, at 8/6/4-bit average budgets.

    .venv/bin/python bench/quantizer_encoder.py [--model minilm-l6] [--folds 5]

SmolLM2's fp32 weights come from a Q4_1 GGUF, which flatters float-minimum codes (4f stores its
blocks exactly); MiniLM's do not, so this is the honest view of what the quantizer's codes and
allocation do. Bench only: services.quantizer writes decoders; here the same pieces are used on
the encoder's 36 MatMuls (the word-embedding Gather, 11.7 M of its 22.7 M weights, stays fp32):

- codes: quant.pack (8/4/2, ONNX Runtime's RTN, integer zero point), quant.pack_searched (4s/2s,
  ORT's integer-zero-point packing with a searched scale and zero point) and quant.pack_float_min
  (4f/2f, searched scale and float minimum), both searches weighted by each input's mean square;
- sensitivity: one probe per layer at 4 bits, the mean cosine distance between the fp32 and the
  probed sentence embeddings of calibration sentences (the quantizer's packaged calibration.txt);
  the other codes estimated by activation-weighted weight error, as sensitivity.analyze does;
- allocation: allocation.solve, the exact knapsack, on real bytes (scales, zero points, offsets);
  budgets: every MatMul at 8 / 6 / 4 bits, 6 = halfway between the 4- and 8-bit sizes;
- effect: routing-dev (150 requests, 5 routes) and topics-dev (BBC texts, 5 topics; a stratified
  sample of 300 of the 1,527 by default, texts cut at 128 tokens, to fit a few minutes on 2 cores)
  accuracy of a logistic-regression head on the sentence embeddings, 5-fold stratified
  cross-validation (seed 0), fp32 vs each variant (a proxy for the shipped heads, same protocol
  for every row). Weights are fake-quantized into the fp32 graph: MatMulNBits' int8 activations
  (accuracy_level 4) are not included.

Writes bench/results/quantizer_encoder.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.model_repository import ModelRepository  # noqa: E402
from services.quantizer import allocation, quant  # noqa: E402
from services.quantizer.allocation import Option  # noqa: E402

RESULTS = ROOT / "bench" / "results"
EVAL = ROOT.parent / "shared" / "eval"
BLOCK = 32
CODES = (quant.FP32, 8, 4, 2, quant.Q4F, quant.Q2F, quant.Q4S, quant.Q2S)


class Encoder:
    """The ONNX encoder with its MatMul weights as graph inputs (one session for every variant)."""

    def __init__(self, manifest, threads: int = 1, max_length: int = 256):
        import onnx
        import onnxruntime as ort
        from onnx import helper, numpy_helper
        from tokenizers import Tokenizer

        model = onnx.load(str(manifest.path_of("model")))
        inits = {t.name: t for t in model.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        self.inputs: dict[str, str] = {}  # weight -> the MatMul's activation input
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                w = numpy_helper.to_array(inits[node.input[1]])
                if w.ndim == 2 and w.shape[0] % BLOCK == 0:
                    self.weights[node.input[1]] = w.astype(np.float32)
                    self.inputs[node.input[1]] = node.input[0]
        keep = [t for t in model.graph.initializer if t.name not in self.weights]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for name, w in self.weights.items():
            model.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(w.shape)))
        xs = sorted(set(self.inputs.values()))
        for x in xs:
            model.graph.output.append(helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None))
        self.xs = xs
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(manifest.path_of("tokenizer")))
        self.tokenizer.enable_truncation(max_length=min(max_length, manifest.generation.get("max_length", 256)))
        self.feed_names = [i.name for i in self.session.get_inputs() if i.name not in self.weights]

    def _batches(self, texts: list[str], batch: int = 32):
        order = np.argsort([len(t) for t in texts])  # similar lengths together: little padding
        for start in range(0, len(texts), batch):
            idx = order[start:start + batch]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            width = max(len(e.ids) for e in enc)
            ids = np.zeros((len(idx), width), np.int64)
            mask = np.zeros((len(idx), width), np.int64)
            for row, e in enumerate(enc):
                ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, 1
            yield idx, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}

    def embed(self, texts: list[str], weights: dict[str, np.ndarray], stats: bool = False):
        out = np.zeros((len(texts), 384), np.float32)
        squares = {x: np.zeros(0) for x in self.xs}
        counts = 0
        for idx, feeds in self._batches(texts):
            feeds = {k: v for k, v in feeds.items() if k in self.feed_names}
            names = ["last_hidden_state"] + (self.xs if stats else [])
            hidden, *acts = self.session.run(names, {**feeds, **weights})
            mask = feeds["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            out[idx] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            if stats:
                m = feeds["attention_mask"].reshape(-1).astype(bool)
                for x, a in zip(self.xs, acts):
                    sq = np.square(a.reshape(-1, a.shape[-1])[m], dtype=np.float64).sum(0)
                    squares[x] = sq if squares[x].size == 0 else squares[x] + sq
                counts += int(m.sum())
        if stats:
            return out, {x: (v / counts).astype(np.float32) for x, v in squares.items()}
        return out


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(1.0 - np.sum(a * b, axis=1)))


def logistic_cv(x: np.ndarray, labels: list[str], folds: int = 5, seed: int = 0, steps: int = 300) -> float:
    """Stratified k-fold accuracy of a multinomial logistic regression (numpy, full-batch gradient
    descent with L2), fitted per fold on the other folds."""
    classes = sorted(set(labels))
    y = np.array([classes.index(label) for label in labels])
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), int)
    for c in range(len(classes)):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        fold[idx] = np.arange(len(idx)) % folds
    correct = 0
    for f in range(folds):
        train, test = fold != f, fold == f
        xt, yt = x[train], np.eye(len(classes))[y[train]]
        w, b = np.zeros((x.shape[1], len(classes))), np.zeros(len(classes))
        for _ in range(steps):
            logits = xt @ w + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            g = (p - yt) / len(xt)
            w -= 4.0 * (xt.T @ g + 1e-3 * w)
            b -= 4.0 * g.sum(0)
        correct += int(np.sum((x[test] @ w + b).argmax(1) == y[test]))
    return correct / len(y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--calibration-sentences", type=int, default=32)
    parser.add_argument("--topics", type=int, default=300, help="topics-dev texts, a stratified sample (0: all 1,527)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (the model's own limit is 256)")
    args = parser.parse_args()
    started = time.perf_counter()
    manifest = ModelRepository().get(args.model)
    enc = Encoder(manifest, max_length=args.max_length)
    text = (ROOT / "services" / "quantizer" / "data" / "calibration.txt").read_text()
    paragraphs = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    step = max(1, len(paragraphs) // args.calibration_sentences)
    calib = paragraphs[::step][:args.calibration_sentences]
    fp32 = dict(enc.weights)
    ref, squares = enc.embed(calib, fp32, stats=True)

    # Sensitivity: one probe per layer at 4 bits; the rest estimated by weighted error.
    sens: dict[str, dict[int, float]] = {}
    packs: dict[tuple[str, int], quant.Packed] = {}
    for name, w in enc.weights.items():
        a = squares[enc.inputs[name]]
        for code in CODES[1:]:
            packs[name, code] = (quant.pack_float_min(w, quant.nbits(code), BLOCK, a) if quant.is_float_min(code)
                                 else quant.pack_searched(w, quant.nbits(code), BLOCK, a) if quant.is_searched(code)
                                 else quant.pack(w, code, BLOCK))
        err = {c: float(np.sum((quant.dequantize(packs[name, c]) - w) ** 2, axis=1) @ a) for c in CODES[1:]}
        probe = cosine_distance(ref, enc.embed(calib, {**fp32, name: quant.dequantize(packs[name, 4])}))
        sens[name] = {c: probe * err[c] / err[4] for c in CODES[1:]}
        sens[name][4] = probe
    t_analysis = time.perf_counter() - started

    def size(bits: dict[str, int]) -> int:
        return sum(quant.quantized_bytes(*enc.weights[n].shape, b, BLOCK) for n, b in bits.items())

    def uniform(code: int) -> dict[str, int]:
        return {n: code for n in enc.weights}

    def allocate(budget: float) -> dict[str, int]:
        items = [[Option(c, float(quant.quantized_bytes(*enc.weights[n].shape, c, BLOCK)),
                         0.0 if c == quant.FP32 else sens[n][c]) for c in CODES] for n in enc.weights]
        solved = allocation.solve(items, budget, unit=256.0)
        return dict(zip(enc.weights, solved.labels))

    s8, s4 = size(uniform(8)), size(uniform(4))
    variants = {"fp32": uniform(quant.FP32), "uniform-8": uniform(8), "uniform-4": uniform(4),
                "uniform-4s": uniform(quant.Q4S), "uniform-4f": uniform(quant.Q4F),
                "mixed@8bits": allocate(s8), "mixed@6bits": allocate((s8 + s4) / 2), "mixed@4bits": allocate(s4)}
    data = {name: [json.loads(line) for line in (EVAL / f"{name}-dev.jsonl").read_text().splitlines() if line.strip()]
            for name in ("routing", "topics")}
    label_key = {"routing": "route", "topics": "label"}
    if args.topics and args.topics < len(data["topics"]):  # stratified: every label in proportion, seed 0
        rng = np.random.default_rng(0)
        by_label: dict[str, list] = {}
        for r in data["topics"]:
            by_label.setdefault(r["label"], []).append(r)
        share = args.topics / len(data["topics"])
        data["topics"] = [r for rows_ in by_label.values()
                          for r in rng.permutation(np.array(rows_, dtype=object))[:round(share * len(rows_))]]
    rows = []
    fp32_size = size(uniform(quant.FP32))
    for name, bits in variants.items():
        weights = {n: (w if bits[n] == quant.FP32 else quant.dequantize(packs[n, bits[n]])) for n, w in fp32.items()}
        row = {"variant": name, "matmul_bytes": size(bits), "size_vs_fp32_matmuls": round(size(bits) / fp32_size, 4),
               "calibration_cosine_distance": cosine_distance(ref, enc.embed(calib, weights)),
               "codes": {quant.code_name(c): sum(1 for b in bits.values() if b == c) for c in CODES
                         if any(b == c for b in bits.values())}}
        for task, rows_ in data.items():
            x = enc.embed([r["text"] for r in rows_], weights)
            row[f"{task}_accuracy"] = logistic_cv(x, [r[label_key[task]] for r in rows_], args.folds)
        rows.append(row)
        print(row, flush=True)
    total = time.perf_counter() - started
    out = {"model": manifest.reference, "block_size": BLOCK, "analysis_s": round(t_analysis, 1),
           "total_s": round(total, 1), "rows": rows,
           "layers": {n: {quant.code_name(c): v for c, v in s.items()} for n, s in sens.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantizer_encoder.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"# Mixed precision on `{manifest.reference}` (a true fp32 model)", "",
             ("Bench only (bench/quantizer_encoder.py). 36 MatMuls (the word embedding stays fp32), block 32; "
             "sizes are the MatMul weights' bytes (scales, zero points, offsets included). Accuracy: logistic "
             f"regression on the sentence embeddings, {args.folds}-fold stratified CV (seed 0), routing-dev "
             f"({len(data['routing'])} requests) and topics-dev ({len(data['topics'])} texts, a stratified "
             f"sample; texts cut at {args.max_length} tokens). Weights fake-quantized into the fp32 graph (no int8 "
              "activations). Budgets: every MatMul's bytes at 8 bits, at 4 bits, and halfway (6)."), "",
             "| variant | MatMul size vs fp32 | codes | cosine distance (calibration) | routing acc | topics acc |",
             "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in r["codes"].items())
        lines.append(f"| {r['variant']} | {100 * r['size_vs_fp32_matmuls']:.1f}% | {codes} | "
                     f"{r['calibration_cosine_distance']:.5f} | {100 * r['routing_accuracy']:.1f}% | "
                     f"{100 * r['topics_accuracy']:.1f}% |")
    lines += ["", f"- one routing request is {100 / len(data['routing']):.2f} points, one topics text "
              f"{100 / len(data['topics']):.2f}: most accuracy differences here are a few texts",
              "- no never-worse-than-uniform guard here (the quantizer's pipeline has one; this bench calls the "
              "knapsack directly on estimated sensitivities): compare each mix with the uniform row of its size",
              f"- analysis {out['analysis_s']} s, total {out['total_s']} s (2 shared cores)"]
    (RESULTS / "quantizer_encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
