"""Topic specialists vs a generalist: accuracy, the confidence-weighted vote, and the
risk-coverage curve of escalation, on topics-dev.jsonl (BBC news, 5 topics).

    python bench/topics.py [--data /work/shared/eval/topics-dev.jsonl] [--smollm-n 150] [--quick] [--out bench/results]

Held-out protocol: the specialists are evaluated by the same 5-fold stratified
cross-validation (seed 0) the builder uses: every text is predicted by a head trained
on the other four folds, with the temperature fitted on out-of-fold logits (as in the
build). topics-finetuned's and topics-finetuned-tail's folds each fine-tune minilm-l6's top
layers (torch, the build extra; ~23 minutes each on 2 cores, their out-of-fold logits cached
under --cache); the model the builder ships is their fold-0 model. SmolLM2-135M-Instruct answers zero-shot with Score over the five labels,
asked in the consensus service's wording (services/common/decision_prompt.py) with its
score calibration (config/calibration/), on a stratified subsample (it is slow on CPU).

Each vote is built exactly as the route's request would be: every model's answer is put
into the model host's ScoreResponse (`confidence_pb`: a classifier's label_distribution is
its temperature-calibrated distribution over the options, renormalised over them, with
calibrated_confidence = its top probability, as dataplane `_classify`; SmolLM2's is
option_distribution(sums) at T = 1, with calibrated_confidence = score_confidence(sums)
under config/calibration/smollm2-135m-instruct.json, as dataplane `score`), the consensus
service turns that reply into its ballot with its own `servicer._ballot` (distribution =
`voting.calibrated_distribution`: the host's distribution tempered until its top
probability equals the calibrated confidence; weight = `voting.weight_of`, the calibrated
confidence), and `voting.label_vote` combines them: P(o) = sum_i w_i p_i(o) / sum_i w_i.
A case is answered when P(verdict) >= threshold, else escalated.

Error correlation: for every pair of the five specialists (topics-minilm, topics-bow,
topics-char, a character n-gram naive Bayes chosen to be of another family, topics-finetuned
and topics-finetuned-tail, the same recipe reading the end of the text), the phi coefficient
of their out-of-fold error indicators and how many texts both get wrong; and every vote of two
to five specialists, so the goal (vote error <= 0.8 x the best member's) is judged on the best
combination as well as on the route's own. Choosing the best of 26 votes on the same texts
flatters it, so the choice itself is checked (nested): for each fold, the vote (or single
specialist) with the fewest errors on the other four folds is scored on that fold.

The route's threshold rule (the topics route of services/defaults/mirador.yaml, whose members
this bench reads): the widest coverage of the route vote whose error among answered texts is
<= 0.3%, written as the shortest rounding down of that curve point's consistency that still
answers exactly those texts. Writes topics.json, topics_risk_coverage.png and topics.md
(the report fragment). `--quick` asks SmolLM2 about 10 texts instead of 150 (its rows then
say little; the specialists' rows are unchanged).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import fragment  # noqa: E402
from services.common.model_repository import ModelRepository  # noqa: E402
from services.consensus import fanout, voting  # noqa: E402
from services.consensus.servicer import _ballot  # noqa: E402  (the service's own answer -> ballot)
from mirador.v1 import model_host_pb2  # noqa: E402
from services.model_host.dataplane import Confidence  # noqa: E402
from services.model_host.servicer import confidence_pb  # noqa: E402
from services.common.decision_prompt import OPTIONS_JOINER, SYSTEM, USER  # noqa: E402
from services.common.calibration_math import softmax, stratified_folds  # noqa: E402
from services.fleet import specialists as sp  # noqa: E402
from services.fleet.topics_data import TOPIC_LABELS, load_examples  # noqa: E402
from services.fleet.recipes import (  # noqa: E402
    MINILM_L6, SOURCE_FINETUNED, TOPICS_BOW, TOPICS_CHAR, TOPICS_FINETUNED, TOPICS_FINETUNED_TAIL, TOPICS_MINILM,
)

LABELS = list(TOPIC_LABELS)
SMOLLM = "smollm2-135m-instruct"
QUESTION = "What is the topic of this BBC news article?\n\n{article}"
ARTICLE_CHARS = 1000  # SmolLM2 reads the headline and the first paragraphs
THRESHOLDS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
RISK_GOAL, COVERAGE_GOAL = 0.003, 0.80
SPECIALIST_RECIPES = (TOPICS_MINILM, TOPICS_BOW, TOPICS_CHAR, TOPICS_FINETUNED, TOPICS_FINETUNED_TAIL)
SPECIALISTS = tuple(recipe.name for recipe in SPECIALIST_RECIPES)
ALL_SPECIALISTS = f"specialists ({' + '.join(SPECIALISTS)}), all texts"


def route_members(config_path: Path = REPO / "services" / "defaults" / "mirador.yaml") -> tuple[list[str], float]:
    """The topics route's voters (primary first) and its consensus threshold, as the default config says."""
    from services.common.config import load_config

    route = load_config(config_path).routes["topics"]
    return [route.primary, *route.validators], route.consensus_threshold


def vote_title(members) -> str:
    return f"specialists ({' + '.join(members)}), all texts"


def specialist_oof(recipe, examples, labels, base_dir: Path, cache: Path) -> sp.CrossValidation:
    if recipe.source_kind == SOURCE_FINETUNED:
        return finetuned_oof(recipe, examples, labels, cache)
    settings = sp.SpecialistSettings.from_recipe(recipe.training)
    specialist = sp.Specialist(settings, base_dir if recipe.depends_on else None, report=lambda line: print(line, file=sys.stderr, flush=True))
    if settings.representation != sp.REPRESENTATION_MINILM:  # fast to recompute: not cached
        return specialist.cross_validate(specialist.features([e.text for e in examples]), labels)
    key = hashlib.sha256(json.dumps([recipe.training, str(base_dir), (base_dir / "model.onnx").stat().st_size,
                                     [e.id for e in examples]]).encode()).hexdigest()[:16]
    cached = cache / f"{recipe.name}-{key}.npy"
    if cached.exists():
        raw = np.load(cached)
    else:
        raw = specialist.features([e.text for e in examples])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cached, raw)
    return specialist.cross_validate(raw, labels)


def finetuned_oof(recipe, examples, labels, cache: Path) -> sp.CrossValidation:
    """topics-finetuned's 5-fold CV: every fold trains the recipe's top layers and head on the other
    four (services/fleet/finetuned_topics.py, seed + fold: the builder's shipped model is fold 0's).
    ~20 minutes on 2 cores, so the out-of-fold logits are cached."""
    key = hashlib.sha256(json.dumps([recipe.training, [e.id for e in examples]]).encode()).hexdigest()[:16]
    cached = cache / f"{recipe.name}-oof-{key}.npy"
    if cached.exists():
        logits = np.load(cached)
        return sp.cross_validate(lambda train, test: logits[test], labels, recipe.training["folds"],
                                 recipe.training["seed"])
    import torch
    import transformers

    from services.fleet import finetuned_topics as ft
    from services.fleet.builder import fetch_source
    from services.fleet.downloads import default_cache_dir

    transformers.logging.set_verbosity_error()
    settings = ft.FineTuneSettings.from_recipe(recipe.training)
    source = fetch_source(MINILM_L6, default_cache_dir(), progress=False)
    say = lambda line: print(f"  {recipe.name}:{line}", file=sys.stderr, flush=True)  # noqa: E731
    full, frozen, states = ft.prepare(settings, source, [e.text for e in examples], torch, say)
    started, fold = time.perf_counter(), iter(range(settings.folds))

    def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        index = next(fold)
        model = ft.fine_tune(states, labels, full.encoder.layer[frozen:], train, settings, settings.seed + index,
                             torch, say)
        say(f" fold {index} done ({time.perf_counter() - started:.0f} s)")
        return ft.predict_logits(model, states, test, torch)

    cv = sp.cross_validate(fit_predict, labels, settings.folds, settings.seed)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(cached, cv.logits)
    return cv


def smollm_scores(examples, rows, repository) -> tuple[np.ndarray, np.ndarray, str, float, np.ndarray]:
    """(distributions [n, 5], calibrated confidences [n], calibration source, seconds per text,
    option log-likelihood sums [n, 5]), computed as the model host's Score computes them."""
    from services.model_host.calibration import load_score_calibration, option_distribution, score_confidence
    from services.model_host.loader import SessionSettings, load_runtime

    runtime = load_runtime(repository.get(SMOLLM), SessionSettings())
    calibration = load_score_calibration(SMOLLM)
    distributions, confidences, source, all_sums = [], [], "", []
    started = time.perf_counter()
    for count, row in enumerate(rows):
        question = QUESTION.format(article=examples[row].text[:ARTICLE_CHARS])
        asked = USER.format(prompt=question, options=OPTIONS_JOINER.join(LABELS))
        ids = runtime.encode(runtime.render_chat([("system", SYSTEM), ("user", asked)]))
        sums, _ = runtime.score_options(ids, LABELS)
        all_sums.append([float(x) for x in sums])
        distributions.append(option_distribution(sums))
        confidence, source = score_confidence(SMOLLM, sums, calibration)
        confidences.append(confidence)
        if count % 25 == 0:
            print(f"  smollm2 {count + 1}/{len(rows)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return (np.array(distributions), np.array(confidences), source, (time.perf_counter() - started) / len(rows),
            np.array(all_sums))


def classifier_reply(name: str, probabilities: np.ndarray) -> model_host_pb2.ScoreResponse:
    """A classifier's Score reply as the model host sends it (dataplane `_classify` with every
    label as an option: the distribution renormalised over the options, calibrated confidence =
    its top probability, logprob = log p)."""
    chosen = np.asarray(probabilities, dtype=np.float64)
    chosen = chosen / chosen.sum() if chosen.sum() > 0 else np.full(len(LABELS), 1.0 / len(LABELS))
    confidence = Confidence(labels=[(o, float(p), float(np.log(max(p, 1e-45)))) for o, p in zip(LABELS, chosen)],
                            calibrated=float(chosen.max()), source="temperature-scaled head")
    return model_host_pb2.ScoreResponse(model=name, best_option=LABELS[int(np.argmax(chosen))],
                                        confidence=confidence_pb(confidence))


def decoder_reply(name: str, sums: np.ndarray, calibration) -> model_host_pb2.ScoreResponse:
    """A decoder's Score reply as the model host sends it (dataplane `score`: T = 1 option
    distribution, calibrated confidence from the model's own score calibration)."""
    from services.model_host.calibration import option_distribution, score_confidence

    sums = [float(x) for x in sums]
    probabilities = option_distribution(sums)
    calibrated, source = score_confidence(name, sums, calibration)
    confidence = Confidence(labels=[(o, float(p), s) for o, p, s in zip(LABELS, probabilities, sums)],
                            calibrated=calibrated, source=source)
    return model_host_pb2.ScoreResponse(model=name, best_option=LABELS[int(np.argmax(probabilities))],
                                        confidence=confidence_pb(confidence))


def ballots(members: list[tuple[str, list]], row: int) -> list[voting.Ballot]:
    """The consensus service's ballots for one text: each member's reply (members[i][1][row],
    a ScoreResponse) through the service's own `_ballot` (member 0 = the primary)."""
    return [_ballot(fanout.Answer(index=i, model=name, value=replies[row]), LABELS)
            for i, (name, replies) in enumerate(members)]


def vote(members: list[tuple[str, list]], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The consensus service's label vote for each row: (verdict index, consistency)."""
    verdicts, consistencies = [], []
    for row in rows:
        outcome = voting.label_vote(ballots(members, row), LABELS)
        verdicts.append(LABELS.index(outcome.answer))
        consistencies.append(outcome.consistency)
    return np.array(verdicts), np.array(consistencies)


def choose_threshold(scores: np.ndarray, correct: np.ndarray) -> dict | None:
    """The route's rule: the widest coverage with risk <= RISK_GOAL (answering at or above a
    distinct consistency), that consistency rounded DOWN to the fewest decimals that still
    answer exactly the same texts (no lower consistency reaches it); None if no point qualifies."""
    distinct = np.unique(scores)[::-1]  # descending
    best = None
    for t in distinct:
        kept = scores >= t
        if (~correct[kept]).mean() <= RISK_GOAL:
            best = float(t)  # coverage only grows as t falls: the last one that qualifies is the widest
    if best is None:
        return None
    below = scores[scores < best]
    next_lower = float(below.max()) if below.size else -np.inf
    chosen = best
    for decimals in range(2, 7):
        rounded = float(np.floor(best * 10 ** decimals) / 10 ** decimals)
        if rounded > next_lower:
            chosen = rounded
            break
    kept = scores >= chosen
    return {"threshold": round(chosen, 6), "coverage": round(float(kept.mean()), 4), "answered": int(kept.sum()),
            "errors": int((~correct[kept]).sum()), "risk": round(float((~correct[kept]).mean()), 4),
            "widest_point_consistency": round(best, 6),
            "next_lower_consistency": round(next_lower, 6) if below.size else None,
            "rule": (f"widest coverage of the route vote with risk <= {RISK_GOAL:.1%}; its consistency rounded down "
                     "to the fewest decimals that answer the same texts")}


def risk_coverage(correct: np.ndarray, scores: np.ndarray) -> dict:
    """Answer when score >= t. The full curve (one point per distinct score) and a table."""
    order = np.argsort(-scores, kind="stable")
    errors = np.cumsum(~correct[order])
    answered = np.arange(1, len(order) + 1)
    # Only points where the threshold separates distinct scores.
    last = np.r_[scores[order][1:] != scores[order][:-1], True]
    curve = {"coverage": (answered[last] / len(order)).round(5).tolist(),
             "risk": (errors[last] / answered[last]).round(5).tolist(),
             "threshold": scores[order][last].round(6).tolist()}
    table = []
    for threshold in THRESHOLDS:
        kept = scores >= threshold
        table.append({"threshold": threshold, "coverage": round(float(kept.mean()), 4),
                      "risk": round(float((~correct[kept]).mean()), 4) if kept.any() else 0.0,
                      "errors": int((~correct[kept]).sum()), "answered": int(kept.sum())})
    at = int(np.ceil(COVERAGE_GOAL * len(order))) - 1
    at_goal = {"coverage": COVERAGE_GOAL, "risk": round(float(errors[at] / (at + 1)), 4),
               "threshold": round(float(scores[order][at]), 6), "errors": int(errors[at])}
    # The widest coverage whose risk stays within the goal (answer only at or above a distinct score).
    within = [(c, r, t) for c, r, t in zip(curve["coverage"], curve["risk"], curve["threshold"]) if r <= RISK_GOAL]
    best = max(within) if within else None
    return {"n": int(len(order)), "accuracy": round(float(correct.mean()), 4), "curve": curve, "table": table,
            "at_80_coverage": at_goal,
            "widest_within_goal": ({"coverage": best[0], "risk": best[1], "threshold": best[2]} if best else None)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/eval/topics-dev.jsonl"))
    parser.add_argument("--smollm-n", type=int, default=150, help="texts SmolLM2 answers (stratified, seed 0)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mirador" / "bench")
    parser.add_argument("--quick", action="store_true", help="SmolLM2 on 10 texts (unless --smollm-n says otherwise)")
    args = parser.parse_args(argv)
    if args.quick and args.smollm_n == parser.get_default("smollm_n"):
        args.smollm_n = 10

    repository = ModelRepository()
    examples = load_examples(args.data)
    labels = np.array([LABELS.index(e.label) for e in examples])
    base_dir = repository.get("minilm-l6").directory
    results: dict = {"created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                     "data": f"{args.data.name}: {len(examples)} texts", "protocol": __doc__.split("\n\n")[1]}

    members = {}
    for recipe in SPECIALIST_RECIPES:
        cv = specialist_oof(recipe, examples, labels, base_dir, args.cache)
        probabilities = softmax(cv.logits, cv.temperature)
        members[recipe.name] = (probabilities, probabilities.max(axis=1))
        results[recipe.name] = {**cv.summary(), "temperature": cv.temperature}
        print(f"{recipe.name}: 5-fold CV accuracy {cv.summary()['accuracy']:.4f} (T={cv.temperature})", flush=True)

    everyone = np.arange(len(examples))
    rng = np.random.default_rng(0)
    subsample = np.sort(np.concatenate([  # stratified, proportional
        rng.choice(np.flatnonzero(labels == k), round(args.smollm_n * (labels == k).mean()), replace=False)
        for k in range(len(LABELS))]))
    distributions, confidences, source, per_text, sums = smollm_scores(examples, subsample, repository)
    smollm_dist = np.full((len(examples), len(LABELS)), np.nan)
    smollm_conf = np.full(len(examples), np.nan)
    smollm_dist[subsample], smollm_conf[subsample] = distributions, confidences
    members[SMOLLM] = (smollm_dist, smollm_conf)
    results[SMOLLM] = {"n": int(len(subsample)), "seconds_per_text": round(per_text, 2),
                       "accuracy": round(float((distributions.argmax(axis=1) == labels[subsample]).mean()), 4),
                       "predicted_label_counts": np.bincount(distributions.argmax(axis=1), minlength=5).tolist(),
                       "mean_calibrated_confidence": round(float(confidences.mean()), 4),
                       "mean_raw_top_probability": round(float(distributions.max(axis=1).mean()), 4),
                       "calibration_source": source,
                       "rows": subsample.tolist(), "option_logprob_sums": sums.round(5).tolist(),
                       "prompt": {"system": SYSTEM, "user": USER, "question": QUESTION,
                                  "article_chars": ARTICLE_CHARS}}
    print(f"{SMOLLM}: zero-shot accuracy {results[SMOLLM]['accuracy']:.4f} on {len(subsample)} texts", flush=True)

    # What the model host replies to each Score, per model and text (None: SmolLM2 was not asked).
    from services.model_host.calibration import load_score_calibration

    smollm_calibration = load_score_calibration(SMOLLM)
    replies = {name: [classifier_reply(name, p) for p in members[name][0]] for name in SPECIALISTS}
    replies[SMOLLM] = [None] * len(examples)
    for row, row_sums in zip(subsample, sums):
        replies[SMOLLM][row] = decoder_reply(SMOLLM, row_sums, smollm_calibration)
    results["ballot"] = ("each model's Score reply as the model host sends it, turned into a ballot by the consensus "
                         "service's own servicer._ballot: distribution = voting.calibrated_distribution (the host's "
                         "T = 1 distribution tempered until its top probability = the calibrated confidence), weight "
                         "= voting.weight_of (the calibrated confidence); combined by voting.label_vote")

    def member(name):
        return (name, replies[name])

    route, route_threshold_now = route_members()
    route_specialists = [name for name in route if name in SPECIALISTS]
    asks_smollm = SMOLLM in route  # SmolLM2 answered the subsample only: a route it votes in is scored there
    route_vote = f"route vote ({' + '.join(route)}), {'subsample' if asks_smollm else 'every text'}"
    results["route"] = {"members": route, "consensus_threshold": route_threshold_now, "title": route_vote}
    configurations = {
        **{vote_title(names): ([member(name) for name in names], everyone)
           for size in range(2, len(SPECIALISTS) + 1) for names in itertools.combinations(SPECIALISTS, size)},
        route_vote: ([member(name) for name in route], subsample if asks_smollm else everyone),
    }
    if asks_smollm:
        configurations[f"route's specialists ({' + '.join(route_specialists)}), same subsample"] = (
            [member(name) for name in route_specialists], subsample)
    results["error_correlation"] = error_correlation(
        {name: members[name][0].argmax(axis=1) != labels for name in SPECIALISTS})
    singles = {}
    for name in (*SPECIALISTS, SMOLLM):
        rows = subsample if name == SMOLLM else everyone
        probabilities, confidence = members[name]
        singles[name] = risk_coverage(probabilities[rows].argmax(axis=1) == labels[rows], confidence[rows])
    votes, wrong_of = {}, {}  # wrong_of: every all-texts vote's error indicators, for the nested check
    for title, (voters, rows) in configurations.items():
        verdicts, consistency = vote(voters, rows)
        votes[title] = {**risk_coverage(verdicts == labels[rows], consistency),
                        "members": [name for name, _ in voters], "errors": int((verdicts != labels[rows]).sum())}
        if title.endswith("all texts"):
            wrong_of[title] = verdicts != labels
        if title == route_vote:
            route_threshold = choose_threshold(consistency, verdicts == labels[rows])
    results["single_models"] = singles
    results["votes"] = votes
    results["route_threshold"] = route_threshold

    errors = {name: int(round((1 - singles[name]["accuracy"]) * singles[name]["n"])) for name in SPECIALISTS}
    best_single = min(errors.values())
    all_texts = {title: entry for title, entry in votes.items() if title.endswith("all texts")}
    vote_errors = {title: entry["errors"] for title, entry in all_texts.items()}
    best_vote = min(vote_errors, key=lambda title: (vote_errors[title], title.count("+")))
    route_all = vote_title([name for name in SPECIALISTS if name in route_specialists])
    folds = stratified_folds(labels, TOPICS_BOW.training["folds"], TOPICS_BOW.training["seed"])
    wrong_by_choice = {**{vote_title([name]): members[name][0].argmax(axis=1) != labels for name in SPECIALISTS},
                       **wrong_of}
    results["nested_choice"] = {
        "votes_or_singles": nested_choice(wrong_by_choice, folds),
        "singles": nested_choice({t: w for t, w in wrong_by_choice.items() if "+" not in t}, folds)}
    results["goals"] = {
        "errors": errors,
        "route_specialists_vote": route_all,
        "route_specialists_vote_errors": vote_errors.get(route_all),
        "vote_error_vs_best_single": (round(vote_errors[route_all] / best_single, 3) if route_all in vote_errors
                                      else None),
        "best_vote": best_vote,
        "best_vote_errors": vote_errors[best_vote],
        "best_vote_error_vs_best_single": round(vote_errors[best_vote] / best_single, 3),
        "vote_error_goal": "<= 0.8 x the best single model's error",
        "risk_at_80_coverage": all_texts.get(route_all, all_texts[ALL_SPECIALISTS])["at_80_coverage"]["risk"],
        "risk_goal": f"<= {RISK_GOAL:.1%} at {COVERAGE_GOAL:.0%} coverage",
        "nested_choice_error_vs_nested_single": round(results["nested_choice"]["votes_or_singles"]["errors"]
                                                      / results["nested_choice"]["singles"]["errors"], 3),
    }
    shown = {route_all, best_vote, route_vote}
    for title, entry in votes.items():  # the full curve of the votes that are drawn only (topics.json stays small)
        if title not in shown:
            entry.pop("curve")
    print_tables(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "topics.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "topics_risk_coverage.png")
    print(f"wrote {args.out / 'topics.json'} and {args.out / 'topics_risk_coverage.png'}")
    write_fragment(results, args.out)
    return 0


def nested_choice(wrong: dict[str, np.ndarray], folds: np.ndarray) -> dict:
    """Choosing a vote by its out-of-fold errors, checked: for each fold, the candidate with the fewest
    errors on the other folds (ties: fewer members, then title) is scored on that fold. Returns the
    errors summed over the folds and each fold's choice."""
    errors, chosen = 0, []
    for fold in np.unique(folds):
        pick = min(wrong, key=lambda title: (int(wrong[title][folds != fold].sum()), title.count("+"), title))
        errors += int(wrong[pick][folds == fold].sum())
        chosen.append(pick)
    return {"errors": errors, "chosen_per_fold": chosen}


def error_correlation(wrong: dict[str, np.ndarray]) -> list[dict]:
    """For each pair of specialists (out-of-fold, all texts): the phi coefficient of their
    error indicators, how many texts both get wrong, and the fewest errors any vote of the two
    could make (texts both get wrong)."""
    names = list(wrong)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            phi = float(np.corrcoef(wrong[a].astype(float), wrong[b].astype(float))[0, 1])
            rows.append({"pair": f"{a} / {b}", "errors": [int(wrong[a].sum()), int(wrong[b].sum())],
                         "phi": round(phi, 3), "both_wrong": int((wrong[a] & wrong[b]).sum())})
    together = np.stack(list(wrong.values()))
    rows.append({"pair": " / ".join(names), "errors": [int(w.sum()) for w in wrong.values()], "phi": None,
                 "both_wrong": int((together.sum(axis=0) >= 2).sum()), "all_wrong": int(together.all(axis=0).sum())})
    return rows


def write_fragment(results: dict, out: Path) -> None:
    errors = results["goals"]["errors"]
    rows = []
    for name, entry in {**results["single_models"], **results["votes"]}.items():
        at, widest = entry["at_80_coverage"], entry["widest_within_goal"]
        wrong = entry.get("errors", round((1 - entry["accuracy"]) * entry["n"]))
        ratio = f"{wrong / min(errors[m] for m in entry['members']):.2f}" if name.endswith("all texts") else ""
        rows.append([name, entry["n"], wrong, f"{entry['accuracy']:.2%}", ratio, f"{at['risk']:.2%}",
                     f"{at['threshold']:.4f}", f"{widest['coverage']:.1%}" if widest else "none"])
    goals, nested = results["goals"], results["nested_choice"]
    parts = [f"{results['data']}, created {results['created_at']}. Specialists: 5-fold CV on all texts; "
             f"{SMOLLM}: zero-shot Score on a stratified subsample of {results[SMOLLM]['n']} "
             f"({results[SMOLLM]['seconds_per_text']} s per text).",
             fragment.table(["model / vote", "n", "errors", "accuracy", "errors / best member's",
                             "risk at 80 % coverage", "threshold there",
                             f"widest coverage with risk <= {RISK_GOAL:.1%}"], rows,
                            title="Single models and votes"),
             fragment.table(["specialists", "errors (each)", "phi of error indicators",
                             "texts both (or at least two) get wrong"],
                            [[r["pair"], " / ".join(map(str, r["errors"])), "" if r["phi"] is None else r["phi"],
                              r["both_wrong"]] for r in results["error_correlation"]],
                            title="Error correlation (out-of-fold, all texts)"),
             fragment.table(["goal", "measured", "target"],
                            [[(f"vote error / best single model's error: the route's specialists "
                               f"({goals['route_specialists_vote_errors']} errors) / the best single "
                               f"({min(goals['errors'].values())} errors)"),
                              goals["vote_error_vs_best_single"], goals["vote_error_goal"]],
                             [f"the same, best vote ({goals['best_vote']}, {goals['best_vote_errors']} errors)",
                              goals["best_vote_error_vs_best_single"], goals["vote_error_goal"]],
                             ["risk at 80 % coverage (the route's specialists' vote)", f"{goals['risk_at_80_coverage']:.2%}",
                              goals["risk_goal"]],
                             [(f"the choice checked (nested): the vote or specialist with the fewest errors on four "
                               f"folds, scored on the fifth ({nested['votes_or_singles']['errors']} errors) / the "
                               f"best single chosen the same way ({nested['singles']['errors']} errors)"),
                              goals["nested_choice_error_vs_nested_single"], "(how far the best vote's ratio is luck)"]],
                            title="Goals"),
             route_threshold_table(results),
             "![risk-coverage of escalation](topics_risk_coverage.png)"]
    fragment.write(out, "topics", parts)


def route_threshold_table(results: dict) -> str:
    chosen = results["route_threshold"]
    if not chosen:
        return f"**topics route threshold**: no threshold answers anything with risk <= {RISK_GOAL:.1%}."
    return fragment.table(
        ["rule", "threshold", "answered", "coverage", "errors", "risk"],
        [[chosen["rule"], f"{chosen['threshold']:g}", f"{chosen['answered']} of {results['votes'][results['route']['title']]['n']}",
          f"{chosen['coverage']:.1%}", chosen["errors"], f"{chosen['risk']:.2%}"]],
        title="topics route threshold (route vote, consensus_threshold in config/mirador.yaml)")


def print_tables(results: dict) -> None:
    print("\nAccuracy (specialists: 5-fold CV on all texts; smollm2: zero-shot on the subsample)")
    print(f"{'model / vote':64} {'n':>5} {'accuracy':>9} {'risk@80%':>9} {'thr@80%':>9}")
    for name, entry in {**results["single_models"], **results["votes"]}.items():
        at = entry["at_80_coverage"]
        print(f"{name:64} {entry['n']:>5} {entry['accuracy']:>9.4f} {at['risk']:>9.4f} {at['threshold']:>9.4f}")
    goals = results["goals"]
    shown = {goals["route_specialists_vote"], goals["best_vote"], results["route"]["title"]}
    for title, entry in results["votes"].items():
        if title not in shown:
            continue
        print(f"\nRisk-coverage, {title}")
        print(f"{'threshold':>10} {'coverage':>9} {'risk':>8} {'errors':>7} {'answered':>9}")
        for row in entry["table"]:
            print(f"{row['threshold']:>10} {row['coverage']:>9.4f} {row['risk']:>8.4f} {row['errors']:>7} "
                  f"{row['answered']:>9}")
        print(f"widest coverage with risk <= {RISK_GOAL:.1%}: {entry['widest_within_goal']}")
    print("\nError correlation (specialists, out-of-fold)")
    for r in results["error_correlation"]:
        print(f"  {r['pair']:48} errors {r['errors']} phi {r['phi']} both/at-least-two wrong {r['both_wrong']}")
    print(f"\nGoals: {results['goals']}")
    print(f"Nested choice: {results['nested_choice']}")
    chosen = results["route_threshold"]
    if chosen:
        print(f"topics route threshold ({chosen['rule']}): {chosen['threshold']} -> {chosen['answered']} of "
              f"{results['votes'][results['route']['title']]['n']} answered ({chosen['coverage']:.1%}), {chosen['errors']} errors "
              f"(risk {chosen['risk']:.2%}); curve point {chosen['widest_point_consistency']}, next lower consistency "
              f"{chosen['next_lower_consistency']}")
    else:
        print(f"topics route threshold: no threshold answers anything with risk <= {RISK_GOAL:.1%}")


def plot(results: dict, path: Path) -> None:
    plt = fragment.pyplot()
    if plt is None:
        return
    figure, axis = plt.subplots(figsize=(8, 5.5))
    goals = results["goals"]
    shown = {goals["route_specialists_vote"], goals["best_vote"], results["route"]["title"]}
    for name, entry in {**results["single_models"],
                        **{t: e for t, e in results["votes"].items() if t in shown}}.items():
        curve = entry["curve"]
        style = "-" if name in results["votes"] else ":"
        axis.plot(curve["coverage"], np.array(curve["risk"]) * 100, style, label=f"{name} (n={entry['n']})")
    axis.axhline(RISK_GOAL * 100, color="grey", linewidth=0.8)
    axis.axvline(COVERAGE_GOAL, color="grey", linewidth=0.8)
    chosen = results.get("route_threshold")
    if chosen:
        axis.plot([chosen["coverage"]], [chosen["risk"] * 100], "o", color="black", markersize=5)
        axis.annotate(f"route threshold {chosen['threshold']:g}", (chosen["coverage"], chosen["risk"] * 100),
                      fontsize=7, xytext=(-130, 30), textcoords="offset points",
                      arrowprops={"arrowstyle": "->", "linewidth": 0.6})
    axis.set_xlabel("coverage (share answered without escalation)")
    axis.set_ylabel("risk: error among answered cases (%)")
    axis.set_ylim(0, 6)
    axis.set_title("Topics (BBC, topics-dev): risk-coverage of escalation")
    axis.legend(fontsize=7, loc="upper left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
