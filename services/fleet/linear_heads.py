"""Multinomial logistic regression for the specialists' heads: a deterministic L-BFGS (from zero,
so the result depends only on the data) and row-sparse products for bags of words."""

from __future__ import annotations

from typing import Callable

import numpy as np

from services.common.calibration_math import log_softmax


def _lbfgs(objective: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray,
           max_iter: int = 500, memory: int = 10, tolerance: float = 1e-6) -> np.ndarray:
    """Limited-memory BFGS with a backtracking (Armijo) line search. Deterministic."""
    x = x0.copy()
    value, grad = objective(x)
    steps: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_iter):
        if np.abs(grad).max() < tolerance:
            break
        q = grad.copy()
        alphas = []
        for s, y, rho in reversed(steps):
            alpha = rho * (s @ q)
            q -= alpha * y
            alphas.append(alpha)
        if steps:
            s, y, _ = steps[-1]
            q *= (s @ y) / (y @ y)
        else:
            q /= max(1.0, float(np.linalg.norm(grad)))
        for (s, y, rho), alpha in zip(steps, reversed(alphas)):
            q += s * (alpha - rho * (y @ q))
        direction = -q
        slope = grad @ direction
        if slope >= 0:
            direction, slope = -grad, -(grad @ grad)
        step = 1.0
        while True:
            candidate = x + step * direction
            new_value, new_grad = objective(candidate)
            if new_value <= value + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        s, y = candidate - x, new_grad - grad
        if s @ y > 1e-12:
            steps.append((s, y, 1.0 / (s @ y)))
            steps = steps[-memory:]
        if abs(value - new_value) <= 1e-10 * max(1.0, abs(value)):
            x, value, grad = candidate, new_value, new_grad
            break
        x, value, grad = candidate, new_value, new_grad
    return x


class SparseRows:
    """A row-sparse matrix (CSR) with the two products logistic regression needs."""

    def __init__(self, dense: np.ndarray):
        rows, self.indices = np.nonzero(dense)  # row-major order
        self.data = dense[rows, self.indices].astype(np.float64)
        self.rows = rows
        self.ends = np.searchsorted(rows, np.arange(dense.shape[0]), side="right")
        self.shape = dense.shape

    def __matmul__(self, weights: np.ndarray) -> np.ndarray:  # [n, d] @ [d, k]
        running = np.cumsum(self.data[:, None] * weights[self.indices], axis=0)
        running = np.vstack([np.zeros((1, weights.shape[1])), running])
        return running[self.ends] - running[np.concatenate([[0], self.ends[:-1]])]

    def rmatmul(self, delta: np.ndarray) -> np.ndarray:  # [n, d].T @ [n, k]
        contributions = self.data[:, None] * delta[self.rows]
        return np.stack([np.bincount(self.indices, contributions[:, k], minlength=self.shape[1])
                         for k in range(delta.shape[1])], axis=1)


def fit_logistic(features: np.ndarray, labels: np.ndarray, num_labels: int, l2: float,
                 max_iter: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression: mean cross-entropy + l2/2 |W|^2 (bias not penalised).
    Starts from zero, so the result depends only on the data. Mostly-zero features
    (bags of words) are multiplied as sparse rows."""
    n, d = features.shape
    onehot = np.zeros((n, num_labels))
    onehot[np.arange(n), labels] = 1.0
    sparse = np.count_nonzero(features) < 0.1 * features.size
    x = SparseRows(features) if sparse else features.astype(np.float64)

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        weights, bias = params[: d * num_labels].reshape(d, num_labels), params[d * num_labels:]
        logits = x @ weights + bias
        logp = log_softmax(logits)
        loss = -(onehot * logp).sum() / n + 0.5 * l2 * (weights ** 2).sum()
        delta = (np.exp(logp) - onehot) / n
        grad_w = (x.rmatmul(delta) if sparse else x.T @ delta) + l2 * weights
        return float(loss), np.concatenate([grad_w.ravel(), delta.sum(axis=0)])

    params = _lbfgs(objective, np.zeros(d * num_labels + num_labels), max_iter=max_iter)
    return params[: d * num_labels].reshape(d, num_labels), params[d * num_labels:]
