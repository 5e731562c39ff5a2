"""Calibrated confidence: turns a model's raw probabilities into an estimate of
how often it is right, and names where that estimate comes from.

Score calibrations are fitted offline (`python -m services.model_host.calibrate`)
and shipped in config/calibration/<model>.json; a model without one reports its
raw probability and says it is not calibrated.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "config" / "calibration"


@dataclass(frozen=True)
class ScoreCalibration:
    temperature: float
    fit_on: str
    ece_before: float
    ece_after: float

    @property
    def source(self) -> str:
        return (f"temperature-scaled option probability (T={self.temperature:.2f}, fit on {self.fit_on}; "
                f"held-out ECE {self.ece_before:.3f} -> {self.ece_after:.3f})")


def load_score_calibration(model: str, directory: Path = CALIBRATION_DIR) -> ScoreCalibration | None:
    path = directory / f"{model}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())["score"]
    return ScoreCalibration(float(data["temperature"]), data["fit_on"], float(data["ece_before"]), float(data["ece_after"]))


def option_distribution(logprob_sums: list[float], temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logprob_sums, dtype=np.float64) / temperature
    scaled -= scaled.max()
    weights = np.exp(scaled)
    return weights / weights.sum()


def score_confidence(model: str, logprob_sums: list[float], calibration: ScoreCalibration | None) -> tuple[float, str]:
    if calibration is None:
        return float(option_distribution(logprob_sums).max()), "option probability, not calibrated (no calibration fitted for this model)"
    return float(option_distribution(logprob_sums, calibration.temperature).max()), calibration.source


def generation_confidence(mean_logprob: float) -> tuple[float, str]:
    return math.exp(mean_logprob), "geometric-mean token probability, not calibrated"


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """ECE with equal-width bins: the mean gap between confidence and accuracy, weighted by bin size."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > low) & (confidences <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(confidences[in_bin].mean() - correct[in_bin].mean())
    return float(ece)
