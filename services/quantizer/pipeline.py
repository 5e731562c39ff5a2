"""The quantizer end to end: analyse, allocate, evaluate, write, register.

Used by the gRPC servicer and by bench/quantizer.py. Nothing is registered until
the very end (`ModelRepository.staging`), so an error or a cancellation leaves
the repository as it was.

Why one module of ~550 lines: `Quantizer` holds one run's state (the decoder graph, the packed
weights, the measured sensitivities) and its steps read and extend it; split across modules,
that state would be passed around instead. The maths lives elsewhere (allocation.py, quant.py,
sensitivity.py, report.py, writer.py).
"""

from __future__ import annotations

import itertools
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
    PackCache, Prober, TextSource, analyze, token_windows,
)
from services.quantizer.writer import (
    ACCURACY_LEVEL, NODE_OVERHEAD_BYTES, build_model, graph_overhead_bytes, item_bytes, max_shared_bytes, next_version,
    predicted_weight_bytes, stage_files,
)

__all__ = ["QuantizeOptions", "Quantizer", "BudgetError", "NotADecoderError", "Cancelled"]

Progress = Callable[[str, int, int, str], None]


@dataclass
class QuantizeOptions:
    budget_bits: float | None = None       # the size of every layer at this many bits (see budget_bits_to_weight_bytes)
    budget_mb: float | None = None         # total model size on disk, MB (10^6 bytes)
    block_size: int = 32
    calibration: TextSource | None = None  # None = packaged calibration.txt
    heldout: TextSource | None = None      # None = packaged heldout.txt
    windows: int = DEFAULT_WINDOWS
    window_tokens: int = DEFAULT_WINDOW_TOKENS
    eval_windows: int = 8
    eval_tokens: int = 128
    # One probe per layer (4 bits); the other codes' KLs are estimated from it by activation-weighted
    # weight error (sensitivity.analyze) and corrected by measured joint KLs (allocate_calibrated): on
    # SmolLM2 the 2-bit estimate was within 0.6-1.7x of the probe for 80% of the layers.
    measure_bits: tuple[int, ...] = (4,)
    estimate_bits: tuple[int, ...] = (8, 2, quant.Q4F, quant.Q2F, quant.Q4S, quant.Q2S)
    output_name: str | None = None
    # Neither budget_bits nor budget_mb: the model written is the smallest mix within ppl_tolerance of fp32.
    search_steps: int = 4       # budgets tried when searching the smallest size within 2% of fp32
    sweep_points: int = 1       # extra budgets for the size/perplexity plot (the search's budgets are plotted too)
    threads: int = 0
    ppl_tolerance: float = 0.02
    calibrate_rounds: int = 1   # measured-interaction re-solves per byte budget (0: the plain additive knapsack)


@dataclass
class QuantizePlan:
    """Everything a quantize run decided and measured, before anything is written."""

    chosen_name: str
    chosen: dict[str, int]          # layer -> bits of the model to write
    variants: list[Variant]         # the report's comparison rows
    sweep: list[Variant]            # mixed variants for the size/perplexity plot
    uniform: list[Variant]
    fp32: Variant
    calibration: str
    heldout: str
    budget: dict
    layers: list[dict]
    notes: list[str]
    timings: dict
    allocation_log: dict


@dataclass
class _Candidates:
    """The allocations a plan evaluates (layer -> bits)."""

    requested: dict[str, int] | None  # the budget asked for; None: the smallest within tolerance is chosen later
    requested_name: str | None
    uniform_check: list[str]          # notes of never_worse_than_uniform
    u8: dict[str, int]
    u4: dict[str, int]
    u8_all: dict[str, int]
    u4_all: dict[str, int]
    u4s_all: dict[str, int]
    u4f_all: dict[str, int]
    at_u4: dict[str, int]
    at_u4_all: dict[str, int]
    at_u8_all: dict[str, int]


@dataclass
class _Measured:
    chosen_name: str
    chosen: dict[str, int]
    variants: list[Variant]
    sweep: list[Variant]
    uniform: list[Variant]
    fp32: Variant


@dataclass
class QuantizeResult:
    manifest: ModelManifest
    layers: list[dict]
    variants: list[Variant]
    calibration: str
    report_path: Path
    plot_path: Path
    timings: dict = field(default_factory=dict)
    allocation_log: dict = field(default_factory=dict)  # per mixed variant: rounds of allocate_calibrated


def _undominated(options: list[Option]) -> list[Option]:
    """The options no other option beats on both cost and penalty (a dominated option is never in an
    optimal solution, so dropping it changes no solution; ties keep the first). A searched code has
    its plain code's bytes and, by construction, no more weight error, so this halves the knapsack's
    work when both are offered."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda o: (o.cost, o.penalty)):
        if not kept or option.penalty < min(k.penalty for k in kept):
            kept.append(option)
    return kept


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
        self.prober: Prober | None = None
        self.interaction: dict[int, float] = {}  # bits -> factor on single-layer KLs (see allocate_calibrated)

    # ---- analysis

    def windows(self, source: TextSource, windows: int, tokens: int) -> np.ndarray:
        try:
            return token_windows(self.tokenizer, source.text, windows, tokens)
        except ValueError as exc:
            raise ValueError(f"{source.name}: {exc}") from None

    def analyze(self, calibration: np.ndarray, measure=(4, 2), estimate=(8,), progress: Progress | None = None,
                should_stop=None) -> list[LayerSensitivity]:
        self.prober = Prober(self.decoder, calibration, self.threads)  # kept: joint KLs for the allocation
        self.packs.importance = self.prober.importance  # before any float-minimum packing
        self.sensitivities = analyze(self.decoder, calibration, self.packs, measure, estimate=estimate,
                                     progress=progress, should_stop=should_stop, threads=self.threads,
                                     prober=self.prober)
        return self.sensitivities

    # ---- sizes and allocation

    def size_on_disk(self, weight_bytes: int, quantized_layers: int) -> int:
        """Upper bound of the file size of a written variant (exact graph + weights + node allowance)."""
        return self.graph_bytes + weight_bytes + NODE_OVERHEAD_BYTES * quantized_layers

    def uniform_bits(self, bits: int) -> dict[str, int]:
        """What ORT's MatMulNBits quantizer does: every MatMul at `bits`, except an lm_head tied to the
        embedding (it stays the fp32 table's transpose); the embedding Gather stays fp32."""
        return {layer.name: (bits if layer.kind == "matmul" and not layer.tied_to else quant.FP32)
                for layer in self.decoder.layers}

    def uniform_all_bits(self, bits: int) -> dict[str, int]:
        """Every layer at `bits`, the embedding (when its width holds whole blocks) and lm_head included.
        A float-minimum code applies to the MatMuls; the embedding then takes its integer form."""
        def code(layer) -> int:
            if not self._quantizable(layer):
                return quant.FP32
            return quant.nbits(bits) if layer.kind == "gather" and quant.is_float_min(bits) else bits
        return {layer.name: code(layer) for layer in self.decoder.layers}

    def _quantizable(self, layer) -> bool:
        return layer.kind == "matmul" or layer.shape[0] % self.block_size == 0

    def weight_bytes(self, bits: dict[str, int]) -> int:
        return predicted_weight_bytes(self.decoder, bits, self.block_size)

    def penalty(self, s: LayerSensitivity, bits: int) -> float:
        """The allocation's cost of `bits` on a layer: its measured (or estimated) single-layer KL,
        times the bit-width's interaction factor (1 unless `allocate_calibrated` measured one)."""
        return 0.0 if bits == quant.FP32 else s.kl[bits] * self.interaction.get(bits, 1.0)

    BIT_CHOICES = (quant.FP32, 8, 4, 2, quant.Q4F, quant.Q2F, quant.Q4S, quant.Q2S)

    def joint_kl(self, bits: dict[str, int], only: int | None = None) -> float:
        """Measured calibration KL with every layer (or those at `only` bits) quantized as in `bits` at once."""
        if self.prober is None:
            raise RuntimeError("run analyze() first")
        return self.prober.kl({name: self.packs.fake(self.decoder.layer(name), b) for name, b in bits.items()
                               if b != quant.FP32 and (only is None or b == only)})

    def predicted_kl(self, bits: dict[str, int], only: int | None = None) -> float:
        """The additive model's KL: the sum of the single-layer KLs."""
        sens = {s.layer.name: s for s in self._sensitivity_by_layer()}
        return float(sum(sens[n].kl[b] for n, b in bits.items() if b != quant.FP32 and (only is None or b == only)))

    def allocate_calibrated(self, weight_budget: float, rounds: int = 3, bit_choices=BIT_CHOICES,
                            log: list | None = None) -> dict[str, int]:
        """`allocate_bytes` with the additive model corrected by measurement.

        Single-layer KLs need not add up: layers quantized together can move the output more (or less)
        than the sum of their single KLs, and more so for large (2-bit) errors. So, after each exact
        solve, measure on
        the calibration windows (one forward pass each) the joint KL of the layers the solution puts at
        each bit-width, set that bit-width's factor to joint / sum of single KLs (the interaction the
        additive model missed, on the set it actually chose), and solve again with the penalties scaled.
        Every solution's full joint KL is measured too, and the one with the least wins, so this never
        returns something the measurement says is worse than the plain additive solution (round 0).
        The budget holds exactly for every round (each is an exact knapsack). On SmolLM2-135M the
        measured factors were ~1.15-1.2 for 2, 4 and 8 bits alike (bench/results/quantizer.md), so
        the re-solve changes little there; it guards against a bit-width that interacts worse."""
        saved, self.interaction = self.interaction, {}
        tried: list[tuple[float, dict[str, int]]] = []
        try:
            for round_ in range(rounds + 1):
                bits = self.allocate_bytes(weight_budget, bit_choices)
                if any(bits == seen for _, seen in tried):
                    break
                joint = self.joint_kl(bits)
                tried.append((joint, bits))
                factors = {}
                # The last round's factors would only be logged: not measured (one probe per code saved).
                for b in sorted({b for b in bits.values() if b != quant.FP32}) if round_ < rounds else ():
                    predicted = self.predicted_kl(bits, b)
                    if predicted > 0:
                        factors[b] = max(self.joint_kl(bits, b), 1e-12) / predicted
                if log is not None:
                    log.append({"round": round_, "predicted": self.predicted_kl(bits), "joint": joint,
                                "factors": {b: round(f, 3) for b, f in factors.items()},
                                "applied": dict(self.interaction)})
                if round_ == rounds:
                    break
                self.interaction = factors
        finally:
            self.interaction = saved
        return min(tried, key=lambda t: t[0])[1]

    def _items(self, bit_choices, cost) -> list[tuple[tuple, list[Option]]]:
        """Allocation items (see DecoderGraph.items) with one option per combination of their layers' bits."""
        sens = {s.layer.name: s for s in self._sensitivity_by_layer()}
        out = []
        for item in self.decoder.items():
            per_layer = [[b for b in bit_choices if b == quant.FP32 or b in sens[layer.name].kl] for layer in item]
            options = []
            for combo in itertools.product(*per_layer):
                penalty = sum(self.penalty(sens[layer.name], b) for layer, b in zip(item, combo))
                options.append(Option(combo, float(cost(item, combo)), penalty))
            out.append((item, _undominated(options)))
        return out

    def allocate_bytes(self, weight_budget: float, bit_choices=BIT_CHOICES) -> dict[str, int]:
        """Least total sensitivity with initializer bytes <= weight_budget (exact: each option's cost is
        its real bytes, scales and zero points included; see writer.item_bytes). With float-minimum
        codes offered, the block-sum indicators they may share are reserved up front (<= 0.4 MB)."""
        fixed = self.decoder.initializer_bytes(exclude=self.decoder.weight_names())
        integer = tuple(b for b in bit_choices if not quant.is_float_min(b))
        if integer == tuple(bit_choices):
            return self._allocate_bytes(weight_budget, bit_choices, fixed)
        # Two exact solves, the better kept: integer codes only (no reserve), and every code with the
        # indicators reserved (what the float-minimum layers may share; <= 0.4 MB for SmolLM2).
        solutions = [self._allocate_bytes(weight_budget, integer, fixed)]
        try:
            solutions.append(self._allocate_bytes(weight_budget, bit_choices,
                                                  fixed + max_shared_bytes(self.decoder, self.block_size)))
        except BudgetError:
            pass  # too tight for the reserve
        return min(solutions, key=self._total_penalty)

    def _total_penalty(self, bits: dict[str, int]) -> float:
        sens = {s.layer.name: s for s in self._sensitivity_by_layer()}
        return sum(self.penalty(sens[name], b) for name, b in bits.items())

    def _allocate_bytes(self, weight_budget: float, bit_choices, fixed: float) -> dict[str, int]:
        items = self._items(bit_choices, lambda item, combo: item_bytes(self.decoder, item, combo, self.block_size))
        try:
            solved = allocation.solve([options for _, options in items], weight_budget - fixed, unit=1024.0)
        except BudgetError:
            smallest = fixed + sum(min(o.cost for o in options) for _, options in items)
            raise BudgetError(
                f"the budget leaves {weight_budget / 1e6:.2f} MB for weights; the smallest possible "
                f"(every layer at its fewest bits) needs {smallest / 1e6:.2f} MB") from None
        bits = {layer.name: b for (item, _), combo in zip(items, solved.labels) for layer, b in zip(item, combo)}
        assert self.weight_bytes(bits) <= weight_budget
        return bits

    def budget_bits_to_weight_bytes(self, budget_bits: float) -> float:
        """A budget in bits per weight as bytes: the weight bytes of every layer at that many bits
        (`uniform_all_bits`: 2, 4 or 8 bits, integer zero points, scales and zero points included;
        32 = fp32), linear between those points. So `--budget-bits 4` is exactly uniform-4-all's size,
        and the mix is compared with uniform allocations at equal size."""
        points = [(2.0, 2), (4.0, 4), (8.0, 8), (32.0, quant.FP32)]
        sizes = [(b, float(self.weight_bytes(self.uniform_all_bits(code)))) for b, code in points]
        if budget_bits <= sizes[0][0]:
            return sizes[0][1] * budget_bits / sizes[0][0]
        for (b0, w0), (b1, w1) in zip(sizes, sizes[1:]):
            if budget_bits <= b1:
                return w0 + (w1 - w0) * (budget_bits - b0) / (b1 - b0)
        return sizes[-1][1]

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
        """Plan, then write and register `<source>-mixed` (or options.output_name) as a new version."""
        plan = self.plan(options, progress, should_stop)
        output_name = options.output_name or f"{self.manifest.name}-mixed"
        version = next_version(repository, output_name)
        if progress:
            progress("writing", 0, 1, output_name)
        with repository.staging(output_name, version) as staged:
            staged.manifest = self.write(staged.path, plan, output_name, version)
            if should_stop and should_stop():
                raise Cancelled("the quantize call was cancelled")
        published = staged.published
        assert published is not None and published.directory is not None
        if progress:
            progress("writing", 1, 1, output_name)
        return QuantizeResult(published, plan.layers, plan.variants, plan.calibration,
                              published.directory / "report.md", published.directory / "size_vs_perplexity.png",
                              plan.timings, plan.allocation_log)

    def plan(self, options: QuantizeOptions, progress: Progress | None = None,
             should_stop: Callable[[], bool] | None = None) -> QuantizePlan:
        """Analyse, allocate and evaluate: the bits of the model to write and the report's rows."""
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
        allocation_log: dict[str, list] = {}

        def allocate(weight_budget: float, label: str) -> dict[str, int]:
            if not options.calibrate_rounds:
                return self.allocate_bytes(weight_budget)
            log = allocation_log.setdefault(label, [])
            return self.allocate_calibrated(weight_budget, options.calibrate_rounds, log=log)

        candidates = self._candidates(options, allocate)
        t_allocation = time.perf_counter() - t0
        if progress:
            progress("allocation", 1, 1, "")
        check()

        t0 = time.perf_counter()
        measured = self._measure(options, held, candidates, allocate, progress, check)
        t_eval = time.perf_counter() - t0
        budget = ({"mb": options.budget_mb} if options.budget_mb is not None else
                  {"bits": options.budget_bits} if options.budget_bits is not None else
                  {"smallest_within_perplexity": options.ppl_tolerance})
        return QuantizePlan(measured.chosen_name, measured.chosen, measured.variants, measured.sweep, measured.uniform,
                            measured.fp32, calibration_desc, heldout_desc, budget, self.layer_rows(measured.chosen),
                            self.notes() + candidates.uniform_check,
                            {"sensitivity analysis (s)": round(t_analysis, 1), "allocation (s)": round(t_allocation, 2),
                             "evaluation (s)": round(t_eval, 1), "total (s)": round(time.perf_counter() - started, 1)},
                            allocation_log)

    def _candidates(self, options: QuantizeOptions, allocate: Callable[[float, str], dict[str, int]]) -> "_Candidates":
        """The allocations to evaluate: the budget asked for (never worse than uniform at its size),
        ORT's uniform 8/4 (embedding and tied head fp32), uniform 8/4 on every layer, and mixed
        allocations at those uniform sizes."""
        requested, requested_name = None, None
        if options.budget_mb is not None:
            requested = allocate(self.budget_to_weight_bytes(options.budget_mb), f"mixed@{options.budget_mb:g}MB")
            requested_name = f"mixed@{options.budget_mb:g}MB"
        elif options.budget_bits is not None:
            requested_name = f"mixed@{options.budget_bits:g}bits"
            requested = allocate(self.budget_bits_to_weight_bytes(float(options.budget_bits)), requested_name)
        u4, u8 = self.uniform_bits(4), self.uniform_bits(8)
        u4_all, u8_all = self.uniform_all_bits(4), self.uniform_all_bits(8)
        u4f_all, u4s_all = self.uniform_all_bits(quant.Q4F), self.uniform_all_bits(quant.Q4S)
        uniform_check: list[str] = []
        if requested is not None:
            requested, requested_name, uniform_check = self.never_worse_than_uniform(
                requested, requested_name, options,
                {"uniform-8": u8, "uniform-4": u4, "uniform-8-all": u8_all, "uniform-4-all": u4_all,
                 "uniform-4s-all": u4s_all, "uniform-4f-all": u4f_all, "uniform-2-all": self.uniform_all_bits(2),
                 "uniform-2s-all": self.uniform_all_bits(quant.Q2S), "uniform-2f-all": self.uniform_all_bits(quant.Q2F)})
        return _Candidates(
            requested, requested_name, uniform_check, u8=u8, u4=u4, u8_all=u8_all, u4_all=u4_all, u4s_all=u4s_all,
            u4f_all=u4f_all,
            at_u4=allocate(self.weight_bytes(u4), "mixed@uniform-4-size"),
            at_u4_all=allocate(self.weight_bytes(u4_all), "mixed@uniform-4-all-size"),
            at_u8_all=allocate(self.weight_bytes(u8_all), "mixed@uniform-8-all-size"))

    def _measure(self, options: QuantizeOptions, held: np.ndarray, candidates: "_Candidates",
                 allocate: Callable[[float, str], dict[str, int]], progress: Progress | None,
                 check: Callable[[], None]) -> "_Measured":
        """Held-out perplexity of fp32, the candidates, the smallest mix within tolerance of fp32
        (bisection on the budget) and a sweep for the plot; and the model to write."""
        c = candidates
        planned = 10 + (c.requested is not None) + options.search_steps + options.sweep_points
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
        fp32 = evaluator.evaluate("fp32", fp32_path, fp32_size, self.decoder.source_initializer_bytes)

        def variant(label, allocation):
            step(label)
            return self.evaluate(evaluator, label, allocation)

        v_u8 = variant("uniform-8", c.u8)
        v_u4 = variant("uniform-4", c.u4)
        v_at_u4 = variant("mixed@uniform-4-size", c.at_u4)
        v_u8_all = variant("uniform-8-all", c.u8_all)
        v_u4_all = variant("uniform-4-all", c.u4_all)
        v_u4s_all = variant("uniform-4s-all", c.u4s_all)
        v_u4f_all = variant("uniform-4f-all", c.u4f_all)
        v_at_u4_all = variant("mixed@uniform-4-all-size", c.at_u4_all)
        v_at_u8_all = variant("mixed@uniform-8-all-size", c.at_u8_all)
        v_req = variant(c.requested_name, c.requested) if c.requested is not None else None

        limit = fp32.perplexity * (1 + options.ppl_tolerance)
        smallest = {layer.name: min(self.packs_bits_available(layer), default=quant.FP32)
                    for layer in self.decoder.layers}
        lo = float(self.weight_bytes(smallest))
        measured = [v for v in (v_u8, v_u8_all, v_u4s_all, v_u4f_all, v_at_u4, v_at_u4_all, v_at_u8_all, v_req)
                    if v is not None]
        within = [v for v in measured if v.perplexity <= limit]
        hi = float(min((v.weight_bytes for v in within), default=fp32.weight_bytes))
        sweep: list[Variant] = [v for v in (v_at_u4, v_at_u4_all, v_at_u8_all, v_req) if v is not None]
        mixed_within = [v for v in within if v.name.startswith("mixed")]
        best = self._bisect_smallest_within(
            evaluator, limit, lo, hi, min(mixed_within, key=lambda v: v.weight_bytes) if mixed_within else None,
            options.search_steps, allocate, step, sweep)
        best = Variant(**{**best.__dict__, "name": f"mixed@smallest-within-{100 * options.ppl_tolerance:g}%"})
        uniform_rows = [v_u8, v_u4, v_u8_all, v_u4_all, v_u4s_all, v_u4f_all]
        chosen, chosen_name = c.requested, c.requested_name
        if chosen is None:
            # The smallest model within tolerance, mixed or not: a uniform allocation that is smaller (or as
            # small and better) than every mix tried is what gets written, and the report says so.
            pick = min([best] + [v for v in uniform_rows if v.perplexity <= limit],
                       key=lambda v: (v.weight_bytes, v.perplexity))
            chosen, chosen_name = dict(pick.bits), pick.name
        top = self.weight_bytes(c.u8_all)
        for i in range(options.sweep_points):
            target = lo + (top - lo) * (i + 0.5) / options.sweep_points
            step(f"sweep {i + 1}/{options.sweep_points}")
            name = f"sweep@{target / 1e6:.1f}MB-weights"
            sweep.append(self.evaluate(evaluator, name, allocate(target, name)))
        variants = [fp32, v_u8, v_u4, v_at_u4, v_u8_all, v_u4_all, v_u4s_all, v_at_u4_all, v_u4f_all, v_at_u8_all,
                    best]
        if v_req is not None:
            variants.append(v_req)
        return _Measured(chosen_name, chosen, variants, sweep, uniform_rows, fp32)

    def mean_bits(self, bits: dict[str, int]) -> float:
        """Nominal mean bits per weight (32 for fp32; 4f counts 4), scales and zero points not counted."""
        total = sum(layer.numel for layer in self.decoder.layers)
        return sum(quant.nbits(bits.get(layer.name, quant.FP32)) * layer.numel for layer in self.decoder.layers) / total

    def never_worse_than_uniform(self, mixed: dict[str, int], name: str, options: QuantizeOptions,
                                  uniforms: dict[str, dict[str, int]]) -> tuple[dict[str, int], str, list[str]]:
        """The mix for a budget, unless a uniform allocation within the same budget moves the model's
        output on the calibration windows less (joint KL, measured, not predicted): then that one,
        named so, and a report note with every comparison. Held-out text is not used to choose."""
        def fits(bits: dict[str, int]) -> bool:
            if options.budget_mb is not None:
                quantized = sum(b != quant.FP32 for b in bits.values())
                return self.size_on_disk(self.weight_bytes(bits), quantized) <= options.budget_mb * 1e6
            return self.weight_bytes(bits) <= self.budget_bits_to_weight_bytes(float(options.budget_bits)) + 1e-6

        measured = [(self.joint_kl(mixed), name, mixed)]
        measured += [(self.joint_kl(bits), label, bits) for label, bits in uniforms.items() if fits(bits)]
        kl, label, bits = min(measured, key=lambda row: row[0])
        rows = ", ".join(f"{n} {k:.4f}" for k, n, _ in measured)
        if label == name:
            return mixed, name, [f"Never worse than uniform: on the calibration windows the mix moved the output "
                                 f"least of every allocation within the budget (joint KL: {rows})."]
        return bits, f"{label} (within the budget)", [
            f"Never worse than uniform: {label} fits the same budget and moved the output on the calibration "
            f"windows less than the mix (joint KL: {rows}), so {label} is what was written."]

    def _bisect_smallest_within(self, evaluator: Evaluator, limit: float, lo: float, hi: float,
                                best: Variant | None, steps: int, allocate, step, sweep: list[Variant]) -> Variant:
        """Bisects the weight budget between `lo` (every layer at its fewest bits) and `hi` (the smallest
        size already measured within `limit`) for the smallest mix whose held-out perplexity is within it;
        each evaluated mix is appended to `sweep`."""
        for i in range(steps):
            mid = (lo + hi) / 2
            step(f"search {i + 1}/{steps}")
            name = f"mixed@{mid / 1e6:.1f}MB-weights"
            v = self.evaluate(evaluator, name, allocate(mid, name))
            sweep.append(v)
            if v.perplexity <= limit:
                hi, best = mid, v
            else:
                lo = mid
        if best is None:  # the upper end itself
            step("search upper end")
            best = self.evaluate(evaluator, "mixed@upper", allocate(hi, "mixed@upper"))
            sweep.append(best)
        return best

    def write(self, folder: Path, plan: QuantizePlan, output_name: str, version: str) -> ModelManifest:
        """Writes the planned model, its tokenizer, report.md and the size/perplexity plot into `folder`;
        returns the manifest to publish."""
        model = build_model(self.decoder, self.packs, plan.chosen, ACCURACY_LEVEL)
        plot(folder / "size_vs_perplexity.png", plan.sweep, plan.uniform, plan.fp32,
             f"{self.manifest.name}: size vs perplexity")
        facts = {
            "block_size": self.block_size, "accuracy_level": ACCURACY_LEVEL, "budget": plan.budget,
            "chosen": plan.chosen_name, "weight_bytes": self.weight_bytes(plan.chosen),
            "calibration": plan.calibration, "heldout": plan.heldout, "variants": [v.row() for v in plan.variants],
        }
        manifest = stage_files(folder, model, self.manifest, dict(plan.chosen), facts, output_name, version)
        manifest.files["report"] = "report.md"
        manifest.files["plot"] = "size_vs_perplexity.png"
        (folder / "report.md").write_text(markdown(
            model=self.manifest.reference, output=f"{output_name}:{version}", calibration=plan.calibration,
            heldout=plan.heldout, block_size=self.block_size, variants=plan.variants, fp32=plan.fp32,
            layers=plan.layers, notes=plan.notes, timings=plan.timings, allocation_log=plan.allocation_log,
            chosen=plan.chosen_name))
        return manifest

    def packs_bits_available(self, layer) -> list[int]:
        s = next(s for s in self._sensitivity_by_layer() if s.layer.name == layer.name)
        return sorted(s.kl)

    def _check_budget_feasible(self, options: QuantizeOptions) -> None:
        if options.budget_mb is None:
            return
        fewest = min(options.measure_bits + options.estimate_bits, key=lambda code: (quant.nbits(code), code))
        smallest = {name: (fewest if b != quant.FP32 else b) for name, b in self.uniform_all_bits(fewest).items()}
        need = self.size_on_disk(self.weight_bytes(smallest), len(self.decoder.layers))
        if options.budget_mb * 1e6 < need:
            raise BudgetError(f"budget {options.budget_mb:g} MB is below the smallest this model can be "
                              f"(every layer at {fewest} bits: {need / 1e6:.2f} MB)")

    def layer_rows(self, bits: dict[str, int]) -> list[dict]:
        return [{"name": s.layer.name, "label": s.layer.label, "shape": list(s.layer.shape),
                 "kl": dict(s.kl), "estimated": sorted(s.estimated), "bits": bits.get(s.layer.name, 0),
                 "tied_to": s.layer.tied_to, "kind": s.layer.kind} for s in self._sensitivity_by_layer()]

    def notes(self) -> list[str]:
        notes = []
        heads = [layer for layer in self.decoder.layers if layer.tied_to]
        gathers = [layer for layer in self.decoder.layers if layer.kind == "gather"]
        if gathers:
            notes.append(
                f"The token embedding `{gathers[0].name}` ({gathers[0].shape[1]}x{gathers[0].shape[0]}) is a layer "
                "like the MatMuls: GatherBlockQuantized at 8/4/2 bits (uint8 data, blocks along the hidden axis), "
                "its sensitivity probed with the table fed as a graph input.")
        if heads:
            notes.append(
                f"`{heads[0].label}` is tied to `{heads[0].tied_to}` in the source; the quantizer unties it (its own "
                "transposed copy). Sizes: both fp32 -> written tied again, one table (the fp32 baseline stays the "
                "source's file size); one quantized -> the quantized copy plus a full fp32 table; both at the same "
                "bits -> one packed copy shared by MatMulNBits and GatherBlockQuantized, plus each one's scales and "
                "zero points. `uniform-8`/`uniform-4` are ORT's MatMulNBits quantizer (embedding and tied head fp32); "
                "`-all` variants quantize every layer.")
        src = self.manifest.source or {}
        if "gguf" in str(src.get("file", "")).lower() or "q4_1" in str(src).lower():
            notes.append(
                "The fp32 weights were dequantized from a Q4_1 GGUF: every block of 32 holds at most 16 values on a "
                "scale + float-minimum grid. ORT's integer zero point cannot reproduce that grid, and any scheme with "
                "a per-block float minimum would reproduce it exactly, so this model flatters such schemes (here "
                "the 4f code: 4 bits with a float minimum, which stores these blocks exactly); do not read its "
                "numbers, 4f's above all, as a true fp32 model's. Conversely, RTN with an integer zero point (8/4/2, "
                "uniform-4 and uniform-4-all above all) carries a per-block constant offset error here that a true "
                "fp32 model would not have; part of what the searched 4s/2s codes gain over RTN is removing it.")
        return notes
