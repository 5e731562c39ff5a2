"""The quantizer end to end: analyse, allocate, evaluate, write, register.

Used by the gRPC servicer and by bench/quantizer.py. Nothing is registered until
the very end (`ModelRepository.staging`), so an error or a cancellation leaves
the repository as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from services.common.model_repository import ModelManifest, ModelRepository
from services.quantizer import allocation, quant
from services.quantizer.allocation import BudgetError, Option
from services.quantizer.model import DecoderGraph, NotADecoderError
from services.quantizer.report import Evaluator, Variant, markdown, plot
from services.quantizer.sensitivity import (
    DEFAULT_CALIBRATION, DEFAULT_HELDOUT, DEFAULT_WINDOW_TOKENS, DEFAULT_WINDOWS, Cancelled, LayerSensitivity,
    PackCache, TextSource, analyze, token_windows,
)
from services.quantizer.writer import (
    ACCURACY_LEVEL, NODE_OVERHEAD_BYTES, build_model, graph_overhead_bytes, next_version,
    predicted_weight_bytes, stage_files,
)

__all__ = ["QuantizeOptions", "Quantizer", "BudgetError", "NotADecoderError", "Cancelled"]

Progress = Callable[[str, int, int, str], None]


@dataclass
class QuantizeOptions:
    budget_bits: float | None = None       # mean nominal bits per (untied) MatMul weight
    budget_mb: float | None = None         # total model size on disk, MB (10^6 bytes)
    block_size: int = 32
    calibration: TextSource | None = None  # None = packaged calibration.txt
    heldout: TextSource | None = None      # None = packaged heldout.txt
    windows: int = DEFAULT_WINDOWS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    eval_windows: int = 8
    eval_tokens: int = 128
    measure_bits: tuple[int, ...] = (4, 2)
    estimate_bits: tuple[int, ...] = (8,)
    output_name: str | None = None
    search_steps: int = 5       # budgets tried when searching the smallest size within 2% of fp32
    sweep_points: int = 3       # extra budgets for the size/perplexity plot
    threads: int = 0
    ppl_tolerance: float = 0.02


@dataclass
class QuantizeResult:
    manifest: ModelManifest
    layers: list[dict]
    variants: list[Variant]
    calibration: str
    report_path: Path
    plot_path: Path
    timings: dict = field(default_factory=dict)


class Quantizer:
    """One source model, loaded once; analysis, allocation and variants on demand."""

    def __init__(self, manifest: ModelManifest, block_size: int = 32, threads: int = 0):
        from tokenizers import Tokenizer

        self.manifest = manifest
        self.decoder = DecoderGraph.load(manifest.path_of("model"))
        if "tokenizer" not in manifest.files:
            raise NotADecoderError(f"{manifest.reference} has no tokenizer; the quantizer needs one for calibration")
        self.tokenizer = Tokenizer.from_file(str(manifest.path_of("tokenizer")))
        self.packs = PackCache(self.decoder, block_size)
        self.block_size, self.threads = block_size, threads
        self.graph_bytes = graph_overhead_bytes(self.decoder)
        self.sensitivities: list[LayerSensitivity] = []

    # ---- analysis

    def windows(self, source: TextSource, windows: int, tokens: int) -> np.ndarray:
        try:
            return token_windows(self.tokenizer, source.text, windows, tokens)
        except ValueError as exc:
            raise ValueError(f"{source.name}: {exc}") from None

    def analyze(self, calibration: np.ndarray, measure=(4, 2), estimate=(8,), progress: Progress | None = None,
                should_stop=None) -> list[LayerSensitivity]:
        self.sensitivities = analyze(self.decoder, calibration, self.packs, measure, estimate=estimate,
                                     progress=progress, should_stop=should_stop, threads=self.threads)
        return self.sensitivities

    # ---- sizes and allocation

    def size_on_disk(self, weight_bytes: int, quantized_layers: int) -> int:
        """Upper bound of the file size of a written variant (exact graph + weights + node allowance)."""
        return self.graph_bytes + weight_bytes + NODE_OVERHEAD_BYTES * quantized_layers

    def uniform_bits(self, bits: int) -> dict[str, int]:
        """Every untied layer at `bits` (what ORT's MatMulNBits quantizer does); a tied lm_head stays fp32."""
        return {layer.name: (quant.FP32 if layer.tied_to else bits) for layer in self.decoder.layers}

    def weight_bytes(self, bits: dict[str, int]) -> int:
        return predicted_weight_bytes(self.decoder, bits, self.block_size)

    def allocate_bytes(self, weight_budget: float, bit_choices=(quant.FP32, 8, 4, 2)) -> dict[str, int]:
        """Least total sensitivity with initializer bytes <= weight_budget (exact)."""
        layers = self.decoder.layers
        fixed = self.decoder.initializer_bytes(exclude=self.decoder.untied_weight_names())
        items = []
        for s in self._sensitivity_by_layer():
            K, N = s.layer.shape
            options = []
            for b in bit_choices:
                if b == quant.FP32:
                    cost = 0 if s.layer.tied_to else 4 * K * N
                    options.append(Option(b, float(cost), 0.0))
                elif b in s.kl:
                    options.append(Option(b, float(quant.quantized_bytes(K, N, b, self.block_size)), s.kl[b]))
            items.append(options)
        try:
            solved = allocation.solve(items, weight_budget - fixed, unit=1024.0)
        except BudgetError:
            smallest = fixed + sum(min(o.cost for o in opts) for opts in items)
            raise BudgetError(
                f"the budget leaves {weight_budget / 1e6:.2f} MB for weights; the smallest possible "
                f"(every layer at its fewest bits) needs {smallest / 1e6:.2f} MB") from None
        bits = {layer.name: b for layer, b in zip(layers, solved.labels)}
        assert self.weight_bytes(bits) <= weight_budget
        return bits

    def allocate_mean_bits(self, mean_bits: float) -> dict[str, int]:
        """Least total sensitivity with mean nominal bits (32 for fp32) over untied layers <= mean_bits.
        A tied lm_head stays fp32 (quantizing it would add a copy beside the embedding table)."""
        sens = [s for s in self._sensitivity_by_layer() if not s.layer.tied_to]
        total = sum(s.layer.numel for s in sens)
        items = [[Option(quant.FP32, 32.0 * s.layer.numel, 0.0)]
                 + [Option(b, float(b * s.layer.numel), s.kl[b]) for b in (8, 4, 2) if b in s.kl] for s in sens]
        unit = max(1.0, float(2 ** int(np.log2(max(1.0, total * 30 / 200_000)))))
        solved = allocation.solve(items, mean_bits * total, unit=unit)
        bits = {layer.name: quant.FP32 for layer in self.decoder.layers}
        bits.update({s.layer.name: b for s, b in zip(sens, solved.labels)})
        return bits

    def budget_to_weight_bytes(self, budget_mb: float) -> float:
        return budget_mb * 1e6 - self.graph_bytes - NODE_OVERHEAD_BYTES * len(self.decoder.layers)

    def _sensitivity_by_layer(self) -> list[LayerSensitivity]:
        if len(self.sensitivities) != len(self.decoder.layers):
            raise RuntimeError("run analyze() first")
        return self.sensitivities

    # ---- variants

    def model_bytes(self, bits: dict[str, int]) -> bytes:
        return build_model(self.decoder, self.packs, bits, ACCURACY_LEVEL).SerializeToString()

    def evaluate(self, evaluator: Evaluator, name: str, bits: dict[str, int]) -> Variant:
        blob = self.model_bytes(bits)
        return evaluator.evaluate(name, blob, len(blob), self.weight_bytes(bits), bits)

    # ---- the whole run

    def run(self, repository: ModelRepository, options: QuantizeOptions, progress: Progress | None = None,
            should_stop: Callable[[], bool] | None = None) -> QuantizeResult:
        started = time.perf_counter()
        stop = should_stop or (lambda: False)

        def check():
            if stop():
                raise Cancelled("the quantize call was cancelled")

        calibration_src = options.calibration or TextSource.packaged(DEFAULT_CALIBRATION)
        heldout_src = options.heldout or TextSource.packaged(DEFAULT_HELDOUT)
        calib = self.windows(calibration_src, options.windows, options.window_tokens)
        held = self.windows(heldout_src, options.eval_windows, options.eval_tokens)
        calibration_desc = (f"{calibration_src.name}: {calib.shape[0]} windows x {calib.shape[1]} tokens "
                            f"= {calib.size} tokens")
        heldout_desc = f"{heldout_src.name}: {held.shape[0]} windows x {held.shape[1]} tokens = {held.size} tokens"
        # Fail on an impossible budget before the long analysis.
        self._check_budget_feasible(options)

        t0 = time.perf_counter()
        self.analyze(calib, options.measure_bits, options.estimate_bits, progress, stop)
        t_analysis = time.perf_counter() - t0

        if progress:
            progress("allocation", 0, 1, "")
        t0 = time.perf_counter()
        if options.budget_mb is not None:
            requested = self.allocate_bytes(self.budget_to_weight_bytes(options.budget_mb))
            requested_name = f"mixed@{options.budget_mb:g}MB"
        else:
            requested = self.allocate_mean_bits(float(options.budget_bits))
            requested_name = f"mixed@{options.budget_bits:g}bits"
        u4, u8 = self.uniform_bits(4), self.uniform_bits(8)
        at_u4 = self.allocate_bytes(self.weight_bytes(u4))
        t_allocation = time.perf_counter() - t0
        if progress:
            progress("allocation", 1, 1, "")
        check()

        # Evaluation: fp32, uniform 8/4, mixed at uniform-4's size, the requested budget,
        # then the smallest budget within tolerance of fp32 (bisection), and a sweep.
        t0 = time.perf_counter()
        planned = 5 + options.search_steps + options.sweep_points
        done = [0]

        def step(label: str):
            check()
            if progress:
                progress("evaluation", done[0], planned, label)
            done[0] += 1

        step("fp32")
        fp32_path = str(self.manifest.path_of("model"))
        evaluator = Evaluator(fp32_path, held, self.threads)
        fp32_size = self.manifest.path_of("model").stat().st_size
        fp32 = evaluator.evaluate("fp32", fp32_path, fp32_size, self.decoder.initializer_bytes())
        step("uniform-8")
        v_u8 = self.evaluate(evaluator, "uniform-8", u8)
        step("uniform-4")
        v_u4 = self.evaluate(evaluator, "uniform-4", u4)
        step("mixed@uniform-4-size")
        v_at_u4 = self.evaluate(evaluator, "mixed@uniform-4-size", at_u4)
        step(requested_name)
        v_req = self.evaluate(evaluator, requested_name, requested)

        limit = fp32.perplexity * (1 + options.ppl_tolerance)
        lo = float(self.weight_bytes({layer.name: (quant.FP32 if layer.tied_to else min(
            self.packs_bits_available(layer))) for layer in self.decoder.layers}))
        hi = float(self.weight_bytes(u8)) if v_u8.perplexity <= limit else float(fp32.weight_bytes)
        sweep: list[Variant] = [v for v in (v_at_u4, v_req)]
        best: Variant | None = None
        for i in range(options.search_steps):
            mid = (lo + hi) / 2
            step(f"search {i + 1}/{options.search_steps}")
            v = self.evaluate(evaluator, f"mixed@{mid / 1e6:.1f}MB-weights", self.allocate_bytes(mid))
            sweep.append(v)
            if v.perplexity <= limit:
                hi, best = mid, v
            else:
                lo = mid
        if best is None:  # the upper end itself
            step("search upper end")
            best = self.evaluate(evaluator, "mixed@upper", self.allocate_bytes(hi))
            sweep.append(best)
        best.name = f"mixed@smallest-within-{100 * options.ppl_tolerance:g}%"
        lo_all2 = self.weight_bytes({layer.name: (quant.FP32 if layer.tied_to else 2) for layer in self.decoder.layers})
        for i in range(options.sweep_points):
            target = lo_all2 + (self.weight_bytes(u8) - lo_all2) * (i + 0.5) / options.sweep_points
            step(f"sweep {i + 1}/{options.sweep_points}")
            sweep.append(self.evaluate(evaluator, f"sweep@{target / 1e6:.1f}MB-weights", self.allocate_bytes(target)))
        t_eval = time.perf_counter() - t0
        variants = [fp32, v_u8, v_u4, v_at_u4, best]
        if requested_name not in {v.name for v in variants}:
            variants.append(v_req)

        # Write and register.
        output_name = options.output_name or f"{self.manifest.name}-mixed"
        version = next_version(repository, output_name)
        layers = self.layer_rows(requested)
        if progress:
            progress("writing", 0, 1, output_name)
        check()
        timings = {"sensitivity analysis (s)": round(t_analysis, 1), "allocation (s)": round(t_allocation, 2),
                   "evaluation (s)": round(t_eval, 1)}
        notes = self.notes()
        with repository.staging(output_name, version) as staged:
            model = build_model(self.decoder, self.packs, requested, ACCURACY_LEVEL)
            report_path, plot_path = staged.path / "report.md", staged.path / "size_vs_perplexity.png"
            plot(plot_path, sweep, [v_u8, v_u4], fp32, f"{self.manifest.name}: size vs perplexity")
            timings["total (s)"] = round(time.perf_counter() - started, 1)
            facts = {
                "block_size": self.block_size, "accuracy_level": ACCURACY_LEVEL,
                "budget": {"mb": options.budget_mb} if options.budget_mb is not None else {"bits": options.budget_bits},
                "weight_bytes": self.weight_bytes(requested), "calibration": calibration_desc,
                "heldout": heldout_desc, "variants": [v.row() for v in variants],
            }
            staged.manifest = stage_files(staged.path, model, self.manifest,
                                          {k: v for k, v in requested.items()}, facts, output_name, version)
            staged.manifest.files["report"] = "report.md"
            staged.manifest.files["plot"] = "size_vs_perplexity.png"
            report_path.write_text(markdown(
                model=self.manifest.reference, output=f"{output_name}:{version}", calibration=calibration_desc,
                heldout=heldout_desc, block_size=self.block_size, variants=variants, fp32=fp32, layers=layers,
                notes=notes, timings=timings))
            check()
        published = staged.published
        assert published is not None and published.directory is not None
        if progress:
            progress("writing", 1, 1, output_name)
        return QuantizeResult(published, layers, variants, calibration_desc,
                              published.directory / "report.md", published.directory / "size_vs_perplexity.png",
                              timings)

    def packs_bits_available(self, layer) -> list[int]:
        s = next(s for s in self._sensitivity_by_layer() if s.layer.name == layer.name)
        return sorted(s.kl)

    def _check_budget_feasible(self, options: QuantizeOptions) -> None:
        if options.budget_mb is None:
            return
        smallest = {layer.name: (quant.FP32 if layer.tied_to else 2) for layer in self.decoder.layers}
        need = self.size_on_disk(self.weight_bytes(smallest), len(self.decoder.layers))
        if options.budget_mb * 1e6 < need:
            raise BudgetError(f"budget {options.budget_mb:g} MB is below the smallest this model can be "
                              f"(every layer at 2 bits: {need / 1e6:.2f} MB)")

    def layer_rows(self, bits: dict[str, int]) -> list[dict]:
        return [{"name": s.layer.name, "label": s.layer.label, "shape": list(s.layer.shape),
                 "kl": dict(s.kl), "estimated": sorted(s.estimated), "bits": bits.get(s.layer.name, 0),
                 "tied_to": s.layer.tied_to} for s in self._sensitivity_by_layer()]

    def notes(self) -> list[str]:
        notes = []
        tied = [layer for layer in self.decoder.layers if layer.tied_to]
        if tied:
            notes.append(
                f"`{tied[0].label}` is tied to the embedding table `{tied[0].tied_to}`: in fp32 it shares the table "
                "(costs nothing extra); quantized, it gets its own copy while the Gather keeps the fp32 table. "
                "The embedding Gather itself is not quantized (GatherBlockQuantized is not used).")
        src = self.manifest.source or {}
        if "gguf" in str(src.get("file", "")).lower() or "q4_1" in str(src).lower():
            notes.append(
                "The fp32 weights were dequantized from a Q4_1 GGUF: every block of 32 holds at most 16 values on a "
                "scale + float-minimum grid. ORT's integer zero point cannot reproduce that grid, and any scheme with "
                "a per-block float minimum would reproduce it exactly, so this model flatters such schemes; do not "
                "read its numbers as a true fp32 model's.")
        return notes
