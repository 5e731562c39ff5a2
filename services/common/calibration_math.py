"""The maths of calibrated confidence, shared by everything that fits or checks it: the router's
route classifier, the fleet's topic specialists and the model host's option-score calibration.

Temperature scaling: probabilities = softmax(logits / T), with the one T > 0 that minimises the
negative log-likelihood of held-out answers. Logits come as one [n, k] array, or as a list of
rows of different lengths (multiple-choice questions with 2 to 5 options).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Logits = np.ndarray | Sequence[np.ndarray]  # [n, k], or n rows of their own lengths


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return np.exp(log_softmax(logits / temperature))


def mean_nll(logits: Logits, labels: Sequence[int] | np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / T)."""
    if isinstance(logits, np.ndarray) and logits.ndim == 2:
        labels = np.asarray(labels)
        return float(-log_softmax(logits / temperature)[np.arange(len(labels)), labels].mean())
    total = sum(-float(log_softmax(np.asarray(row, dtype=np.float64) / temperature)[label])
                for row, label in zip(logits, labels))
    return total / max(len(labels), 1)


def fit_temperature(logits: Logits, labels: Sequence[int] | np.ndarray, low: float = 0.05,
                    high: float = 20.0) -> float:
    """The T in [low, high] minimising the NLL of held-out `logits`: a coarse grid over log T finds
    the right valley, a golden-section search in it the minimum (to a relative 1e-6)."""

    def nll_at(log_t: float) -> float:
        return mean_nll(logits, labels, math.exp(log_t))

    grid = np.linspace(math.log(low), math.log(high), 41)
    best = int(np.argmin([nll_at(x) for x in grid]))
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll_at(c), nll_at(d)
    while b - a > 1e-6:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll_at(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll_at(d)
    return math.exp((a + b) / 2)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: the mean gap between confidence and accuracy, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > low) & (confidences <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidences[in_bin].mean() - correct[in_bin].mean())
    return float(ece)


def stratified_folds(labels: np.ndarray, folds: int, seed: int | None = None) -> np.ndarray:
    """Fold number of every example, each label dealt round-robin over the folds (so every fold
    sees every label): in the examples' order, or shuffled within each label with `seed`."""
    rng = np.random.default_rng(seed) if seed is not None else None
    assignment = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if rng is not None:
            members = members[rng.permutation(len(members))]
        assignment[members] = np.arange(len(members)) % folds
    return assignment
