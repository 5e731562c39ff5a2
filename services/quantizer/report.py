"""Quality of model variants on held-out text, and the markdown/PNG report.

Every variant is a real ONNX Runtime session of the written graph (MatMulNBits at
accuracy_level=4), evaluated on the same held-out windows as the fp32 model:
perplexity of the next token, mean KL(fp32 || variant) and top-1 agreement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from services.quantizer import quant
from services.quantizer.model import decoder_feeds, log_softmax, session_options


@dataclass
class Variant:
    name: str
    size_bytes: int
    perplexity: float
    kl_vs_fp32: float
    top1_agreement: float
    weight_bytes: int = 0
    bits: dict | None = None  # layer -> bits, for mixed variants

    def row(self) -> dict:
        out = asdict(self)
        out.pop("bits")
        return out


class Evaluator:
    def __init__(self, fp32_model: bytes | str, windows: np.ndarray, threads: int = 0):
        self.windows, self.threads = windows, threads
        logits = self._logits(fp32_model)
        self.ref_logp = log_softmax(logits)
        self.ref_p = np.exp(self.ref_logp)
        self.ref_top1 = logits.argmax(-1)

    def _logits(self, model: bytes | str) -> np.ndarray:
        import onnxruntime as ort

        session = ort.InferenceSession(model, session_options(self.threads), providers=["CPUExecutionProvider"])
        outs = []
        for row in range(self.windows.shape[0]):  # one window at a time keeps memory flat
            feeds = decoder_feeds(session, self.windows[row: row + 1])
            outs.append(session.run(["logits"], feeds)[0])
        return np.concatenate(outs, axis=0)

    def evaluate(self, name: str, model: bytes | str, size_bytes: int, weight_bytes: int = 0,
                 bits: dict | None = None) -> Variant:
        logits = self._logits(model)
        logq = log_softmax(logits)
        targets = self.windows[:, 1:]
        nll = -np.take_along_axis(logq[:, :-1], targets[..., None], axis=-1)[..., 0]
        kl = float(np.mean(np.sum(self.ref_p * (self.ref_logp - logq), axis=-1)))
        top1 = float(np.mean(logits.argmax(-1) == self.ref_top1))
        return Variant(name, int(size_bytes), float(math.exp(float(nll.mean()))), max(kl, 0.0), top1,
                       int(weight_bytes), bits)


def plot(path: Path, sweep: Sequence[Variant], uniform: Sequence[Variant], fp32: Variant, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = sorted(sweep, key=lambda v: v.size_bytes)
    ax.plot([v.size_bytes / 1e6 for v in points], [v.perplexity for v in points], "o-", label="mixed (knapsack)")
    for v in uniform:
        ax.plot(v.size_bytes / 1e6, v.perplexity, "s", markersize=8, label=v.name)
    ax.axhline(fp32.perplexity, color="grey", linestyle="--", label=f"fp32 ({fp32.size_bytes / 1e6:.0f} MB)")
    ax.axhline(fp32.perplexity * 1.02, color="grey", linestyle=":", label="fp32 + 2%")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(*, model: str, output: str, calibration: str, heldout: str, block_size: int, variants: Sequence[Variant],
             fp32: Variant, layers: Sequence[dict], notes: Sequence[str], timings: dict,
             allocation_log: dict | None = None, chosen: str | None = None) -> str:
    lines = [f"# Mixed-precision quantization of `{model}`", "",
             f"- result: `{output}`" + (f", the `{chosen}` row below" if chosen else ""), f"- calibration: {calibration}", f"- held-out evaluation: {heldout}",
             f"- MatMulNBits (and GatherBlockQuantized for the embedding), block {block_size}, accuracy_level 4; "
             "codes 8/4/2: asymmetric RTN with integer zero points (ONNX Runtime's packing); 4f/2f: 4/2 bits with a "
             "float per-block minimum and a searched scale (services/quantizer/quant.py), MatMuls only; 4s/2s: ORT's "
             "integer-zero-point packing with each block's scale and zero point searched (activation-weighted) "
             "instead of min/max rounding, same bytes and nodes as 4/2",
             "- sizes: the file on disk; fp32 is the source file (embedding and lm_head tied, one table)", ""]
    lines += ["## Variants", "",
              "| variant | size (MB) | size vs fp32 | perplexity | ppl change | KL vs fp32 | top-1 agreement |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for v in variants:
        lines.append(
            f"| {v.name} | {v.size_bytes / 1e6:.1f} | {100 * v.size_bytes / fp32.size_bytes:.1f}% | "
            f"{v.perplexity:.3f} | {100 * (v.perplexity / fp32.perplexity - 1):+.2f}% | {v.kl_vs_fp32:.4f} | "
            f"{100 * v.top1_agreement:.1f}% |")
    if timings:
        lines += ["", "## Timings", ""] + [f"- {k}: {v}" for k, v in timings.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if allocation_log:
        lines += ["", "## Allocation: measured interaction", "",
                  "Each round solves the exact knapsack, then measures on the calibration windows the joint KL of "
                  "the whole allocation and of each bit-width's layers together; the next round scales that "
                  "bit-width's single-layer KLs by joint/sum. The round with the least joint KL is kept.", "",
                  "| variant | round | factors applied | sum of single KLs | joint KL | measured factors |",
                  "|---|---:|---|---:|---:|---|"]
        for name, rounds in allocation_log.items():
            for r in rounds:
                fmt = lambda d: ", ".join(f"{quant.code_name(b)}b x{f:.2f}" for b, f in sorted(d.items())) or "-"
                lines.append(f"| {name} | {r['round']} | {fmt(r['applied'])} | {r['predicted']:.4f} | "
                             f"{r['joint']:.4f} | {fmt(r['factors'])} |")
    bit_names = [b for b in quant.CODES if any(b in row["kl"] for row in layers)]
    lines += ["", "## Layers", "",
              "| layer | weight | shape | " + " | ".join(f"KL@{quant.code_name(b)}" for b in bit_names) + " | bits |",
              "|---|---|---|" + "---:|" * len(bit_names) + "---:|"]
    for row in layers:
        kls = " | ".join(
            (f"{row['kl'][b]:.2e}" + ("*" if b in row.get("estimated", ()) else "")) if b in row["kl"] else "-"
            for b in bit_names)
        bits = quant.code_name(row["bits"])
        if row.get("kind") == "gather":
            row = dict(row, label=row["label"] + " (Gather)")
        lines.append(f"| {row['label']} | `{row['name']}` | {row['shape'][0]}x{row['shape'][1]} | {kls} | {bits} |")
    if any(row.get("estimated") for row in layers):
        lines += ["", "\\* estimated from the probe of the measured bit-width nearest in bits (KL scales with the "
                  "squared weight error; see services/quantizer/sensitivity.py)."]
    return "\n".join(lines) + "\n"
