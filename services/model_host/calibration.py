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
from typing import Sequence

import numpy as np

from services.defaults import CALIBRATION_DIR


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


NO_TOKENS_SOURCE = ("no tokens: the model ended its turn before its first token; "
                     "an empty answer has nothing to be sure of")
STOPPED_EMPTY_SOURCE = "empty answer: a stop string came before any text; nothing of it is left to be sure of"
GENERATION_SOURCE = "geometric-mean token probability, not calibrated"


def option_distribution(logprob_sums: list[float], temperature: float = 1.0) -> np.ndarray:
    """softmax(sums / T). Sums that say nothing (every one -inf, or a NaN) give the uniform
    distribution, the least sure one, rather than the NaNs of -inf - -inf."""
    scaled = np.asarray(logprob_sums, dtype=np.float64) / temperature
    if np.isnan(scaled).any() or not np.isfinite(scaled.max()):
        return np.full(len(scaled), 1.0 / len(scaled))
    scaled -= scaled.max()
    weights = np.exp(scaled)
    return weights / weights.sum()


def score_confidence(model: str, logprob_sums: list[float], calibration: ScoreCalibration | None) -> tuple[float, str]:
    if calibration is None:
        return float(option_distribution(logprob_sums).max()), "option probability, not calibrated (no calibration fitted for this model)"
    return float(option_distribution(logprob_sums, calibration.temperature).max()), calibration.source


def options_share(probabilities: Sequence[float]) -> np.ndarray:
    """A classifier's probabilities of the options asked (some of its labels), renormalised
    over them; uniform when it gives them no mass (or a NaN): no preference, not a division by 0."""
    chosen = np.asarray(probabilities, dtype=np.float64)
    total = chosen.sum()
    if not np.isfinite(total) or total <= 0 or (chosen < 0).any():
        return np.full(len(chosen), 1.0 / len(chosen))
    return chosen / total


def generation_confidence(token_logprobs: Sequence[float], text: str) -> tuple[float, str]:
    """exp(mean token log-probability): the geometric-mean probability of the answer's tokens.
    An answer without tokens, or whose text a stop string cut to nothing, gets 0: the mean of
    no log-probabilities is taken as 0, and exp(0) = 1 would claim full certainty in nothing."""
    if len(token_logprobs) == 0:
        return 0.0, NO_TOKENS_SOURCE
    if not text:
        return 0.0, STOPPED_EMPTY_SOURCE
    return math.exp(float(np.mean(token_logprobs))), GENERATION_SOURCE
