"""The model host's data plane, independent of any transport: generate, score, embed.

The gRPC servicer converts messages to these calls and back; nothing here knows
about protobuf. Model work runs in worker threads (ONNX Runtime releases the
GIL); generation awaits each decode step, so a cancelled caller stops the loop
within one token and its KV cache is dropped.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np

from services.common.errors import InvalidArgument
from services.model_host import observability
from services.model_host.batching import DynamicBatcher
from services.model_host.calibration import (
    ScoreCalibration,
    generation_confidence,
    load_score_calibration,
    option_distribution,
    score_confidence,
)
from services.model_host.faults import InjectedDelays
from services.model_host.registry import ModelRecord, ModelRegistry, State
from services.model_host.runtimes.classifier import ClassifierRuntime, request_text
from services.model_host.runtimes.decoder import DecoderRuntime
from services.model_host.runtimes.encoder import EncoderRuntime
from services.model_host.runtimes.sampling import Sampler
from services.model_host.runtimes.text import HeldToken, IncrementalDetokenizer, StopStringScanner

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Timings:
    queue_ms: float = 0.0
    load_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    first_token_ms: float = 0.0


@dataclass
class Confidence:
    token_logprobs: list[float] = field(default_factory=list)
    mean_logprob: float = 0.0
    min_logprob: float = 0.0
    mean_entropy: float = 0.0
    labels: list[tuple[str, float, float]] = field(default_factory=list)  # (label, probability, logprob)
    calibrated: float = 0.0
    source: str = ""


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str
    logprob: float
    entropy: float


@dataclass
class GenerationSummary:
    model: str
    version: str
    finish_reason: str  # "stop", "length", "stop_string"
    text: str
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    confidence: Confidence


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


Messages = list[tuple[str, str]]  # (role, content)


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
                 faults: InjectedDelays | None = None):
        self.registry = registry
        self.executor = executor
        self.batching = batching
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

    @staticmethod
    def _prompt_ids(runtime: DecoderRuntime, messages: Messages, prompt: str) -> list[int]:
        if messages:
            try:
                prompt = runtime.render_chat(messages)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
        ids = runtime.encode(prompt)
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens; send some text")
        if len(ids) >= runtime.max_length:
            raise InvalidArgument(f"the prompt is {len(ids)} tokens; this model takes at most {runtime.max_length - 1}")
        return ids

    # ------------------------------------------------------------------ generate

    async def generate(self, model: str, messages: Messages, prompt: str, sampling: SamplingSettings) -> AsyncIterator[TokenEvent | GenerationSummary]:
        received = time.perf_counter()
        needs_load = self.registry.record(model).state != State.READY
        async with self.registry.use(model) as record:
            runtime: DecoderRuntime = record.runtime
            timings = self._entry_timings(received, needs_load)
            observability.waited(model, received, "generate")
            prompt_ids = self._prompt_ids(runtime, messages, prompt)
            max_tokens = min(sampling.max_tokens or DEFAULT_MAX_TOKENS, runtime.max_length - len(prompt_ids))
            sampler = Sampler(sampling.temperature, sampling.top_p, sampling.seed)
            detokenizer = IncrementalDetokenizer(runtime.tokenizer)
            scanner = StopStringScanner(tuple(sampling.stop))
            logprobs, entropies = [], []
            finish = "length"

            await self.faults.before_prefill(model)
            started = time.perf_counter()
            state, logits = await self._in_thread(runtime.prefill, prompt_ids)
            timings.prefill_ms = (time.perf_counter() - started) * 1000
            observability.prefilled(model, started, len(prompt_ids))
            decode_started = time.perf_counter()
            for index in range(max_tokens):
                pick = sampler.pick(logits)
                if pick.token_id in runtime.eos_token_ids:
                    finish = "stop"
                    break
                logprobs.append(pick.logprob)
                entropies.append(pick.entropy)
                held = HeldToken(index, pick.token_id, detokenizer.add(pick.token_id), pick.logprob, pick.entropy)
                for token in scanner.push(held):
                    if not timings.first_token_ms:
                        timings.first_token_ms = (time.perf_counter() - received) * 1000
                    yield TokenEvent(token.index, token.token_id, token.text, token.logprob, token.entropy)
                if scanner.stopped:
                    finish = "stop_string"
                    break
                if index + 1 < max_tokens:
                    await self.faults.before_decode_step(model)
                    logits = await self._in_thread(runtime.step, state, pick.token_id)
            for token in scanner.flush():
                yield TokenEvent(token.index, token.token_id, token.text, token.logprob, token.entropy)
            timings.decode_ms = (time.perf_counter() - decode_started) * 1000
            observability.decoded(model, decode_started, len(logprobs), timings.first_token_ms, finish)
            timings.total_ms = (time.perf_counter() - received) * 1000
            confidence = Confidence(token_logprobs=logprobs)
            if logprobs:
                confidence.mean_logprob = float(np.mean(logprobs))
                confidence.min_logprob = float(np.min(logprobs))
                confidence.mean_entropy = float(np.mean(entropies))
            confidence.calibrated, confidence.source = generation_confidence(confidence.mean_logprob)
            yield GenerationSummary(
                model=model, version=record.manifest.version, finish_reason=finish, text=scanner.text,
                prompt_tokens=len(prompt_ids), completion_tokens=len(logprobs), timings=timings, confidence=confidence,
            )

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
            prompt_ids = self._prompt_ids(runtime, messages, prompt)
            started = time.perf_counter()
            try:
                sums, _ = await self._in_thread(runtime.score_options, prompt_ids, options)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from None
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
        chosen = np.array([distribution[runtime.labels.index(option)] for option in options], dtype=np.float64)
        chosen = chosen / chosen.sum() if chosen.sum() > 0 else np.full(len(options), 1.0 / len(options))
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
