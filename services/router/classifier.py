"""Recognises what kind of request arrived: a multinomial logistic head on each
route example's features. Two shapes, by what the config names:

* `embedding_model` alone: its sentence embedding joined with lexical features
  (TF-IDF of character 2-5-grams within words, words and word pairs, over the
  examples' own vocabulary);
* with `feature_models` too: every model's pooled vector side by side, each
  standardised (zero mean, unit variance per column over the examples, scaled by
  1/sqrt(its width) so no model outweighs another by its size), no lexical terms.

Why: bench/routing.py cross-validates the candidates on routing-dev.jsonl (5 folds
dealt 3 times). The embedding alone misses requests whose wording, not their gist,
says the route ("pull out the phone numbers" is extraction, "== and ===" is code);
lexical features alone miss paraphrases; the two together are right more often
(93.1% against 89.8% and 86.0%). What reads the wording best is an
instruction-tuned decoder: SmolLM2-Instruct's first layers over the request framed
as a user turn (smollm2-135m-features) beside MiniLM give 96-97%; lexical terms on
top of those cost about a point. Variants that did no better with MiniLM alone:
lexical features weighted 0.5x or 2x, weaker L2, extra terms for the request's first
words, a second embedding of its first clause, averaging two heads' probabilities.
Scores are calibrated with one temperature fitted on out-of-fold predictions, so
`min_confidence` means what it says.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.common.calibration_math import fit_temperature, softmax, stratified_folds


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


_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def lexical_terms(text: str) -> list[str]:
    """Character 2-5-grams of each lower-cased word (padded with spaces, so prefixes and
    suffixes count), the words themselves (punctuation included: `==`, `{`) and word pairs."""
    words = _WORD.findall(text.lower())
    terms = []
    for word in text.lower().split():
        padded = f" {word} "
        for n in range(2, 6):
            terms += [padded[i: i + n] for i in range(len(padded) - n + 1)]
    terms += ["w:" + w for w in words]
    terms += ["b:" + a + " " + b for a, b in zip(words, words[1:])]
    return terms


@dataclass
class LexicalFeatures:
    """Sub-linear TF-IDF over the terms seen in at least `min_df` training texts, L2-normalised."""

    vocabulary: dict[str, int]
    idf: np.ndarray

    @classmethod
    def fit(cls, texts: Sequence[str], min_df: int = 2) -> "LexicalFeatures":
        df = Counter(term for text in texts for term in set(lexical_terms(text)))
        kept = sorted(term for term, count in df.items() if count >= min_df)
        idf = np.array([np.log((1 + len(texts)) / (1 + df[term])) + 1 for term in kept])
        return cls({term: i for i, term in enumerate(kept)}, idf)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        counts = np.zeros((len(texts), len(self.vocabulary)))
        for row, text in enumerate(texts):
            for term in lexical_terms(text):
                column = self.vocabulary.get(term)
                if column is not None:
                    counts[row, column] += 1
        x = np.log1p(counts) * self.idf
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def route_features(embeddings: np.ndarray, lexical: np.ndarray | None) -> np.ndarray:
    return embeddings if lexical is None else np.hstack([embeddings, lexical])


@dataclass
class BlockScaler:
    """Standardises side-by-side vectors of several models: per column to zero mean and unit
    variance over the examples, each model's block scaled by 1/sqrt(its width)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, widths: Sequence[int]) -> "BlockScaler":
        if sum(widths) != x.shape[1]:
            raise ValueError(f"the feature models' widths {list(widths)} do not add up to {x.shape[1]} columns")
        block = np.concatenate([np.full(w, np.sqrt(w)) for w in widths])
        return cls(x.mean(axis=0), (x.std(axis=0) + 1e-6) * block)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


@dataclass
class RouteClassifier:
    routes: list[str]
    head: LogisticHead
    temperature: float
    cv_accuracy: float  # out-of-fold accuracy on the examples
    lexical: LexicalFeatures | None = None  # None: the embedding alone (no texts given to train)
    scaler: BlockScaler | None = None  # several models' vectors side by side (`widths` given to train)
    widths: tuple[int, ...] = ()

    @classmethod
    def train(cls, embeddings: np.ndarray, labels: list[str], texts: Sequence[str] | None = None,
              folds: int = 5, widths: Sequence[int] = ()) -> "RouteClassifier":
        """With `texts` (the examples themselves), the head also reads their lexical features;
        the vocabulary is refitted inside every fold, so the out-of-fold scores are honest.
        `widths`: the vectors are one or more models' side by side, this wide each, to be
        standardised (the scaler uses no labels, so it is fitted once on all examples)."""
        routes = sorted(set(labels))
        if len(routes) < 2:
            raise ValueError("the router needs examples for at least two routes to classify requests")
        y = np.array([routes.index(label) for label in labels])
        scaler = BlockScaler.fit(embeddings, widths) if widths else None
        if scaler is not None:
            embeddings = scaler(embeddings)

        def fit(rows: np.ndarray) -> tuple[LexicalFeatures | None, LogisticHead]:
            lexical = LexicalFeatures.fit([texts[i] for i in rows]) if texts is not None else None
            x = route_features(embeddings[rows], lexical.transform([texts[i] for i in rows]) if lexical else None)
            return lexical, LogisticHead.fit(x, y[rows], len(routes))

        def logits(model: tuple[LexicalFeatures | None, LogisticHead], rows: np.ndarray) -> np.ndarray:
            lexical, head = model
            return head.logits(route_features(embeddings[rows],
                                              lexical.transform([texts[i] for i in rows]) if lexical else None))

        fold_of = stratified_folds(y, folds)
        out_of_fold = np.zeros((len(y), len(routes)))
        for fold in range(folds):
            held = fold_of == fold
            if held.all() or not held.any():
                continue
            out_of_fold[held] = logits(fit(np.flatnonzero(~held)), np.flatnonzero(held))
        temperature = fit_temperature(out_of_fold, y)
        accuracy = float((out_of_fold.argmax(axis=1) == y).mean())
        lexical, head = fit(np.arange(len(y)))
        return cls(routes, head, temperature, accuracy, lexical, scaler, tuple(widths))

    def scores(self, embedding: np.ndarray, text: str | None = None) -> dict[str, float]:
        if self.scaler is not None:
            embedding = self.scaler(embedding)
        lexical = self.lexical.transform([text]) if self.lexical is not None else None
        probs = softmax(self.head.logits(route_features(embedding[None, :], lexical)) / self.temperature)[0]
        return dict(zip(self.routes, probs.tolist()))

    @property
    def features(self) -> str:
        if self.scaler is not None:
            return f"pooled vectors of {len(self.widths)} model(s), standardised ({' + '.join(map(str, self.widths))} columns)"
        if self.lexical is None:
            return "sentence embedding"
        return f"sentence embedding + {len(self.lexical.vocabulary)} lexical terms"

    @property
    def calibration_source(self) -> str:
        return (f"temperature-scaled logistic head ({self.features}) on route examples "
                f"(T={self.temperature:.2f}, CV accuracy {self.cv_accuracy:.1%})")
