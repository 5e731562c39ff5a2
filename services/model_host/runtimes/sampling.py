"""Choosing the next token, and how sure the model was of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Pick:
    token_id: int
    logprob: float  # under the model's own (temperature 1) distribution
    entropy: float  # of that distribution, in nats
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the most likely tokens, most likely first


class Sampler:
    """Greedy when temperature is 0; otherwise temperature + nucleus (top-p) sampling."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = temperature
        self.top_p = top_p if 0.0 < top_p <= 1.0 else 1.0
        self.rng = np.random.default_rng(seed)

    def pick(self, logits: np.ndarray, top: int = 0) -> Pick:
        """The next token; with `top`, also the `top` most likely tokens and their logprobs."""
        # float32 and one exp pass: this runs once per generated token over the whole vocabulary.
        logits = np.asarray(logits, dtype=np.float32)
        shifted = logits - logits.max()
        weights = np.exp(shifted)
        total = weights.sum(dtype=np.float64)
        log_total = float(np.log(total))
        entropy = log_total - float(np.dot(weights, shifted) / total)
        token = int(np.argmax(shifted)) if self.temperature == 0.0 else self._sample(logits)
        return Pick(token, float(shifted[token]) - log_total, entropy, _most_likely(shifted, log_total, top))

    def _sample(self, logits: np.ndarray) -> int:
        # Shifted before scaling: every value is <= 0, so a tiny temperature gives -inf (probability 0),
        # never inf - inf = NaN (1e-40 used to fail the call, and three such calls opened the router's
        # circuit breaker on the model).
        with np.errstate(over="ignore"):  # overflow to -inf is the intended result
            scaled = (logits.astype(np.float64) - float(logits.max())) / self.temperature
        probs = np.exp(scaled - np.log(np.exp(scaled).sum()))
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, self.top_p)) + 1]
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        return int(self.rng.choice(len(probs), p=probs))


def _most_likely(shifted: np.ndarray, log_total: float, count: int) -> tuple[tuple[int, float], ...]:
    if count <= 0:
        return ()
    count = min(count, len(shifted))
    ids = np.argpartition(-shifted, count - 1)[:count]  # the `count` largest, unordered: O(vocabulary)
    ids = ids[np.argsort(-shifted[ids], kind="stable")]
    return tuple((int(i), float(shifted[i]) - log_total) for i in ids)
