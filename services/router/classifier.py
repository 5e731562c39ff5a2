"""Recognises what kind of request arrived: a multinomial logistic head on
sentence embeddings of each route's example requests.

Why this shape: a linear head on MiniLM embeddings beat nearest-neighbour and
centroid rules on the labelled routing set (bench/routing.py measures all
three). Scores are calibrated with one temperature fitted on out-of-fold
predictions, so `min_confidence` means what it says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return weights / weights.sum(axis=-1, keepdims=True)


@dataclass
class LogisticHead:
    """Softmax regression with L2 regularisation, fitted by full-batch gradient descent."""

    weights: np.ndarray  # [dim, classes]
    bias: np.ndarray  # [classes]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3, steps: int = 400, lr: float = 2.0) -> "LogisticHead":
        # Zero start + full batch: deterministic, no seed needed.
        head = cls(np.zeros((x.shape[1], classes)), np.zeros(classes))
        onehot = np.eye(classes)[y]
        for _ in range(steps):
            probs = softmax(head.logits(x))
            grad = (probs - onehot) / len(x)
            head.weights -= lr * (x.T @ grad + l2 * head.weights)
            head.bias -= lr * grad.sum(axis=0)
        return head

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights + self.bias


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood (golden-section search on log T)."""

    def nll(log_t: float) -> float:
        probs = softmax(logits / np.exp(log_t))
        return float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean())

    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        if nll(a) < nll(b):
            high = b
        else:
            low = a
    return float(np.exp((low + high) / 2))


def stratified_folds(y: np.ndarray, folds: int) -> np.ndarray:
    """Fold index per example: each class dealt round-robin, so every fold sees every class."""
    assignment = np.zeros(len(y), dtype=int)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        assignment[members] = np.arange(len(members)) % folds
    return assignment


@dataclass
class RouteClassifier:
    routes: list[str]
    head: LogisticHead
    temperature: float
    cv_accuracy: float  # out-of-fold accuracy on the examples

    @classmethod
    def train(cls, embeddings: np.ndarray, labels: list[str], folds: int = 5) -> "RouteClassifier":
        routes = sorted(set(labels))
        if len(routes) < 2:
            raise ValueError("the router needs examples for at least two routes to classify requests")
        y = np.array([routes.index(label) for label in labels])
        fold_of = stratified_folds(y, folds)
        out_of_fold = np.zeros((len(y), len(routes)))
        for fold in range(folds):
            held = fold_of == fold
            if held.all() or not held.any():
                continue
            head = LogisticHead.fit(embeddings[~held], y[~held], len(routes))
            out_of_fold[held] = head.logits(embeddings[held])
        temperature = fit_temperature(out_of_fold, y)
        accuracy = float((out_of_fold.argmax(axis=1) == y).mean())
        return cls(routes, LogisticHead.fit(embeddings, y, len(routes)), temperature, accuracy)

    def scores(self, embedding: np.ndarray) -> dict[str, float]:
        probs = softmax(self.head.logits(embedding[None, :]) / self.temperature)[0]
        return dict(zip(self.routes, probs.tolist()))

    @property
    def calibration_source(self) -> str:
        return f"temperature-scaled logistic head on route examples (T={self.temperature:.2f}, CV accuracy {self.cv_accuracy:.1%})"
