"""The model host's data plane, independent of any transport: generate, score, embed.

The gRPC servicer converts messages to these calls and back; nothing here knows
about protobuf. Decoder work (generation, scoring, tokenizing, chat rendering) runs
on the model's engine thread (services/model_host/engine/); encoders and classifiers
run in worker threads. The event loop only moves messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator

import numpy as np

from services.common.errors import InvalidArgument, Unavailable
from services.model_host import observability
from services.model_host.answers import (
    Confidence,
    GenerationSummary,
    SamplingSettings,
    Timings,
    TokenEvent,
)
from services.model_host.batching import DynamicBatcher
from services.model_host.calibration import (
    ScoreCalibration,
    load_score_calibration,
    option_distribution,
    options_share,
    score_confidence,
)
from services.model_host.engine import DecoderEngine, EngineHook
from services.model_host.engine.sequence import GenerationRequest, Messages
from services.model_host.faults import InjectedDelays
from services.model_host.registry import ModelRecord, ModelRegistry, State
from services.model_host.runtimes.classifier import ClassifierRuntime, request_text
from services.model_host.runtimes.decoder import DecoderRuntime
from services.model_host.runtimes.encoder import EncoderRuntime

__all__ = ["Confidence", "DataPlane", "GenerationSummary", "SamplingSettings", "Timings", "TokenEvent"]


@dataclass
class ScoreResult:
    model: str
    version: str
    best_option: str
    prompt_tokens: int
    timings: Timings
    confidence: Confidence


@dataclass
class EmbedResult:
    model: str
    version: str
    vectors: np.ndarray
    timings: Timings


class BatchingHook:
    """Gives each loaded encoder a dynamic batcher, and drops it on unload."""

    def __init__(self, executor: ThreadPoolExecutor, max_batch_size: int, max_queue_delay_s: float):
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.batchers: dict[str, DynamicBatcher] = {}

    def on_model_load(self, record: ModelRecord) -> None:
        runtime = record.runtime
        if isinstance(runtime, EncoderRuntime) and self.max_batch_size > 1:
            self.batchers[record.name] = DynamicBatcher(
                runtime.embed, self.executor, self.max_batch_size, self.max_queue_delay_s, length_of=runtime.token_count
            )

    def on_model_unload(self, record: ModelRecord) -> None:
        self.batchers.pop(record.name, None)


class DataPlane:
    def __init__(self, registry: ModelRegistry, executor: ThreadPoolExecutor, batching: BatchingHook | None = None,
                 faults: InjectedDelays | None = None, engines: EngineHook | None = None):
        self.registry = registry
        self.executor = executor
        self.batching = batching
        self.engines = engines
        self.faults = faults or InjectedDelays({})
        self._calibrations: dict[str, ScoreCalibration | None] = {}

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _calibration(self, model: str) -> ScoreCalibration | None:
        if model not in self._calibrations:
            self._calibrations[model] = load_score_calibration(model)
        return self._calibrations[model]

    @staticmethod
    def _entry_timings(received: float, needs_load: bool) -> Timings:
        waited_ms = (time.perf_counter() - received) * 1000
        return Timings(load_ms=waited_ms) if needs_load else Timings(queue_ms=waited_ms)

    def _engine(self, record: ModelRecord) -> DecoderEngine:
        engine = self.engines.engines.get(record.name) if self.engines is not None else None
        if engine is None:
            raise Unavailable(f"model `{record.name}` has no engine running; retry")
        return engine

    @staticmethod
    def _prompt_ids(runtime: DecoderRuntime, messages: Messages, prompt: str) -> list[int]:
        try:
            ids = runtime.prompt_ids(messages, prompt)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens; send some text")
        if len(ids) >= runtime.max_length:
            raise InvalidArgument(f"the prompt is {len(ids)} tokens; this model takes at most {runtime.max_length - 1}")
        return ids

    # ------------------------------------------------------------------ generate

    async def generate(self, model: str, messages: Messages, prompt: str, sampling: SamplingSettings) -> AsyncIterator[TokenEvent | GenerationSummary]:
        """Streams a generation from the model's engine (continuous batching on its own thread).
        Leaving the iteration early (a cancelled caller) frees the sequence's slot within one step."""
        received = time.perf_counter()
        needs_load = self.registry.record(model).state != State.READY
        async with self.registry.use(model) as record:
            timings = self._entry_timings(received, needs_load)
            observability.waited(model, received, "generate")
            await self.faults.before_prefill(model)
            engine = self._engine(record)
            request = GenerationRequest(model, record.manifest.version, messages, prompt, sampling, received, timings)
            async with contextlib.aclosing(engine.generate(request)) as events:
                async for event in events:
                    if isinstance(event, GenerationSummary):
                        self._report_generation(model, event)
                    yield event

    @staticmethod
    def _report_generation(model: str, summary: GenerationSummary) -> None:
        now = time.perf_counter()
        timings = summary.timings
        decode_started = now - timings.decode_ms / 1000
        observability.prefilled(model, decode_started - timings.prefill_ms / 1000, summary.prompt_tokens,
                                ended=decode_started)
        observability.decoded(model, decode_started, summary.completion_tokens, timings.first_token_ms,
                              summary.finish_reason)

    # ------------------------------------------------------------------ score

    async def score(self, model: str, messages: Messages, prompt: str, options: list[str]) -> ScoreResult:
        received = time.perf_counter()
        needs_load = self.registry.record(model).state != State.READY
        async with self.registry.use(model) as record:
            if isinstance(record.runtime, ClassifierRuntime):
                return await self._classify(model, record, messages, prompt, options, received, needs_load)
            runtime: DecoderRuntime = record.runtime
            timings = self._entry_timings(received, needs_load)
            observability.waited(model, received, "score")
            started = time.perf_counter()
            prompt_ids, sums = await self._engine(record).call(self._score_options, runtime, messages, prompt, options)
            timings.prefill_ms = (time.perf_counter() - started) * 1000
            observability.scored(model, started, len(prompt_ids), len(options))
            timings.total_ms = (time.perf_counter() - received) * 1000
            probabilities = option_distribution(sums)
            calibrated, source = score_confidence(model, sums, self._calibration(model))
            confidence = Confidence(
                labels=[(o, float(p), s) for o, p, s in zip(options, probabilities, sums)],
                calibrated=calibrated,
                source=source,
            )
            return ScoreResult(model, record.manifest.version, options[int(np.argmax(probabilities))],
                               len(prompt_ids), timings, confidence)

    @classmethod
    def _score_options(cls, runtime: DecoderRuntime, messages: Messages, prompt: str,
                       options: list[str]) -> tuple[list[int], list[float]]:
        """On the engine's thread: the prompt's tokens and each option's summed log-probability."""
        prompt_ids = cls._prompt_ids(runtime, messages, prompt)
        try:
            sums, _ = runtime.score_options(prompt_ids, options)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return prompt_ids, sums

    async def _classify(self, model: str, record: ModelRecord, messages: Messages, prompt: str, options: list[str],
                        received: float, needs_load: bool) -> ScoreResult:
        """Score on a classification model: its (calibrated) distribution over its labels,
        renormalised over `options`, which must be some of those labels."""
        runtime: ClassifierRuntime = record.runtime
        unknown = [option for option in options if option not in runtime.labels]
        if unknown:
            raise InvalidArgument(f"`{model}` classifies into {', '.join(runtime.labels)}; options must be some of "
                                  f"these labels, not {', '.join(map(repr, unknown))}")
        text = request_text(messages, prompt, options)
        if not text.strip():
            raise InvalidArgument(f"nothing to classify: send a `prompt` or a user message for `{model}`")
        timings = self._entry_timings(received, needs_load)
        started = time.perf_counter()
        distribution = (await self._in_thread(runtime.classify, [text]))[0]
        timings.prefill_ms = (time.perf_counter() - started) * 1000
        chosen = options_share([distribution[runtime.labels.index(option)] for option in options])
        timings.total_ms = (time.perf_counter() - received) * 1000
        confidence = Confidence(
            labels=[(o, float(p), float(np.log(max(p, 1e-45)))) for o, p in zip(options, chosen)],
            calibrated=float(chosen.max()),
            source=runtime.calibration_source,
        )
        return ScoreResult(model, record.manifest.version, options[int(np.argmax(chosen))],
                           runtime.token_counts([text])[0], timings, confidence)

    # ------------------------------------------------------------------ embed

    async def embed(self, model: str, texts: list[str]) -> EmbedResult:
        received = time.perf_counter()
        needs_load = self.registry.record(model).state != State.READY
        async with self.registry.use(model) as record:
            runtime: EncoderRuntime = record.runtime
            timings = self._entry_timings(received, needs_load)
            observability.waited(model, received, "embed")
            started = time.perf_counter()
            batcher = self.batching.batchers.get(model) if self.batching else None
            if batcher is not None:
                vectors = np.stack(await batcher.submit(list(texts)))
            else:
                vectors = await self._in_thread(runtime.embed, list(texts))
            timings.prefill_ms = (time.perf_counter() - started) * 1000
            observability.embedded(model, started, len(texts))
            timings.total_ms = (time.perf_counter() - received) * 1000
            return EmbedResult(model, record.manifest.version, vectors, timings)
