"""What the model host answers with, independent of any transport: the data plane and the
engine build these, the gRPC servicer converts them to messages."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingSettings:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives reported per token


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


@dataclass(frozen=True)
class TokenAlternative:
    token_id: int
    text: str
    logprob: float


@dataclass
class TokenEvent:
    index: int
    token_id: int
    text: str
    logprob: float
    entropy: float
    top_logprobs: tuple[TokenAlternative, ...] = ()


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
