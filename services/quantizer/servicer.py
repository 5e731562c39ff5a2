"""`mirador.v1.Quantizer` over gRPC.

Quantize validates, then runs the pipeline (services/quantizer/pipeline.py) in a
worker thread: progress events stream while it works, then one report. The result
is registered only when everything succeeded; a cancelled call (client gone or
deadline passed) stops the worker at its next step and leaves nothing registered.
Analyze measures sensitivities only and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from importlib import resources
from pathlib import Path

from mirador.v1 import quantizer_pb2 as pb
from mirador.v1 import quantizer_pb2_grpc

from services.common.config import MiradorConfig
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.common.logs import log_event
from services.common.model_repository import ModelManifest, ModelNotFoundError, ModelRepository, ModelRepositoryError
from services.common.validation import require_model
from services.quantizer import quant

BLOCK_SIZES = (16, 32, 64, 128, 256)
PROBE_BITS = (8, 4, 2)
log = logging.getLogger("mirador.quantizer")


class QuantizerServicer(quantizer_pb2_grpc.QuantizerServicer):
    def __init__(self, config: MiradorConfig):
        self.config = config
        self.repository = ModelRepository(config.model_repository)
        self._busy = asyncio.Lock()

    # ---- validation

    def _require_decoder(self, model: str):
        spec = require_model(self.config, model)
        if spec.task != "text-generation":
            raise InvalidArgument(f"`{model}` is a {spec.task} model; the quantizer measures decoders (text-generation)")
        return spec

    def _manifest(self, model: str) -> ModelManifest:
        spec = self._require_decoder(model)
        try:
            return self.repository.get(spec.artifact, spec.version)
        except ModelNotFoundError:
            raise FailedPrecondition(
                f"model `{model}` is not in the model repository {self.repository.root}; "
                "build it with `mirador fleet build`") from None
        except ModelRepositoryError as exc:
            raise FailedPrecondition(f"model `{model}` cannot be read: {exc}") from None

    def _calibration(self, path: str):
        """Empty = packaged default; a packaged file name; or a file inside the model repository."""
        from services.quantizer.sensitivity import TextSource

        if not path:
            return None
        if "\x00" in path or len(path) > 4096:
            raise InvalidArgument("`calibration_path` is not a usable path (a NUL byte, or over 4096 characters); "
                                  "name a packaged file or a file inside the model repository")
        packaged = resources.files("services.quantizer").joinpath("data", path)
        if "/" not in path and packaged.is_file():
            return TextSource.packaged(path)
        root = self.repository.root.resolve()
        candidate = Path(path)
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        if not resolved.is_relative_to(root):
            raise InvalidArgument(
                f"`calibration_path` {path!r} is outside the model repository {root}; "
                "put the file inside it (e.g. <repository>/calibration/text.txt) or name a packaged file")
        if not resolved.is_file():
            raise NotFound(f"`calibration_path` {path!r}: no such file in the model repository {root}")
        return TextSource.from_file(resolved)

    # ---- Quantize

    async def Quantize(self, request: pb.QuantizeRequest, context):
        manifest = self._validate_quantize(request)
        calibration = self._calibration(request.calibration_path)
        if self._busy.locked():
            raise ResourceExhausted("a quantization is already running on this quantizer; try again when it ends")
        async with self._busy:
            async with contextlib.aclosing(self._run_quantize(request, manifest, calibration)) as events:
                async for event in events:
                    yield event

    def _validate_quantize(self, request: pb.QuantizeRequest) -> ModelManifest:
        self._require_decoder(request.model)
        budget = request.WhichOneof("budget")
        if budget is None:
            raise InvalidArgument("no budget: set `budget_bits_per_weight` (e.g. 4.5) or `budget_mb`")
        if budget == "budget_bits_per_weight" and not 2.0 <= request.budget_bits_per_weight <= 32.0:
            raise InvalidArgument(f"`budget_bits_per_weight` is {request.budget_bits_per_weight:g}; use 2 to 32")
        if budget == "budget_mb" and request.budget_mb <= 0:
            raise InvalidArgument(f"`budget_mb` is {request.budget_mb:g}; give a positive size in MB")
        if request.block_size and request.block_size not in BLOCK_SIZES:
            raise InvalidArgument(f"`block_size` {request.block_size} is not supported; use one of {BLOCK_SIZES}")
        if request.output_name:
            from services.common.model_repository import _NAME_PATTERN

            if not _NAME_PATTERN.match(request.output_name):
                raise InvalidArgument(f"`output_name` {request.output_name!r} is not allowed; "
                                      "use letters, digits, '.', '_' or '-'")
            if request.output_name in self.config.fleet and request.output_name == request.model:
                raise InvalidArgument("`output_name` equals the source model; choose another name")
        return self._manifest(request.model)

    async def _run_quantize(self, request, manifest, calibration):
        from services.quantizer.pipeline import QuantizeOptions

        block = request.block_size or self.config.services.quantizer.block_size
        options = QuantizeOptions(
            budget_bits=request.budget_bits_per_weight if request.WhichOneof("budget") == "budget_bits_per_weight" else None,
            budget_mb=request.budget_mb if request.WhichOneof("budget") == "budget_mb" else None,
            block_size=block, calibration=calibration, output_name=request.output_name or None,
        )
        started = time.monotonic()
        phase_start: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def progress(phase: str, step: int, total: int, layer: str) -> None:
            now = time.monotonic()
            begun = phase_start.setdefault(phase, now)
            remaining = (now - begun) / step * (total - step) if step else 0.0
            event = pb.QuantizeProgress(phase=phase, step=step, total=total, layer=layer,
                                        elapsed_s=now - started, remaining_s=remaining)
            loop.call_soon_threadsafe(queue.put_nowait, ("progress", event))

        def work():
            from services.quantizer.pipeline import Quantizer

            quantizer = Quantizer(manifest, block_size=block)
            return quantizer.run(self.repository, options, progress, stop.is_set)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, ("done", None)))
        try:
            while True:
                kind, event = await queue.get()
                if kind == "progress":
                    yield pb.QuantizeResponse(progress=event)
                    continue
                result = self._result_or_status(task)
                yield pb.QuantizeResponse(report=self._report(result))
                log_event(log, "quantized", model=request.model, output=result.manifest.reference,
                          seconds=round(time.monotonic() - started, 1))
                return
        finally:
            if not task.done():  # the caller went away: stop the worker, let staging clean up
                stop.set()
                log_event(log, "quantize cancelled", logging.WARNING, model=request.model)

    @staticmethod
    def _result_or_status(task):
        try:
            from services.quantizer.pipeline import BudgetError, Cancelled, NotADecoderError
        except ImportError as exc:
            raise FailedPrecondition(f"the quantizer lacks a package ({exc.name}); install mirador[quantizer]") from None

        try:
            return task.result()
        except ImportError as exc:
            raise FailedPrecondition(f"the quantizer lacks a package ({exc.name}); install mirador[quantizer]") from None
        except (BudgetError, NotADecoderError) as exc:
            raise InvalidArgument(str(exc)) from None
        except Cancelled as exc:
            raise FailedPrecondition(str(exc)) from None
        except ValueError as exc:  # calibration text too short, and the like
            raise InvalidArgument(str(exc)) from None

    @staticmethod
    def _layer_reports(layers) -> list[pb.LayerReport]:
        # The proto carries bit-widths (8/4/2): a float-minimum layer (4f/2f) reports its bits, and its
        # form is in report.md and the manifest's layer_bits.
        return [pb.LayerReport(
            name=row["name"], shape=row["shape"], bits=quant.nbits(row.get("bits", 0)) if row.get("bits") else 0,
            sensitivities=[pb.BitSensitivity(bits=b, kl=kl) for b, kl in sorted(row["kl"].items(), reverse=True)
                           if b in quant.BITS],
        ) for row in layers]

    def _report(self, result) -> pb.QuantizeReport:
        return pb.QuantizeReport(
            output_model=result.manifest.name, output_version=result.manifest.version,
            layers=self._layer_reports(result.layers),
            variants=[pb.VariantMetrics(name=v.name, size_bytes=v.size_bytes, perplexity=v.perplexity,
                                        kl_vs_fp32=v.kl_vs_fp32, top1_agreement=v.top1_agreement)
                      for v in result.variants],
            calibration=result.calibration, report_path=str(result.report_path), plot_path=str(result.plot_path),
        )

    # ---- Analyze

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        self._require_decoder(request.model)
        bad = sorted(set(request.bits) - set(PROBE_BITS))
        if bad:
            raise InvalidArgument(f"`bits` holds {bad}; probe a subset of {PROBE_BITS}")
        manifest = self._manifest(request.model)
        calibration = self._calibration(request.calibration_path)
        bits = tuple(request.bits) or PROBE_BITS
        block = self.config.services.quantizer.block_size

        def work():
            from services.quantizer.pipeline import Quantizer, QuantizeOptions
            from services.quantizer.sensitivity import DEFAULT_CALIBRATION, TextSource

            options = QuantizeOptions()
            source = calibration or TextSource.packaged(DEFAULT_CALIBRATION)
            quantizer = Quantizer(manifest, block_size=block)
            windows = quantizer.windows(source, options.windows, options.window_tokens)
            quantizer.analyze(windows, measure=bits, estimate=())
            desc = f"{source.name}: {windows.shape[0]} windows x {windows.shape[1]} tokens = {windows.size} tokens"
            return quantizer.layer_rows({}), desc

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            layers, desc = await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - mapped below
            layers, desc = self._result_or_status(task)
        return pb.AnalyzeResponse(model=request.model, layers=self._layer_reports(layers), calibration=desc)
