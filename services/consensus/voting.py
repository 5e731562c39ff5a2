"""The vote maths of a consensus decision: pure functions on plain values, no gRPC.

With w_i the weight of model i (its calibrated confidence, clamped to [0, 1]; 0 for a
model that failed) and W = sum of w_i over the models that answered:

* label decisions: P(o) = sum_i w_i * p_i(o) / W (equal weights when W = 0); the verdict
  is argmax_o P(o), ties going to the earlier option; consistency = P(verdict). p_i is
  model i's calibrated distribution (`calibrated_distribution`): its option
  log-likelihoods tempered so that its top option's probability is its calibrated
  confidence. The host's raw distribution (T = 1) of a small decoder is far sharper than
  its accuracy (SmolLM2 puts ~0.9 on "compliant" for most compliance questions, right or
  wrong), and a vote of raw distributions would call that agreement "consistent".
* free text: s_ij = max(0, cos(e_i, e_j)); the verdict is the confidence-weighted medoid
  m = argmin_i sum_j w_j * (1 - s_ij), ties going to the earlier model (primary first);
  consistency = sum_j w_j * s_mj / W.

A decision escalates when no model answered or when consistency < threshold. The same
formulas are written in protos/mirador/v1/consensus.proto (ConsensusVerdict).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

LABEL_METHOD = "confidence-weighted label vote"
MEDOID_METHOD = "confidence-weighted embedding medoid"
NO_ANSWER_METHOD = "no model answered"


@dataclass(frozen=True)
class Ballot:
    """One model's answer, as the vote sees it."""

    model: str
    primary: bool = False
    answer: str = ""
    confidence: float = 0.0  # calibrated confidence in [0, 1]
    distribution: Mapping[str, float] | None = None  # label decisions: option -> probability
    error: str = ""  # non-empty: the model failed; it carries no weight

    @property
    def answered(self) -> bool:
        return not self.error

    @property
    def weight(self) -> float:
        return weight_of(self)


@dataclass(frozen=True)
class Outcome:
    """The verdict of one vote, before escalation is decided."""

    answer: str
    consistency: float
    method: str
    weights: tuple[float, ...]  # per ballot, in ballot order (0 for failed ones)
    agreement: tuple[float | None, ...]  # per ballot: agreement with the verdict; None if it failed
    combined: tuple[tuple[str, float], ...] = ()  # label decisions: (option, P(option)) in option order
    primary_answer: str | None = None  # None when the primary failed (or there is none)
    answered: int = 0
    failures: tuple[tuple[str, str], ...] = field(default=())  # (model, error) of the failed ones

    @property
    def primary_overturned(self) -> bool:
        return self.primary_answer is not None and self.answered > 0 and self.answer != self.primary_answer

    def escalates(self, threshold: float) -> bool:
        return self.answered == 0 or self.consistency < threshold


def calibrated_distribution(logprobs: Sequence[float], confidence: float,
                            options: Sequence[str] | None = None) -> list[float]:
    """softmax(logprobs / T), with the T > 0 at which the top option's probability equals
    `confidence` (the model host's calibrated confidence is exactly that for a temperature-
    calibrated Score, and T = 1 for an uncalibrated one). A confidence at or below 1/n gives
    the uniform distribution; at or above what T = 0.01 reaches, T = 0.01. Non-finite
    inputs give softmax(logprobs) unchanged (or uniform if that is not finite either)."""
    z = [float(x) for x in logprobs]
    n = len(z)
    if n == 0:
        return []

    def softmax(temperature: float) -> list[float]:
        top = max(z)
        e = [math.exp((x - top) / temperature) for x in z]
        total = sum(e)
        return [x / total for x in e]

    if not all(math.isfinite(x) for x in z):
        return [1.0 / n] * n
    if not math.isfinite(confidence):
        return softmax(1.0)
    lo, hi = math.log(0.01), math.log(1e4)  # log T; max softmax falls as T grows
    if confidence >= max(softmax(math.exp(lo))):
        return softmax(math.exp(lo))
    if confidence <= 1.0 / n or confidence <= max(softmax(math.exp(hi))):
        return [1.0 / n] * n
    for _ in range(60):
        mid = (lo + hi) / 2
        if max(softmax(math.exp(mid))) > confidence:
            lo = mid
        else:
            hi = mid
    return softmax(math.exp((lo + hi) / 2))


def weight_of(ballot: Ballot) -> float:
    """w_i: the calibrated confidence clamped to [0, 1]; 0 for a failed model or a NaN."""
    if not ballot.answered or not math.isfinite(ballot.confidence):
        return 0.0
    return min(1.0, max(0.0, float(ballot.confidence)))


def describe_method(method: str, ballots: Sequence[Ballot]) -> str:
    """`method`, followed by which models failed and why, when any did."""
    failed = [b for b in ballots if not b.answered]
    if not failed:
        return method
    reasons = "; ".join(f"{b.model}: {b.error}" for b in failed)
    noun = "model" if len(ballots) == 1 else "models"
    return f"{method} ({len(failed)} of {len(ballots)} {noun} failed: {reasons})"


def _primary_answer(ballots: Sequence[Ballot]) -> str | None:
    for ballot in ballots:
        if ballot.primary:
            return ballot.answer if ballot.answered else None
    return None


def _normalised(ballots: Sequence[Ballot]) -> list[float]:
    """w_i / W over the answering ballots; equal shares when W = 0."""
    raw = [weight_of(b) for b in ballots]
    answering = [i for i, b in enumerate(ballots) if b.answered]
    total = sum(raw)
    if total <= 0:
        return [1.0 / len(answering) if i in answering else 0.0 for i in range(len(ballots))]
    return [w / total for w in raw]


def no_answer(ballots: Sequence[Ballot], options: Sequence[str] = ()) -> Outcome:
    """Every model failed: nothing to vote on, a human decides."""
    return Outcome(
        answer="", consistency=0.0, method=describe_method(NO_ANSWER_METHOD, ballots),
        weights=tuple(0.0 for _ in ballots), agreement=tuple(None for _ in ballots),
        combined=tuple((o, 0.0) for o in options), primary_answer=None, answered=0,
        failures=tuple((b.model, b.error) for b in ballots if not b.answered),
    )


def top_label(distribution: Mapping[str, float], options: Sequence[str]) -> str:
    """The option with the highest probability; ties go to the earlier option."""
    best, best_p = options[0], -math.inf
    for option in options:
        p = float(distribution.get(option, 0.0))
        if p > best_p:
            best, best_p = option, p
    return best


def label_vote(ballots: Sequence[Ballot], options: Sequence[str]) -> Outcome:
    """Combines label distributions weighted by calibrated confidence."""
    if not options:
        raise ValueError("a label vote needs options")
    if not any(b.answered for b in ballots):
        return no_answer(ballots, options)
    shares = _normalised(ballots)
    combined = [0.0] * len(options)
    for ballot, share in zip(ballots, shares):
        if not ballot.answered or share == 0:
            continue
        distribution = ballot.distribution or {}
        for k, option in enumerate(options):
            combined[k] += share * float(distribution.get(option, 0.0))
    verdict_index = max(range(len(options)), key=lambda k: (combined[k], -k))
    verdict = options[verdict_index]
    agreement = tuple(
        (1.0 if top_label(b.distribution or {}, options) == verdict else 0.0) if b.answered else None
        for b in ballots
    )
    return Outcome(
        answer=verdict,
        consistency=_unit(combined[verdict_index]),
        method=describe_method(LABEL_METHOD, ballots),
        weights=tuple(weight_of(b) for b in ballots),
        agreement=agreement,
        combined=tuple(zip(options, (_unit(p) for p in combined))),
        primary_answer=_primary_answer(ballots),
        answered=sum(b.answered for b in ballots),
        failures=tuple((b.model, b.error) for b in ballots if not b.answered),
    )


def cosine(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """Cosine similarity; 0 when either vector is missing or zero."""
    if a is None or b is None or len(a) != len(b):
        return 0.0
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm > 0 else 0.0


def similarity(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """s = max(0, cos): agreement between two answers, in [0, 1]."""
    return _unit(cosine(a, b))


def medoid_vote(ballots: Sequence[Ballot], embeddings: Sequence[Sequence[float] | None],
                embedding_model: str = "") -> Outcome:
    """Picks the confidence-weighted medoid of the answers. `embeddings[i]` is ballot i's
    vector (None for a failed ballot or an empty answer)."""
    if len(embeddings) != len(ballots):
        raise ValueError("one embedding (or None) per ballot")
    if not any(b.answered for b in ballots):
        return no_answer(ballots)
    shares = _normalised(ballots)
    answering = [i for i, b in enumerate(ballots) if b.answered]

    def s(i: int, j: int) -> float:
        if i == j:
            return 1.0
        if ballots[i].answer == ballots[j].answer and ballots[i].answer.strip():
            return 1.0
        return similarity(embeddings[i], embeddings[j])

    costs = {i: sum(shares[j] * (1.0 - s(i, j)) for j in answering) for i in answering}
    medoid = min(answering, key=lambda i: (round(costs[i], 12), i))
    consistency = sum(shares[j] * s(medoid, j) for j in answering)
    method = MEDOID_METHOD + (f" ({embedding_model})" if embedding_model else "")
    return Outcome(
        answer=ballots[medoid].answer,
        consistency=_unit(consistency),
        method=describe_method(method, ballots),
        weights=tuple(weight_of(b) for b in ballots),
        agreement=tuple(s(medoid, i) if b.answered else None for i, b in enumerate(ballots)),
        primary_answer=_primary_answer(ballots),
        answered=len(answering),
        failures=tuple((b.model, b.error) for b in ballots if not b.answered),
    )


def unembedded_vote(ballots: Sequence[Ballot], reason: str) -> Outcome:
    """Free text whose answers could not be compared (the embedding model failed): the
    most confident answer is offered to the reviewer, with consistency 0 so it escalates."""
    answering = [i for i, b in enumerate(ballots) if b.answered]
    if not answering:
        return no_answer(ballots)
    best = max(answering, key=lambda i: (weight_of(ballots[i]), -i))
    return Outcome(
        answer=ballots[best].answer,
        consistency=0.0,
        method=describe_method(f"answers not compared: {reason}; the most confident answer is shown", ballots),
        weights=tuple(weight_of(b) for b in ballots),
        agreement=tuple(None for _ in ballots),
        primary_answer=_primary_answer(ballots),
        answered=len(answering),
        failures=tuple((b.model, b.error) for b in ballots if not b.answered),
    )


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))
