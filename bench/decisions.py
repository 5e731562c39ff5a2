"""The consensus label vote on BIG-bench decisions: member accuracy, the vote's accuracy,
and the risk-coverage curve of escalation, on the calibration tool's held-out half.

    python bench/decisions.py [--data /work/shared/eval/decisions-dev.jsonl] [--per-source 40]
                              [--config config/mirador.yaml] [--route compliance]
                              [--threads 2] [--out bench/results] [--reuse]

Split: exactly services/model_host/calibrate.py's (sha256(prompt) parity: even = fit,
odd = held out; within each source, hash order). Only held-out questions are scored:
the first `--per-source` per source (default 40 -> 120 questions, a subset of the 150
the calibration report was evaluated on).

Members: the primary and validators of `--route` in `--config` (default: the shipped
config's `compliance` route: `smollm2-135m-instruct-fused-mixed` (the per-layer quantized fused
graph, primary), `smollm2-135m-instruct` (optimum fp32 export) and `smollm2-135m-instruct-fused-int8`).
These are THE SAME SmolLM2-135M-Instruct weights run through other graphs / quantisations,
NOT independent models: the fleet has no second real decoder, so this vote measures what
graph and quantisation noise does to a vote of one model with itself, not the benefit of
diverse models (the two fp32 graphs give the same logits within 1e-4).

Each member is run in-process as the model host scores (`load_runtime`,
`render_chat` / `encode` / `score_options`), asked in the consensus service's wording
(`services.common.decision_prompt.decision_messages`, ChatMessage protos converted to
(role, content) pairs with the host's own role map). As in the host's data plane
(services/model_host/dataplane.py), the host's distribution is `option_distribution(sums)`
at T = 1 and the ballot's weight is the calibrated confidence
`score_confidence(model, sums, calibration)` with the member's own
config/calibration/<model>.json, exactly as the host does (a member without one gets the
uncalibrated option probability, T = 1, as the host would report it); as in the consensus
service (services/consensus/servicer.py `_ballot`), the ballot's distribution is that
distribution tempered to the calibrated confidence (`voting.calibrated_distribution`).

The route's own requests (`--route-requests`: the texts of routing-dev.jsonl labelled with
`--route`; no right answers) are scored by every member too, to see where the vote's
consistency lies on the requests the route really gets, as opposed to decisions-dev.

The vote is the consensus service's `services.consensus.voting.label_vote`; a question
is answered when consistency = P(verdict) >= threshold, else escalated. The same curve is
drawn for the best single member alone (its own T=1 P(top option), what a one-model
route would threshold on).

The threshold is chosen by a stated rule (`choose_threshold`): the widest coverage whose
error among answered questions is at most `--risk-target` (default 10%) with at least
`--min-answered` answered; when no threshold answers anything at that risk (models at
chance), the lowest threshold on the grid at which NO held-out question is answered, i.e.
every decision escalates to a human, rounded up to the next 0.05 and raised above the
highest consistency seen on the route's own requests as well. Writes <out>/decisions.json (raw option
log-likelihoods included; `--reuse` recomputes the tables from it without running the
models), <out>/decisions_risk_coverage.png and <out>/decisions.md (the report fragment,
bench/fragment.py: the tables printed here, from the JSON; `--fragment-only` rewrites just
it from an existing <out>/decisions.json, touching nothing else).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import fragment  # noqa: E402
from mirador.v1 import common_pb2  # noqa: E402
from services.consensus import voting  # noqa: E402
from services.common.decision_prompt import decision_messages  # noqa: E402
from services.model_host.calibrate import DEFAULT_DATA, load_questions, split  # noqa: E402
from services.model_host.calibration import load_score_calibration, option_distribution, score_confidence  # noqa: E402

DEFAULT_CONFIG = REPO / "config" / "mirador.yaml"
DEFAULT_ROUTE = "compliance"
ROUTING_DATA = Path("/work/shared/eval/routing-dev.jsonl")
THRESHOLDS = [round(0.34 + 0.01 * k, 2) for k in range(66)]  # 0.34 .. 0.99: the curve
TABLE_THRESHOLDS = [round(0.5 + 0.05 * k, 2) for k in range(10)]  # 0.50 .. 0.95: the printed table
MARGIN_STEP = 0.05  # an "escalate everything" threshold: this far above every consistency seen, on this grid
# The host's role map (services/model_host/servicer.py ROLES), copied to avoid importing grpc servicers.
ROLES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}


def held_out_sample(path: Path, per_source: int):
    questions = load_questions(path)
    fit_all, held_all = split(questions, 0)
    _, held = split(questions, per_source)
    return questions, fit_all, held


def majority_labels(fit) -> dict[str, str]:
    """Per source, the most frequent right answer on the whole fit half."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for q in fit:
        counts[q.source][q.options[q.answer]] += 1
    return {s: c.most_common(1)[0][0] for s, c in counts.items()}


def score_member(model: str, questions, threads: int) -> tuple[list[list[float]], dict]:
    from services.common.model_repository import ModelRepository
    from services.model_host.loader import SessionSettings, default_optimized_cache, load_runtime

    started = time.perf_counter()
    manifest = ModelRepository(None).get(model, None)
    runtime = load_runtime(manifest, SessionSettings(intra_op_threads=threads, optimized_cache=default_optimized_cache()))
    load_s = time.perf_counter() - started
    sums_all = []
    started = time.perf_counter()
    for number, q in enumerate(questions, 1):
        asked = decision_messages([common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=q.prompt)], q.options)
        ids = runtime.encode(runtime.render_chat([(ROLES[m.role], m.content) for m in asked]))
        sums, _ = runtime.score_options(ids, list(q.options))
        sums_all.append([float(s) for s in sums])
        if number % 20 == 0 or number == len(questions):
            el = time.perf_counter() - started
            print(f"  {model}: {number}/{len(questions)} scored, {el:.0f} s ({el / number * 1000:.0f} ms each)",
                  file=sys.stderr, flush=True)
    info = {"version": manifest.version, "load_s": round(load_s, 2),
            "score_s": round(time.perf_counter() - started, 2)}
    del runtime
    return sums_all, info


def risk_coverage(outcomes, correct: np.ndarray) -> list[dict]:
    rows = []
    for t in THRESHOLDS:
        answered = np.array([not o.escalates(t) for o in outcomes])
        n_ans = int(answered.sum())
        errors = int((answered & ~correct).sum())
        rows.append({"threshold": t, "escalated": round(1 - n_ans / len(outcomes), 4), "answered": n_ans,
                     "errors": errors, "error_among_answered": round(errors / n_ans, 4) if n_ans else None,
                     "confident_error_share_of_all_questions": round(errors / len(outcomes), 4)})
    return rows


def choose_threshold(rc: list[dict], risk_target: float, min_answered: int,
                     highest_seen: float) -> tuple[float, str]:
    """The widest coverage with error among answered <= risk_target (>= min_answered answered);
    else escalate everything: MARGIN above `highest_seen` (the highest consistency of the vote on
    the labelled sample and on the route's own requests), rounded up to the MARGIN grid."""
    ok = [r for r in rc if r["answered"] >= min_answered and r["error_among_answered"] <= risk_target]
    if ok:
        best = max(ok, key=lambda r: (r["answered"], -r["threshold"]))
        return best["threshold"], (f"widest coverage with error among answered <= {risk_target:.0%} "
                                   f"(>= {min_answered} answered): {best['answered']} answered, "
                                   f"{best['errors']} errors")
    t = round(math.ceil(round((highest_seen + MARGIN_STEP) / MARGIN_STEP, 6)) * MARGIN_STEP, 2)
    return min(t, 1.0), (f"no threshold answers >= {min_answered} questions with error <= {risk_target:.0%}, so "
                         f"everything escalates: the highest consistency seen (held-out sample and the route's own "
                         f"requests) is {highest_seen:.3f}; + {MARGIN_STEP:.2f} margin, rounded up to the "
                         f"{MARGIN_STEP:.2f} grid")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--per-source", type=int, default=40, help="held-out questions per source, hash order (0 = all)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config whose route's members vote")
    parser.add_argument("--route", default=DEFAULT_ROUTE, help="a consensus route of --config (default compliance)")
    parser.add_argument("--risk-target", type=float, default=0.10,
                        help="threshold rule: highest acceptable error among answered questions")
    parser.add_argument("--min-answered", type=int, default=10,
                        help="threshold rule: a risk measured on fewer answered questions does not count")
    parser.add_argument("--route-requests", type=Path, default=ROUTING_DATA,
                        help="JSONL with {text, route}: the route's own requests, scored unlabelled ('' = skip)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--reuse", action="store_true", help="reuse the raw scores in <out>/decisions.json")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--fragment-only", action="store_true",
                        help="only rewrite <out>/decisions.md from the existing <out>/decisions.json (no scoring, "
                             "no recomputation; the JSON and PNG are left as they are)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.fragment_only:
        saved = args.out / "decisions.json"
        if not saved.is_file():
            parser.error(f"--fragment-only: {saved} does not exist; run the bench first")
        write_fragment(json.loads(saved.read_text()), args.out)
        return 0

    if not args.data.exists():
        parser.error(f"--data {args.data} does not exist")
    from services.common.config import load_config

    route = load_config(args.config).routes.get(args.route)
    if route is None or not route.uses_consensus:
        parser.error(f"--route {args.route} is not a consensus route of {args.config}")
    members = [route.primary, *route.validators]
    print(f"route {args.route} of {args.config}: primary {route.primary}, validators {', '.join(route.validators)}, "
          f"consensus_threshold {route.consensus_threshold}")
    host = fragment.machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores, load average {host['load_average']} "
          f"(python {host['python']}, onnxruntime {host['onnxruntime']})")
    questions, fit_all, held = held_out_sample(args.data, args.per_source)
    print(f"data: {args.data} ({len(questions)} questions); held-out sample {len(held)} "
          f"(sha256(prompt) odd, first {args.per_source or 'all'} per source in hash order)")

    scores, runs = question_scores(args, members, held)
    requests, request_scores = route_request_scores(args, route, members, runs)
    calibrations = {m: load_score_calibration(m) for m in members}
    cal_note = {m: (f"own calibration T={c.temperature:.3f}" if c else
                    "no calibration file: uncalibrated option probability (T=1), as the host reports it")
                for m, c in calibrations.items()}
    votes = Votes(members, calibrations, held, scores, fit_all, requests, request_scores)
    per_source, agree_pairs = votes.print_accuracy(route.primary, cal_note)
    escalation = votes.escalation(route, args)
    check1, check2 = votes.checks(escalation, route.consensus_threshold or escalation.chosen)
    host_end = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at end: {host_end}")

    result = {
        "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": "python bench/decisions.py",
        "machine": {**host, "load_average_at_end": host_end},
        "data": str(args.data),
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "split": (f"services/model_host/calibrate.py split: sha256(prompt) odd = held out; first "
                  f"{args.per_source or 'all'} per source in hash order"),
        "n": votes.n,
        "config": str(args.config),
        "route": args.route,
        "members": members,
        "members_note": (f"the same SmolLM2-135M-Instruct weights through other graphs ({', '.join(members)}): "
                         "NOT independent models; the fleet has no second real decoder"),
        "calibration": cal_note,
        "ballot": ("distribution = the host's option_distribution(sums) at T=1 tempered to the calibrated confidence "
                   "(voting.calibrated_distribution, as the consensus service); weight = calibrated confidence"),
        "majority_baseline": "per source, the most frequent right answer on the whole fit half (even hashes)",
        "runs": runs,
        "accuracy": per_source,
        "pairwise_top_option_agreement": agree_pairs,
        "risk_coverage": escalation.rc,
        "risk_coverage_best_member_alone": {"model": escalation.best, "rows": escalation.rc_best},
        "route_requests": {
            "data": str(args.route_requests), "options": list(route.options), **escalation.request_summary,
            "requests": [{"text": r.prompt, "logprob_sums": {m: request_scores[m][i] for m in members},
                          "vote": o.answer, "consistency": round(o.consistency, 4)}
                         for i, (r, o) in enumerate(zip(requests, votes.request_outcomes))],
        },
        "threshold_rule": {"risk_target": args.risk_target, "min_answered": args.min_answered,
                           "chosen": escalation.chosen, "why": escalation.rule, "configured": route.consensus_threshold,
                           "max_vote_consistency": round(float(votes.consistency.max()), 4),
                           "median_vote_consistency": round(float(np.median(votes.consistency)), 4)},
        "check_vote_vs_best_member": check1,
        "check_confident_errors": check2,
        "questions": [
            {"source": q.source, "digest": q.digest[:16], "options": q.options, "answer": q.answer,
             "logprob_sums": {m: scores[m][i] for m in members},
             "confidences": {b.model: round(b.confidence, 4) for b in votes.ballots_all[i]},
             "vote": votes.outcomes[i].answer, "consistency": round(votes.outcomes[i].consistency, 4)}
            for i, q in enumerate(held)
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_json = args.out / "decisions.json"
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_json}")
    if not args.no_png:
        plot_risk_coverage(args, votes, escalation, per_source)
    write_fragment(result, args.out)
    return 0


def question_scores(args, members: list[str], held) -> tuple[dict[str, list[list[float]]], dict]:
    """Every member's option log-likelihood sums on the held-out questions: scored now, or reused."""
    out_json = args.out / "decisions.json"
    scores: dict[str, list[list[float]]] = {}
    runs: dict[str, dict] = {}
    if args.reuse:
        saved = json.loads(out_json.read_text())
        if [r["digest"] for r in saved["questions"]] != [q.digest[:16] for q in held]:
            raise SystemExit(f"{out_json}: its questions differ from this sample; run without --reuse")
        missing = [m for m in members if m not in saved["questions"][0]["logprob_sums"]]
        if missing:
            raise SystemExit(f"{out_json} has no scores for {', '.join(missing)}; run without --reuse")
        scores = {m: [r["logprob_sums"][m] for r in saved["questions"]] for m in members}
        runs = saved.get("runs", {})
        print(f"scores reused from {out_json}")
    else:
        started = time.perf_counter()
        for model in members:
            scores[model], runs[model] = score_member(model, held, args.threads)
        runs["total_s"] = round(time.perf_counter() - started, 1)
        print(f"scored {len(members)} members x {len(held)} questions in {runs['total_s']:.0f} s", file=sys.stderr)

    return scores, runs


def route_request_scores(args, route, members: list[str], runs: dict) -> tuple[list[SimpleNamespace], dict]:
    """The route's own requests (unlabelled): scored once, reused when the saved ones match."""
    out_json = args.out / "decisions.json"
    requests: list[SimpleNamespace] = []
    request_scores: dict[str, list[list[float]]] = {}
    if str(args.route_requests) and args.route_requests.is_file():
        texts = [row["text"] for row in map(json.loads, args.route_requests.read_text().splitlines())
                 if row.get("route") == args.route]
        requests = [SimpleNamespace(prompt=t, options=list(route.options)) for t in texts]
        saved_requests = (json.loads(out_json.read_text()).get("route_requests", {}) if out_json.exists() else {})
        if ([r["text"] for r in saved_requests.get("requests", [])] == texts
                and saved_requests.get("options") == list(route.options)
                and all(m in saved_requests["requests"][0]["logprob_sums"] for m in members)):
            request_scores = {m: [r["logprob_sums"][m] for r in saved_requests["requests"]] for m in members}
            print(f"route requests: scores of {len(texts)} reused from {out_json}")
        else:
            started = time.perf_counter()
            for model in members:
                request_scores[model], _ = score_member(model, requests, args.threads)
            runs["route_requests_s"] = round(time.perf_counter() - started, 1)

    return requests, request_scores


class Votes:
    """The consensus service's vote on every held-out question (and on the route's own requests),
    with the members' own answers beside it."""

    def __init__(self, members, calibrations, held, scores, fit_all, requests, request_scores):
        self.members, self.calibrations, self.held = members, calibrations, held
        self.n = len(held)
        self.answers = np.array([q.answer for q in held])
        self.picks = {m: np.array([int(np.argmax(s)) for s in scores[m]]) for m in members}
        self.correct_m = {m: self.picks[m] == self.answers for m in members}
        majority = majority_labels(fit_all)
        self.correct_maj = np.array([q.options[q.answer] == majority[q.source] for q in held])
        self.outcomes, self.ballots_all = [], []
        for i, q in enumerate(held):
            ballots = self.ballots_for({m: scores[m][i] for m in members}, q.options)
            self.ballots_all.append(ballots)
            self.outcomes.append(voting.label_vote(ballots, q.options))
        self.requests, self.request_scores = requests, request_scores
        self.request_outcomes = [
            voting.label_vote(self.ballots_for({m: request_scores[m][i] for m in members}, r.options), r.options)
            for i, r in enumerate(requests)]
        self.request_consistency = np.array([o.consistency for o in self.request_outcomes])
        self.route_max = float(self.request_consistency.max()) if len(self.request_outcomes) else None
        vote_pick = np.array([q.options.index(o.answer) for q, o in zip(held, self.outcomes)])
        self.correct_v = vote_pick == self.answers
        self.consistency = np.array([o.consistency for o in self.outcomes])
        self.unanimous = np.array([all(a == 1.0 for a in o.agreement) for o in self.outcomes])

    def ballots_for(self, sums_by_member: dict[str, list[float]], options: list[str]) -> list[voting.Ballot]:
        """As the host answers and the consensus service turns the answers into ballots."""
        ballots = []
        for k, m in enumerate(self.members):
            sums = sums_by_member[m]
            dist = option_distribution(sums)  # T = 1, the host's label_distribution
            conf, _ = score_confidence(m, sums, self.calibrations[m])
            log_p = [math.log(max(float(p), 1e-45)) for p in dist]
            ballots.append(voting.Ballot(m, primary=k == 0, answer=options[int(np.argmax(dist))], confidence=conf,
                                         distribution=dict(zip(options, voting.calibrated_distribution(log_p, conf)))))
        return ballots

    def print_accuracy(self, primary: str, cal_note: dict) -> tuple[dict, dict]:
        """Accuracy of every member, the vote and the majority baseline, overall and per source."""
        members, n, held = self.members, self.n, self.held

        def acc(mask, sel=None):
            sel = np.ones(n, bool) if sel is None else sel
            return float(mask[sel].mean()) if sel.any() else float("nan")

        self.short = {m: _short(m, primary) for m in members}
        cols = ([(self.short[m], self.correct_m[m]) for m in members]
                + [("vote", self.correct_v), ("majority", self.correct_maj)])
        print(f"\naccuracy on the held-out sample (members = the same SmolLM2-135M weights through {len(members)} graphs)")
        width = max(10, *(len(c) for c, _ in cols))
        header = f"{'source':<38} {'n':>4} " + " ".join(f"{c:>{width}}" for c, _ in cols) + f" {'unanimous':>10}"
        print(header)
        per_source = {}
        sources = sorted({q.source for q in held})
        for name, sel in [("all", None)] + [(s, np.array([q.source == s for q in held])) for s in sources]:
            sel_mask = np.ones(n, bool) if sel is None else sel
            row = {c: round(acc(v, sel_mask), 4) for c, v in cols}
            row["n"] = int(sel_mask.sum())
            row["unanimous_share"] = round(float(self.unanimous[sel_mask].mean()), 4)
            per_source[name] = row
            print(f"{name:<38} {row['n']:>4} " + " ".join(f"{row[c]:{width}.3f}" for c, _ in cols)
                  + f" {row['unanimous_share']:10.3f}")
        agree_pairs = {f"{a} vs {b}": round(float((self.picks[a] == self.picks[b]).mean()), 4)
                       for ai, a in enumerate(members) for b in members[ai + 1:]}
        print("pairwise agreement of top option: " + ", ".join(f"{k}: {v:.3f}" for k, v in agree_pairs.items()))
        for m in members:
            print(f"  {m}: {cal_note[m]}")
        return per_source, agree_pairs

    def escalation(self, route, args) -> SimpleNamespace:
        """The risk-coverage curves (the vote, the best member alone), the threshold the rule picks,
        and where the route's own requests fall."""
        members, held, consistency = self.members, self.held, self.consistency
        member_acc = {m: float(self.correct_m[m].mean()) for m in members}
        best = max(members, key=lambda m: (member_acc[m], m == route.primary))
        rc = risk_coverage(self.outcomes, self.correct_v)
        # The best member alone, thresholded the same way (a one-ballot vote: consistency = its P(top option)).
        alone = [voting.label_vote([b for b in ballots if b.model == best], q.options)
                 for q, ballots in zip(held, self.ballots_all)]
        rc_best = risk_coverage(alone, self.correct_m[best])
        route_max = self.route_max
        highest_seen = max(float(np.max([o.consistency for o in self.outcomes])), route_max if route_max is not None else 0.0)
        chosen, rule = choose_threshold(rc, args.risk_target, args.min_answered, highest_seen)
        print("\nescalation (answered when consistency = P(verdict) >= threshold; calibrated distributions, as the "
              "consensus service combines them)")
        print(f"{'threshold':>9} {'escalated':>10} {'answered':>9} {'errors':>7} {'err|answered':>13} {'err/all':>8}"
              f"   | best member alone: {'answered':>8} {'err|answered':>13}")
        for r, rb in zip(rc, rc_best):
            if r["threshold"] not in TABLE_THRESHOLDS and r["threshold"] not in (chosen, route.consensus_threshold):
                continue
            ea = f"{r['error_among_answered']:.3f}" if r["error_among_answered"] is not None else "-"
            eb = f"{rb['error_among_answered']:.3f}" if rb["error_among_answered"] is not None else "-"
            mark = " <- chosen" if r["threshold"] == chosen else ""
            mark += " <- configured" if r["threshold"] == route.consensus_threshold else ""
            print(f"{r['threshold']:9.2f} {r['escalated']:10.3f} {r['answered']:9d} {r['errors']:7d} {ea:>13} "
                  f"{r['confident_error_share_of_all_questions']:8.3f}   | {'':>19} {rb['answered']:>8} {eb:>13}{mark}")
        print(f"consistency of the vote: max {consistency.max():.3f}, median {float(np.median(consistency)):.3f}; "
              f"best member alone: max P(top) {max(o.consistency for o in alone):.3f}")
        request_summary = {}
        if self.request_outcomes:
            requests, request_consistency = self.requests, self.request_consistency
            verdicts = Counter(o.answer for o in self.request_outcomes)
            raw_top = [max(option_distribution(self.request_scores[route.primary][i])) for i in range(len(requests))]
            request_summary = {
                "n": len(requests), "verdicts": dict(verdicts),
                "max_consistency": round(route_max, 4), "median_consistency": round(float(np.median(request_consistency)), 4),
                "answered_at_chosen": int((request_consistency >= chosen).sum()),
                "answered_at_configured": int((request_consistency >= (route.consensus_threshold or chosen)).sum()),
                "primary_raw_top_probability_median": round(float(np.median(raw_top)), 4),
                "primary_raw_top_probability_share_ge_0.8": round(float(np.mean(np.array(raw_top) >= 0.8)), 4),
            }
            print(f"the route's own requests ({args.route_requests.name}, route {args.route}, unlabelled): n={len(requests)}, "
                  f"verdicts {dict(verdicts)}; consistency max {route_max:.3f}, median {request_summary['median_consistency']:.3f}; "
                  f"answered at {chosen:.2f}: {request_summary['answered_at_chosen']}. (The primary's raw T=1 top "
                  f"probability: median {request_summary['primary_raw_top_probability_median']:.3f}, "
                  f"{request_summary['primary_raw_top_probability_share_ge_0.8']:.0%} >= 0.8: what a vote of raw "
                  "distributions would have called consistent)")
        print(f"threshold rule: {rule} -> {chosen:.2f} (configured: {route.consensus_threshold})")
        return SimpleNamespace(best=best, member_acc=member_acc, rc=rc, rc_best=rc_best, chosen=chosen, rule=rule,
                               request_summary=request_summary)

    def checks(self, escalation: SimpleNamespace, t: float) -> tuple[dict, dict]:
        """Check 1: the vote is never worse than its best member by more than noise. Check 2: weak or
        disagreeing members escalate rather than err confidently, at threshold `t`."""
        n, best, correct_v, consistency = self.n, escalation.best, self.correct_v, self.consistency
        diff_vec = correct_v.astype(float) - self.correct_m[best].astype(float)
        diff = float(diff_vec.mean())
        se_paired = float(diff_vec.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
        p_best = escalation.member_acc[best]
        se_binom = math.sqrt(p_best * (1 - p_best) / n)
        check1 = {
            "best_member": best, "best_member_accuracy": round(p_best, 4), "vote_accuracy": round(float(correct_v.mean()), 4),
            "difference": round(diff, 4), "binomial_se_of_best_accuracy": round(se_binom, 4),
            "paired_se_of_difference": round(se_paired, 4),
            "questions_where_vote_and_best_differ_in_correctness": int((diff_vec != 0).sum()),
            "passes_within_2se": bool(diff >= -2 * max(se_binom, se_paired if math.isfinite(se_paired) else 0.0)),
        }
        answered = consistency >= t
        wrong = ~correct_v
        disagree = ~self.unanimous
        check2 = {
            "threshold": t,
            "errors_total": int(wrong.sum()),
            "confident_errors": int((wrong & answered).sum()),
            "share_of_wrong_answers_with_consistency_ge_threshold": round(float((wrong & answered).sum() / max(wrong.sum(), 1)), 4),
            "share_of_right_answers_with_consistency_ge_threshold": round(float((correct_v & answered).sum() / max(correct_v.sum(), 1)), 4),
            "escalated_share": round(float((~answered).mean()), 4),
            "error_among_answered": round(float((wrong & answered).sum() / answered.sum()), 4) if answered.any() else None,
            "error_without_escalation": round(float(wrong.mean()), 4),
            "disagreeing_questions": int(disagree.sum()),
            "disagreeing_escalated_share": round(float((~answered & disagree).sum() / disagree.sum()), 4) if disagree.any() else None,
            "mean_consistency_wrong": round(float(consistency[wrong].mean()), 4) if wrong.any() else None,
            "mean_consistency_right": round(float(consistency[correct_v].mean()), 4) if correct_v.any() else None,
        }
        print(f"\ncheck 1 (vote never worse than its best member by more than noise): best member {best} "
              f"{p_best:.3f}, vote {correct_v.mean():.3f}, difference {diff:+.3f} "
              f"(binomial SE of one accuracy {se_binom:.3f}; paired SE of the difference {se_paired:.3f}; "
              f"{check1['questions_where_vote_and_best_differ_in_correctness']} questions differ) -> "
              f"{'within noise' if check1['passes_within_2se'] else 'WORSE than 2 SE'}")
        print(f"check 2 (weak/disagreeing models escalate rather than err confidently), threshold {t}: "
              f"{check2['confident_errors']}/{check2['errors_total']} wrong answers have consistency >= {t} "
              f"({check2['share_of_wrong_answers_with_consistency_ge_threshold']:.3f}; right answers: "
              f"{check2['share_of_right_answers_with_consistency_ge_threshold']:.3f}); escalated {check2['escalated_share']:.3f}; "
              f"error among answered {check2['error_among_answered']} vs {check2['error_without_escalation']:.3f} unescalated; "
              f"members disagree on {check2['disagreeing_questions']} questions, "
              f"{check2['disagreeing_escalated_share']} of those escalated")
        return check1, check2


def plot_risk_coverage(args, votes: Votes, escalation: SimpleNamespace, per_source: dict) -> None:
    plt = fragment.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 4))
    cov = [1 - r["escalated"] for r in escalation.rc]
    risk = [r["error_among_answered"] if r["error_among_answered"] is not None else np.nan for r in escalation.rc]
    ax.plot(cov, risk, ".-", label=f"consensus vote ({len(votes.members)} graphs of SmolLM2-135M)")
    cov_b = [1 - r["escalated"] for r in escalation.rc_best]
    risk_b = [r["error_among_answered"] if r["error_among_answered"] is not None else np.nan for r in escalation.rc_best]
    ax.plot(cov_b, risk_b, ".:", color="tab:orange", label=f"best member alone ({votes.short[escalation.best]})")
    for r, c, k in zip(escalation.rc, cov, risk):
        if np.isfinite(k) and (r["threshold"] in TABLE_THRESHOLDS or r["threshold"] == escalation.chosen):
            ax.annotate(f"{r['threshold']:.2f}", (c, k), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1 - per_source["all"]["majority"], ls="--", color="grey", label="majority-class error")
    ax.axhline(args.risk_target, ls=":", color="red", lw=0.8, label=f"risk target {args.risk_target:.0%}")
    ax.text(0.02, 0.02, f"chosen threshold {escalation.chosen:.2f}: "
            f"{int((votes.consistency >= escalation.chosen).sum())}/{votes.n} answered",
            transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("coverage (share answered)")
    ax.set_ylabel("error among answered")
    ax.set_title(f"route {args.route}: decisions-dev held-out sample (n={votes.n})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = args.out / "decisions_risk_coverage.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def write_fragment(result: dict, out: Path) -> Path:
    """<out>/decisions.md from the bench's result (the dict written to decisions.json): the tables
    main() prints, and the risk-coverage PNG when it is there."""
    members = result["members"]
    accuracy = result["accuracy"]
    columns = [c for c in accuracy["all"] if c not in ("n", "unanimous_share")]  # members (short), vote, majority
    short = dict(zip(members, columns))
    runs = result.get("runs", {})
    rule = result["threshold_rule"]
    chosen, configured = rule["chosen"], rule["configured"]
    machine_info = result.get("machine", {})
    parts = [
        f"{result['n']} held-out questions of `{Path(result['data']).name}` ({result['split']}); route "
        f"`{result['route']}` of `{Path(result['config']).name}`; created {result['created_at']} on "
        f"{machine_info.get('cpu', '?')}, {machine_info.get('cores', '?')} cores (load average "
        f"{machine_info.get('load_average', '?')}). Members: {result['members_note']}. Ballot: {result['ballot']}. "
        f"A question is answered when the vote's consistency = P(verdict) >= threshold, else escalated.",
        fragment.table(
            ["member", "column", "role", "accuracy", "calibration", "load s", "score s"],
            [[m, short[m], "primary" if k == 0 else "validator", _pct(accuracy["all"][short[m]]),
              result["calibration"][m], runs.get(m, {}).get("load_s"), runs.get(m, {}).get("score_s")]
             for k, m in enumerate(members)],
            title="Members"),
        fragment.table(
            ["source", "n", *columns, "unanimous"],
            [[name, row["n"], *(f"{row[c]:.3f}" for c in columns), f"{row['unanimous_share']:.3f}"]
             for name, row in accuracy.items()],
            title=f"Accuracy on the held-out sample (vote = the consensus vote; majority = {result['majority_baseline']})"),
    ]
    agree = result.get("pairwise_top_option_agreement", {})
    if agree:
        parts.append("Pairwise agreement of the top option: "
                     + ", ".join(f"{k}: {v:.3f}" for k, v in agree.items()) + ".")
    best = result["risk_coverage_best_member_alone"]
    rows = []
    for r, rb in zip(result["risk_coverage"], best["rows"]):
        if r["threshold"] not in TABLE_THRESHOLDS and r["threshold"] not in (chosen, configured):
            continue
        mark = ", ".join(label for label, t in (("chosen", chosen), ("configured", configured)) if r["threshold"] == t)
        rows.append([f"{r['threshold']:.2f}", _pct(r["escalated"]), r["answered"], r["errors"],
                     _pct(r["error_among_answered"]), _pct(r["confident_error_share_of_all_questions"]),
                     rb["answered"], _pct(rb["error_among_answered"]), mark])
    parts.append(fragment.table(
        ["threshold", "escalated", "answered", "errors", "error among answered", "errors / all",
         f"{best['model']} alone: answered", "its error among answered", ""], rows,
        title="Escalation: risk-coverage of the vote (calibrated distributions, as the consensus service combines them)"))
    parts.append(fragment.table(
        ["rule", "chosen", "configured", "vote consistency max", "median", "why"],
        [[f"widest coverage with error among answered <= {rule['risk_target']:.0%} (>= {rule['min_answered']} "
          "answered), else escalate everything", f"{chosen:.2f}", configured, f"{rule['max_vote_consistency']:.3f}",
          f"{rule['median_vote_consistency']:.3f}", rule["why"]]],
        title="Threshold rule"))
    requests = result.get("route_requests", {})
    if requests.get("n"):
        parts.append(fragment.table(
            ["requests", "n", "verdicts", "consistency max", "median", "answered at chosen", "at configured",
             "primary's raw T=1 top probability: median", "share >= 0.8"],
            [[f"`{Path(requests['data']).name}`, route {result['route']} (unlabelled)", requests["n"],
              ", ".join(f"{k}: {v}" for k, v in requests["verdicts"].items()), f"{requests['max_consistency']:.3f}",
              f"{requests['median_consistency']:.3f}", requests["answered_at_chosen"], requests["answered_at_configured"],
              f"{requests['primary_raw_top_probability_median']:.3f}",
              _pct(requests["primary_raw_top_probability_share_ge_0.8"])]],
            title="The route's own requests"))
    c1, c2 = result["check_vote_vs_best_member"], result["check_confident_errors"]
    parts.append(fragment.table(
        ["check", "measured", "result"],
        [["vote never worse than its best member by more than noise",
          f"{c1['best_member']} {c1['best_member_accuracy']:.3f}, vote {c1['vote_accuracy']:.3f}, difference "
          f"{c1['difference']:+.3f} (binomial SE {c1['binomial_se_of_best_accuracy']:.3f}, paired SE "
          f"{c1['paired_se_of_difference']:.3f})", "within noise" if c1["passes_within_2se"] else "WORSE than 2 SE"],
         [f"weak/disagreeing models escalate rather than err confidently (threshold {c2['threshold']})",
          f"{c2['confident_errors']}/{c2['errors_total']} wrong answers have consistency >= threshold; escalated "
          f"{_pct(c2['escalated_share'])}; error among answered {_pct(c2['error_among_answered'])} vs "
          f"{_pct(c2['error_without_escalation'])} unescalated; members disagree on {c2['disagreeing_questions']} "
          f"questions, {_pct(c2['disagreeing_escalated_share'])} of those escalated",
          "no confident errors" if c2["confident_errors"] == 0 else f"{c2['confident_errors']} confident errors"]],
        title="Checks"))
    if (out / "decisions_risk_coverage.png").exists():
        parts.append("![risk-coverage of the consensus vote](decisions_risk_coverage.png)")
    return fragment.write(out, "decisions", parts)


def _short(model: str, primary: str) -> str:
    """A column name: the part after the common SmolLM2 prefix ("fp32" for the optimum export)."""
    base = "smollm2-135m-instruct"
    name = model.removeprefix(base).lstrip("-") or "optimum"
    return f"{name}*" if model == primary else name


if __name__ == "__main__":
    raise SystemExit(main())
