"""The shared maths of calibrated confidence (services/common/calibration_math.py)."""

import numpy as np
import pytest

from services.common.calibration_math import (expected_calibration_error, fit_temperature, mean_nll, softmax,
                                              stratified_folds)


def _drawn_at(temperature: float, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Labels drawn from softmax(logits / temperature)."""
    cumulative = softmax(logits, temperature).cumsum(axis=1)
    return np.minimum((cumulative < rng.random((len(logits), 1))).sum(axis=1), logits.shape[1] - 1)


@pytest.mark.parametrize("true_temperature", [0.5, 2.0, 60.0])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_at(true_temperature):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4000, 5)) * 4 * max(1.0, true_temperature / 4)
    drawn = _drawn_at(true_temperature, logits, rng)
    temperature = fit_temperature(logits, drawn, high=1000.0)
    assert temperature == pytest.approx(true_temperature, rel=0.1)
    assert mean_nll(logits, drawn, temperature) < mean_nll(logits, drawn)


def test_rows_of_different_lengths_fit_like_one_array():
    """Multiple-choice questions have 2 to 5 options: rows padded with -inf are the same question."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((600, 4)) * 3
    drawn = _drawn_at(1.5, logits, rng)
    widths = np.maximum(drawn + 1, rng.integers(2, 5, size=len(drawn)))  # the drawn label always in its row
    rows = [row[:w] for row, w in zip(logits, widths)]
    padded = np.array([np.pad(row, (0, 4 - len(row)), constant_values=-np.inf) for row in rows])
    assert mean_nll(rows, drawn, 1.3) == pytest.approx(mean_nll(padded, drawn, 1.3))
    assert fit_temperature(rows, drawn) == pytest.approx(fit_temperature(padded, drawn), rel=1e-4)


def test_the_fit_stays_inside_its_bounds():
    logits = np.array([[5.0, 0.0], [5.0, 0.0]])
    sharpest = fit_temperature(logits, np.array([0, 0]), low=0.05, high=20.0)  # always right: as sharp as allowed
    assert 0.05 <= sharpest < 0.1 and mean_nll(logits, np.array([0, 0]), sharpest) < 1e-12
    assert fit_temperature(logits, np.array([0, 1]), low=0.05, high=20.0) == pytest.approx(20.0, rel=1e-3)


def test_calibration_error_is_the_weighted_gap_between_confidence_and_accuracy():
    confidences = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0], dtype=float)
    # bin (0.9, 1]: 4 of 6 at 0.95 vs 0.75 right; bin (0.5, 0.6]: 2 of 6 at 0.55 vs 0.5 right
    assert expected_calibration_error(confidences, correct) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0


@pytest.mark.parametrize("seed", [None, 0])
def test_folds_give_every_fold_every_label(seed):
    labels = np.repeat(np.arange(3), 40)
    folds = stratified_folds(labels, 5, seed=seed)
    assert all(np.bincount(labels[folds == f], minlength=3).tolist() == [8, 8, 8] for f in range(5))
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=seed))  # deterministic


def test_unseeded_folds_deal_in_the_examples_order():
    assert stratified_folds(np.array([0, 1, 0, 1, 0]), 2).tolist() == [0, 0, 1, 1, 0]
