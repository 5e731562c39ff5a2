"""One generation inside the engine: its prompt, its sampling state and everything it has said.

Lives on the engine's thread: `start` renders and tokenizes the prompt, `accept` turns the
model's logits for this sequence into its next token (sampling with its own settings and
seed, detokenizing, holding tokens back for stop strings) and says whether it is done;
`summary` is the last thing the client gets. Events go out through `emit`, which the
engine makes thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.common.errors import InvalidArgument
from services.model_host.answers import (
    DEFAULT_MAX_TOKENS,
    Confidence,
    GenerationSummary,
    SamplingSettings,
    Timings,
    TokenAlternative,
    TokenEvent,
)
from services.model_host.calibration import generation_confidence
from services.model_host.runtimes.decoder import DecoderRuntime
from services.model_host.runtimes.sampling import Sampler
from services.model_host.runtimes.text import IncrementalDetokenizer, StopStringScanner

Messages = list[tuple[str, str]]  # (role, content)


@dataclass(eq=False)
class GenerationRequest:
    model: str
    version: str
    messages: Messages
    prompt: str
    sampling: SamplingSettings
    received: float  # time.perf_counter() when the call arrived
    timings: Timings  # queue/load time already spent before the engine


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    emit: Callable[[object], None]  # TokenEvent, GenerationSummary or an exception; thread-safe
    prompt_ids: list[int] = field(default_factory=list)
    shared_prefix: int = 0  # leading prompt tokens other prompts may share (before the last message)
    slot: int | None = None
    prefilled: int = 0
    length: int = 0  # tokens in the slot's cache
    last_token: int = -1  # the token to feed at the next decode step
    max_tokens: int = 0
    context_bound: bool = False  # the model's context, not max_tokens, limits the answer
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    admitted: float = 0.0
    prefill_started: float = 0.0
    decode_started: float = 0.0

    def start(self, runtime: DecoderRuntime, max_context: int) -> None:
        """Renders and tokenizes the prompt (raises InvalidArgument with what to change)."""
        request = self.request
        try:
            ids, self.shared_prefix = runtime.prompt_ids_and_shared(request.messages, request.prompt)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if not ids:
            raise InvalidArgument("the prompt encodes to no tokens; send some text")
        if len(ids) >= max_context:
            raise InvalidArgument(f"the prompt is {len(ids)} tokens; this model serves at most {max_context - 1} "
                                  f"prompt tokens (its context is {max_context} tokens, answer included)")
        self.prompt_ids = ids
        self.max_tokens = min(request.sampling.max_tokens or DEFAULT_MAX_TOKENS, max_context - len(ids))
        self.context_bound = max_context - len(ids) < (request.sampling.max_tokens or DEFAULT_MAX_TOKENS)
        sampling = request.sampling
        self.sampler = Sampler(sampling.temperature, sampling.top_p, sampling.seed)
        self.tokenizer = runtime.tokenizer
        self.detokenizer = IncrementalDetokenizer(runtime.tokenizer)
        self.scanner = StopStringScanner(tuple(sampling.stop))
        self.eos_token_ids = runtime.eos_token_ids
        self.admitted = time.perf_counter()
        # waiting for the model (a load counts as load_ms) and then for a slot
        request.timings.queue_ms = (self.admitted - request.received) * 1000 - request.timings.load_ms

    def accept(self, logits: np.ndarray) -> bool:
        """Picks the next token from this sequence's logits and streams what can be released.
        True when the sequence is finished (its summary is then due)."""
        timings = self.request.timings
        if not self.decode_started:
            self.decode_started = time.perf_counter()
            timings.prefill_ms = (self.decode_started - self.prefill_started) * 1000
        pick = self.sampler.pick(logits, self.request.sampling.top_logprobs)
        if pick.token_id in self.eos_token_ids:
            self.finish_reason = "stop"
            return True
        self.logprobs.append(pick.logprob)
        self.entropies.append(pick.entropy)
        index = len(self.logprobs) - 1
        token = TokenEvent(index, pick.token_id, self.detokenizer.add(pick.token_id), pick.logprob, pick.entropy,
                           tuple(TokenAlternative(i, self.tokenizer.decode([i], skip_special_tokens=False), lp)
                                 for i, lp in pick.top))
        for released in self.scanner.push(token):  # held back while it could begin a stop string
            if not timings.first_token_ms:
                timings.first_token_ms = (time.perf_counter() - self.request.received) * 1000
            self.emit(released)
        if self.scanner.stopped:
            self.finish_reason = "stop_string"
            return True
        if len(self.logprobs) >= self.max_tokens:
            self.finish_reason = "context_length" if self.context_bound else "length"
            return True
        self.last_token = pick.token_id
        return False

    def summary(self) -> GenerationSummary:
        for token in self.scanner.flush():
            self.emit(token)
        now = time.perf_counter()
        request, timings = self.request, self.request.timings
        timings.decode_ms = (now - self.decode_started) * 1000 if self.decode_started else 0.0
        timings.total_ms = (now - request.received) * 1000
        confidence = Confidence(token_logprobs=list(self.logprobs))
        if self.logprobs:
            confidence.mean_logprob = float(np.mean(self.logprobs))
            confidence.min_logprob = float(np.min(self.logprobs))
            confidence.mean_entropy = float(np.mean(self.entropies))
        confidence.calibrated, confidence.source = generation_confidence(self.logprobs, self.scanner.text)
        return GenerationSummary(
            model=request.model, version=request.version, finish_reason=self.finish_reason, text=self.scanner.text,
            prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.logprobs), timings=timings,
            confidence=confidence,
        )
