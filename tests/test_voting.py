"""The consensus vote maths on hand-made inputs, with numbers worked out by hand."""

import math

import pytest

from services.consensus.voting import (
    Ballot,
    calibrated_distribution,
    cosine,
    label_vote,
    medoid_vote,
    no_answer,
    similarity,
    top_label,
    unembedded_vote,
    weight_of,
)

OPTIONS = ["yes", "no", "maybe"]


def ballot(model, dist, confidence, primary=False, error=""):
    distribution = dict(zip(OPTIONS, dist)) if dist else None
    answer = top_label(distribution, OPTIONS) if distribution and not error else ""
    return Ballot(model, primary=primary, answer=answer, confidence=confidence, distribution=distribution, error=error)


def three_ballots(c_error=""):
    return [
        ballot("a", (0.6, 0.3, 0.1), 0.6, primary=True),
        ballot("b", (0.2, 0.7, 0.1), 0.7),
        ballot("c", (0.1, 0.8, 0.1), 0.8, error=c_error),
    ]


# --------------------------------------------------------------------------- calibrated distributions


def softmax(z, t=1.0):
    e = [math.exp((x - max(z)) / t) for x in z]
    return [x / sum(e) for x in e]


def test_calibrated_distribution_recovers_the_hosts_temperature():
    # The host reports calibrated confidence = max softmax(z / T); the vote's distribution is softmax(z / T).
    z = [-3.86, -6.62, -8.24]  # SmolLM2 on a compliance question: "compliant" 0.93 at T = 1
    for t in (0.5, 1.0, 3.2204, 20.0):
        expected = softmax(z, t)
        assert calibrated_distribution(z, max(expected)) == pytest.approx(expected, abs=1e-9)
    assert max(softmax(z)) > 0.9 and max(calibrated_distribution(z, max(softmax(z, 3.2204)))) < 0.6


def test_calibrated_distribution_edges():
    assert calibrated_distribution([-1.0, -2.0, -3.0], 1 / 3) == pytest.approx([1 / 3] * 3)  # no better than chance
    assert calibrated_distribution([-1.0, -2.0, -3.0], 0.1) == pytest.approx([1 / 3] * 3)
    assert calibrated_distribution([-1.0, -1.0], 0.9) == pytest.approx([0.5, 0.5])  # a tie stays a tie
    assert calibrated_distribution([-1.0, -50.0], 1.0) == pytest.approx([1.0, 0.0])
    assert calibrated_distribution([-1.0, -2.0], float("nan")) == pytest.approx(softmax([-1.0, -2.0]))
    assert calibrated_distribution([-1.0, float("-inf")], 0.7) == pytest.approx([0.5, 0.5])
    assert calibrated_distribution([], 0.5) == []


def test_agreeing_overconfident_raw_distributions_do_not_pass_a_threshold_once_calibrated():
    z = [-3.64, -7.77, -8.84]  # raw P(top) 0.98, calibrated (T = 3.22) 0.68
    calibrated_confidence = max(softmax(z, 3.2204))
    ballots = [Ballot(m, primary=m == "a", answer="yes", confidence=calibrated_confidence,
                      distribution=dict(zip(OPTIONS, calibrated_distribution(z, calibrated_confidence))))
               for m in ("a", "b", "c")]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "yes" and outcome.consistency == pytest.approx(calibrated_confidence)
    assert outcome.escalates(0.8)


# --------------------------------------------------------------------------- label vote


def test_label_vote_weights_distributions_by_calibrated_confidence():
    outcome = label_vote(three_ballots(), OPTIONS)
    # W = 0.6 + 0.7 + 0.8 = 2.1
    # P(yes)   = (0.6*0.6 + 0.7*0.2 + 0.8*0.1) / 2.1 = 0.58 / 2.1
    # P(no)    = (0.6*0.3 + 0.7*0.7 + 0.8*0.8) / 2.1 = 1.31 / 2.1
    # P(maybe) = (0.6*0.1 + 0.7*0.1 + 0.8*0.1) / 2.1 = 0.21 / 2.1
    combined = dict(outcome.combined)
    assert [label for label, _ in outcome.combined] == OPTIONS
    assert combined["yes"] == pytest.approx(0.58 / 2.1)
    assert combined["no"] == pytest.approx(1.31 / 2.1)
    assert combined["maybe"] == pytest.approx(0.1)
    assert sum(combined.values()) == pytest.approx(1.0)
    assert outcome.answer == "no"
    assert outcome.consistency == pytest.approx(1.31 / 2.1)  # the combined probability of the verdict
    assert outcome.weights == (0.6, 0.7, 0.8)
    assert outcome.agreement == (0.0, 1.0, 1.0)
    assert outcome.method == "confidence-weighted label vote"
    assert outcome.primary_answer == "yes" and outcome.primary_overturned
    assert outcome.answered == 3


def test_confidence_decides_between_two_camps():
    # Two models for "yes" with low confidence lose to one sure model for "no":
    # P(yes) = (0.2*0.9 + 0.2*0.9 + 0.9*0.05) / 1.3 = 0.405 / 1.3 < P(no) = (0.02 + 0.02 + 0.855) / 1.3
    ballots = [ballot("a", (0.9, 0.1, 0.0), 0.2, primary=True), ballot("b", (0.9, 0.1, 0.0), 0.2),
               ballot("c", (0.05, 0.95, 0.0), 0.9)]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "no"
    assert outcome.consistency == pytest.approx(0.895 / 1.3)
    assert outcome.primary_overturned


def test_unanimous_sure_models_are_fully_consistent_and_do_not_overturn():
    ballots = [ballot(m, (1.0, 0.0, 0.0), 1.0, primary=m == "a") for m in "abc"]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "yes" and outcome.consistency == 1.0
    assert not outcome.primary_overturned
    assert not outcome.escalates(1.0)  # consistency 1 is not below a threshold of 1


def test_agreeing_but_unsure_models_are_not_called_consistent():
    ballots = [ballot(m, (0.4, 0.35, 0.25), 0.4, primary=m == "a") for m in "abc"]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "yes" and outcome.agreement == (1.0, 1.0, 1.0)
    assert outcome.consistency == pytest.approx(0.4)
    assert outcome.escalates(0.8) and not outcome.escalates(0.3)


def test_ties_go_to_the_earlier_option():
    ballots = [ballot("a", (0.5, 0.5, 0.0), 0.5, primary=True), ballot("b", (0.5, 0.5, 0.0), 0.5)]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "yes" and outcome.consistency == pytest.approx(0.5)


def test_a_failed_model_has_no_weight_and_the_others_decide():
    outcome = label_vote(three_ballots(c_error="timed out after 900 ms"), OPTIONS)
    # W = 0.6 + 0.7 = 1.3: P(yes) = (0.36 + 0.14) / 1.3, P(no) = (0.18 + 0.49) / 1.3
    assert dict(outcome.combined)["yes"] == pytest.approx(0.5 / 1.3)
    assert outcome.answer == "no" and outcome.consistency == pytest.approx(0.67 / 1.3)
    assert outcome.weights == (0.6, 0.7, 0.0)
    assert outcome.agreement == (0.0, 1.0, None)
    assert outcome.method == "confidence-weighted label vote (1 of 3 models failed: c: timed out after 900 ms)"
    assert outcome.failures == (("c", "timed out after 900 ms"),)
    assert outcome.answered == 2


def test_a_failed_primary_is_not_overturned():
    ballots = three_ballots()
    ballots[0] = ballot("a", None, 0.0, primary=True, error="UNAVAILABLE: gone")
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "no"
    assert outcome.primary_answer is None and not outcome.primary_overturned


def test_no_model_answering_escalates_with_no_answer():
    ballots = [ballot(m, None, 0.0, primary=m == "a", error="timed out after 10 ms") for m in "abc"]
    outcome = label_vote(ballots, OPTIONS)
    assert outcome.answer == "" and outcome.consistency == 0.0 and outcome.answered == 0
    assert outcome.escalates(0.01)
    assert not outcome.primary_overturned
    assert outcome.method.startswith("no model answered (3 of 3 models failed: a: timed out")
    assert dict(outcome.combined) == {"yes": 0.0, "no": 0.0, "maybe": 0.0}


def test_zero_confidences_fall_back_to_equal_weights():
    ballots = [ballot("a", (0.6, 0.4, 0.0), 0.0, primary=True), ballot("b", (0.0, 1.0, 0.0), 0.0)]
    outcome = label_vote(ballots, OPTIONS)
    assert dict(outcome.combined)["no"] == pytest.approx(0.7)
    assert outcome.answer == "no"


def test_weights_are_clamped_confidences():
    assert weight_of(Ballot("a", confidence=1.7)) == 1.0
    assert weight_of(Ballot("a", confidence=-0.2)) == 0.0
    assert weight_of(Ballot("a", confidence=math.nan)) == 0.0
    assert weight_of(Ballot("a", confidence=0.9, error="boom")) == 0.0


# --------------------------------------------------------------------------- free text


def text_ballots(confidences, answers=("first", "second", "third")):
    return [Ballot(m, primary=i == 0, answer=answers[i], confidence=c)
            for i, (m, c) in enumerate(zip("abc", confidences))]


VECTORS = [(1.0, 0.0), (0.8, 0.6), (0.0, 1.0)]  # cos(a,b) = 0.8, cos(a,c) = 0, cos(b,c) = 0.6


def test_medoid_with_equal_weights_is_the_answer_closest_to_all():
    outcome = medoid_vote(text_ballots((0.5, 0.5, 0.5)), VECTORS, "tiny-embed")
    # costs (shares 1/3): a = (0 + 0.2 + 1)/3, b = (0.2 + 0 + 0.4)/3, c = (1 + 0.4 + 0)/3
    assert outcome.answer == "second"
    assert outcome.consistency == pytest.approx((0.8 + 1.0 + 0.6) / 3)
    assert outcome.agreement == pytest.approx((0.8, 1.0, 0.6))
    assert outcome.method == "confidence-weighted embedding medoid (tiny-embed)"
    assert outcome.primary_overturned  # the primary said "first"


def test_confidence_moves_the_medoid():
    outcome = medoid_vote(text_ballots((0.9, 0.1, 0.1)), VECTORS)
    # W = 1.1; cost a = (0.1*0.2 + 0.1*1)/1.1 = 0.109, cost b = (0.9*0.2 + 0.1*0.4)/1.1 = 0.2
    assert outcome.answer == "first" and not outcome.primary_overturned
    assert outcome.consistency == pytest.approx((0.9 * 1 + 0.1 * 0.8 + 0.1 * 0) / 1.1)


def test_opposite_answers_count_as_no_agreement():
    assert cosine((1.0, 0.0), (-1.0, 0.0)) == pytest.approx(-1.0)
    assert similarity((1.0, 0.0), (-1.0, 0.0)) == 0.0
    outcome = medoid_vote(text_ballots((0.5, 0.5), ("yes", "no")), [(1.0, 0.0), (-1.0, 0.0)])
    assert outcome.answer == "yes"  # a tie: the primary's answer
    assert outcome.consistency == pytest.approx(0.5)  # only the medoid agrees with itself


def test_failed_and_empty_answers_in_the_medoid():
    ballots = text_ballots((0.5, 0.5, 0.5), ("first", "", "third"))
    ballots[2] = Ballot("c", answer="", error="DEADLINE_EXCEEDED")
    outcome = medoid_vote(ballots, [(1.0, 0.0), None, None])
    # b answered with nothing: similarity 0 to a; shares 1/2 each; cost a = 0.5, cost b = 0.5 -> a (earlier)
    assert outcome.answer == "first"
    assert outcome.consistency == pytest.approx(0.5)
    assert outcome.agreement == (1.0, 0.0, None)
    assert "1 of 3 models failed: c: DEADLINE_EXCEEDED" in outcome.method


def test_identical_texts_agree_fully():
    outcome = medoid_vote(text_ballots((0.3, 0.9, 0.3), ("same", "other", "same")), VECTORS)
    assert outcome.answer == "same"  # two answers identical: similarity 1 whatever the vectors say
    assert not outcome.primary_overturned


def test_unembedded_answers_escalate_with_the_most_confident_one():
    outcome = unembedded_vote(text_ballots((0.2, 0.7, 0.5)), "embedding model `e` failed (UNAVAILABLE: down)")
    assert outcome.answer == "second" and outcome.consistency == 0.0
    assert outcome.escalates(0.1) and outcome.primary_overturned
    assert "embedding model `e` failed" in outcome.method


def test_no_answer_outcome():
    outcome = no_answer([Ballot("a", primary=True, error="x"), Ballot("b", error="y")])
    assert outcome.answer == "" and outcome.escalates(0.5)
    assert outcome.method == "no model answered (2 of 2 models failed: a: x; b: y)"
