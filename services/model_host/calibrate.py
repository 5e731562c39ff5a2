"""Fits the temperature that turns Score's option distribution into a calibrated confidence.

    python -m services.model_host.calibrate [--data decisions-dev.jsonl] [--per-source 50]

Runs the real model in-process through the code the host uses (`load_runtime`,
`DecoderRuntime.render_chat` / `encode` / `score_options`), on labelled decision
questions (`{"source", "prompt", "options", "answer"}` a line):

1. split deterministically by a hash of the prompt: even hashes fit, odd hashes are
   held out; within each source the first `--per-source` of each half (in hash
   order) are kept, so the run stays within minutes on two CPU cores;
2. score the fit half with each candidate prompt format and keep the most accurate
   (lower NLL breaks ties): Score's prompt comes from the caller, so the chosen
   format is written to the calibration file for callers (consensus) to reuse;
3. fit one temperature T minimising the negative log-likelihood of the right option
   on the fit half (golden-section search on log T; no scipy);
4. report accuracy, NLL and ECE before (T=1) and after on the held-out half, overall
   and per source, and write config/calibration/<model>.json, which
   `services.model_host.calibration.load_score_calibration` reads.

Temperature scaling changes confidence, never which option wins: accuracy is the
same before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common import decision_prompt
from services.common.calibration_math import expected_calibration_error, fit_temperature, log_softmax, mean_nll, softmax
from services.model_host.calibration import CALIBRATION_DIR

DEFAULT_DATA = Path("/work/shared/eval/decisions-dev.jsonl")
DEFAULT_MODEL = "smollm2-135m-instruct"
# Option log-likelihood sums of a small LM can be far too sharp: allow a much flatter T than a classifier needs.
MAX_TEMPERATURE = 1000.0

# Candidate prompt formats. `system` None keeps the model's default system prompt;
# `user` is a str.format template with {prompt} and {options} (the options joined
# with `joiner`). The chat template is applied by the model host (Score `messages`).
FORMATS: dict[str, dict] = {
    "user-list": {
        "system": None,
        "user": "{prompt}\n\nAnswer with one of: {options}.",
        "joiner": ", ",
    },
    "system-options": {  # the wording the consensus service asks in
        "system": decision_prompt.SYSTEM,
        "user": decision_prompt.USER,
        "joiner": decision_prompt.OPTIONS_JOINER,
    },
}


def format_messages(fmt: dict, prompt: str, options: list[str]) -> list[tuple[str, str]]:
    """The (role, content) messages a caller sends to Score for this format."""
    messages = [("system", fmt["system"])] if fmt.get("system") else []
    messages.append(("user", fmt["user"].format(prompt=prompt, options=fmt["joiner"].join(options))))
    return messages


@dataclass
class Question:
    source: str
    prompt: str
    options: list[str]
    answer: int
    digest: str


def load_questions(path: Path) -> list[Question]:
    questions = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if row["answer"] not in row["options"]:
                raise ValueError(f"{path}:{number}: answer {row['answer']!r} is not one of the options {row['options']}")
            digest = hashlib.sha256(row["prompt"].encode("utf-8")).hexdigest()
            questions.append(Question(row["source"], row["prompt"], list(row["options"]), row["options"].index(row["answer"]), digest))
    return questions


def split(questions: list[Question], per_source: int) -> tuple[list[Question], list[Question]]:
    """Fit / held-out by the prompt hash's parity; at most `per_source` of each per source, in hash order."""
    halves: dict[tuple[str, int], list[Question]] = defaultdict(list)
    for q in questions:
        halves[(q.source, int(q.digest, 16) % 2)].append(q)
    fit, held_out = [], []
    for (source, parity), items in sorted(halves.items()):
        items.sort(key=lambda q: q.digest)
        (fit if parity == 0 else held_out).extend(items[:per_source] if per_source > 0 else items)
    return fit, held_out


# --------------------------------------------------------------------------- metrics


def metrics(logits: list[np.ndarray], answers: list[int], temperature: float) -> dict:
    probs = [softmax(np.asarray(z, dtype=np.float64), temperature) for z in logits]
    picks = np.array([int(np.argmax(p)) for p in probs])
    correct = (picks == np.array(answers)).astype(np.float64)
    confidence = np.array([p.max() for p in probs])
    return {
        "n": len(answers),
        "accuracy": float(correct.mean()) if len(answers) else 0.0,
        "nll": mean_nll(logits, answers, temperature),
        "ece": expected_calibration_error(confidence, correct) if len(answers) else 0.0,
        "mean_confidence": float(confidence.mean()) if len(answers) else 0.0,
    }


def majority_accuracy(questions: list[Question], reference: list[Question]) -> float:
    """Accuracy of always answering the most frequent answer of `reference` (per source)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for q in reference:
        counts[q.source][q.options[q.answer]] += 1
    hits = sum(1 for q in questions if counts[q.source] and max(counts[q.source], key=counts[q.source].get) == q.options[q.answer])
    return hits / max(len(questions), 1)


def option_priors(questions: list[Question], logits: list[np.ndarray]) -> dict[tuple[str, ...], np.ndarray]:
    """Mean log-distribution over the options, per option set: the model's bias towards a label."""
    groups: dict[tuple[str, ...], list[np.ndarray]] = defaultdict(list)
    for q, z in zip(questions, logits):
        groups[tuple(q.options)].append(log_softmax(np.asarray(z, dtype=np.float64)))
    return {key: np.mean(rows, axis=0) for key, rows in groups.items()}


def debiased(questions: list[Question], logits: list[np.ndarray], priors: dict) -> list[np.ndarray]:
    """Logits minus the option set's prior (contextual calibration); unchanged for unseen option sets."""
    return [np.asarray(z, dtype=np.float64) - priors.get(tuple(q.options), 0.0) for q, z in zip(questions, logits)]


# --------------------------------------------------------------------------- scoring


class SavedScores:
    """Option log-likelihoods from an earlier `--report`, checked against the current split."""

    def __init__(self, path: Path, fit: list[Question], held_out: list[Question]):
        report = json.loads(path.read_text(encoding="utf-8"))
        self.model_version = report["calibration"].get("model_version", "")
        self.fit_rows, self.held_rows = report["fit"], report["held_out"]
        self.held_format = report.get("held_out_format") or report["calibration"]["score"]["prompt_format"]["name"]
        for label, rows, questions in (("fit", self.fit_rows, fit), ("held-out", self.held_rows, held_out)):
            if [r["digest"] for r in rows] != [q.digest[:16] for q in questions]:
                raise SystemExit(f"{path}: its {label} questions differ from this split; run without --from-report")

    def fit_logits(self, name: str) -> list[np.ndarray]:
        if name not in self.fit_rows[0]["logits"]:
            raise SystemExit(f"the report has no fit scores for format {name}; run without --from-report")
        return [np.asarray(r["logits"][name]) for r in self.fit_rows]

    def held_logits(self, name: str) -> list[np.ndarray]:
        if name != self.held_format:
            raise SystemExit(f"the report's held-out scores use format {self.held_format}, not {name}")
        return [np.asarray(r["logits"]) for r in self.held_rows]


class LiveScores:
    """Option log-likelihoods computed now, by the model itself (the interface of SavedScores)."""

    def __init__(self, model: str, repository: str | None, threads: int, fit: list[Question], held_out: list[Question]):
        from services.common.model_repository import ModelRepository
        from services.model_host.loader import SessionSettings, default_optimized_cache, load_runtime

        started = time.perf_counter()
        manifest = ModelRepository(repository).get(model, None)
        self.runtime = load_runtime(manifest, SessionSettings(intra_op_threads=threads,
                                                              optimized_cache=default_optimized_cache()))
        self.model_version = manifest.version
        self.fit, self.held_out = fit, held_out
        print(f"model: {manifest.reference} loaded in {time.perf_counter() - started:.1f} s ({threads} thread(s))")

    def fit_logits(self, name: str) -> list[np.ndarray]:
        return score_all(self.runtime, self.fit, FORMATS[name], f"fit/{name}")

    def held_logits(self, name: str) -> list[np.ndarray]:
        return score_all(self.runtime, self.held_out, FORMATS[name], f"held-out/{name}")


def score_all(runtime, questions: list[Question], fmt: dict, label: str) -> list[np.ndarray]:
    out = []
    started = time.perf_counter()
    for number, q in enumerate(questions, 1):
        ids = runtime.encode(runtime.render_chat(format_messages(fmt, q.prompt, q.options)))
        sums, _ = runtime.score_options(ids, q.options)
        out.append(np.asarray(sums, dtype=np.float64))
        if number % 25 == 0 or number == len(questions):
            elapsed = time.perf_counter() - started
            print(f"  {label}: {number}/{len(questions)} scored, {elapsed:.0f} s ({elapsed / number * 1000:.0f} ms each)",
                  file=sys.stderr, flush=True)
    return out


def by_source(questions: list[Question], logits: list[np.ndarray], temperature: float) -> dict[str, dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(questions):
        groups[q.source].append(i)
    return {
        source: metrics([logits[i] for i in idx], [questions[i].answer for i in idx], temperature)
        for source, idx in sorted(groups.items())
    }


def _row(name: str, before: dict, after: dict, majority: float | None = None) -> str:
    maj = f"{majority:8.3f}" if majority is not None else " " * 8
    return (f"{name:<38} {before['n']:>4} {before['accuracy']:8.3f} {maj} {before['nll']:8.3f} {after['nll']:8.3f} "
            f"{before['ece']:8.3f} {after['ece']:8.3f} {before['mean_confidence']:8.3f} {after['mean_confidence']:8.3f}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.model_host.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"labelled decisions JSONL (default {DEFAULT_DATA})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="fleet name of a text-generation model")
    parser.add_argument("--repository", default=None, help="model repository root (default: the user cache dir)")
    parser.add_argument("--per-source", type=int, default=50,
                        help="questions per source in each half (0 = all); default 50 -> 150 fit + 150 held out")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                        help="candidate prompt formats compared on the fit half")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (default 1: fastest on a busy 2-core machine; results do not depend on it)")
    parser.add_argument("--out", type=Path, default=None, help="calibration file (default config/calibration/<model>.json)")
    parser.add_argument("--report", type=Path, default=None, help="also write the full report (raw scores included) as JSON here")
    parser.add_argument("--from-report", type=Path, default=None,
                        help="reuse the option log-likelihoods saved by an earlier --report run (same data and split) "
                             "instead of running the model: refits and rewrites in a second")
    parser.add_argument("--dry-run", action="store_true", help="report only; do not write the calibration file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"--data {args.data} does not exist (the shared eval folder is not on every machine; pass the file)")
    questions = load_questions(args.data)
    fit, held_out = split(questions, args.per_source)
    sources = sorted({q.source for q in questions})
    print(f"data: {args.data} ({len(questions)} questions, {len(sources)} sources); "
          f"fit {len(fit)} / held out {len(held_out)} (hash split, {args.per_source or 'all'} per source per half)")

    started = time.perf_counter()
    if args.from_report:
        scores = SavedScores(args.from_report, fit, held_out)
        print(f"scores: reused from {args.from_report} (model version {scores.model_version})")
    else:
        scores = LiveScores(args.model, args.repository, args.threads, fit, held_out)
    candidates = compare_formats(scores, fit, args.formats)
    chosen = max(candidates, key=lambda n: (round(candidates[n]["metrics"]["accuracy"], 6), -candidates[n]["metrics"]["nll"]))
    print(f"chosen: {chosen}")
    fitted = Fitted(fit, held_out, candidates[chosen]["logits"], scores.held_logits(chosen))
    print(f"\nfitted T = {fitted.temperature:.3f} (fit NLL {candidates[chosen]['metrics']['nll']:.4f} -> "
          f"{metrics(fitted.fit_logits, fitted.fit_answers, fitted.temperature)['nll']:.4f})")
    fitted.print_held_out(chosen)
    diagnostic = fitted.option_prior_diagnostic()
    print(f"\n{time.perf_counter() - started:.0f} s in all")

    calibration = calibration_record(args, scores.model_version, fitted, chosen, candidates, diagnostic)
    if not args.dry_run:
        out = args.out or CALIBRATION_DIR / f"{args.model}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(calibration, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    if args.report:
        write_report(args.report, calibration, fitted, chosen, candidates)
    return 0


def compare_formats(scores, fit: list[Question], formats: list[str]) -> dict[str, dict]:
    """Each candidate prompt format's fit-half logits and metrics at T = 1, printed as a table."""
    answers = [q.answer for q in fit]
    candidates = {}
    for name in formats:
        logits = scores.fit_logits(name)
        candidates[name] = {"logits": logits, "metrics": metrics(logits, answers, 1.0), "by_source": by_source(fit, logits, 1.0)}
    print("\nprompt formats on the fit half (T=1):")
    print(f"{'format':<18} {'accuracy':>9} {'nll':>8} {'ece':>8}   per source accuracy")
    for name, c in candidates.items():
        m = c["metrics"]
        per = ", ".join(f"{s.split('/')[-1]} {v['accuracy']:.3f}" for s, v in c["by_source"].items())
        print(f"{name:<18} {m['accuracy']:9.3f} {m['nll']:8.3f} {m['ece']:8.3f}   {per}")
    return candidates


class Fitted:
    """The temperature fitted on the fit half, and what it does on the held-out half."""

    def __init__(self, fit: list[Question], held_out: list[Question], fit_logits: list[np.ndarray],
                 held_logits: list[np.ndarray]):
        self.fit, self.held_out = fit, held_out
        self.fit_logits, self.held_logits = fit_logits, held_logits
        self.fit_answers, self.held_answers = [q.answer for q in fit], [q.answer for q in held_out]
        self.temperature = fit_temperature(fit_logits, self.fit_answers, high=MAX_TEMPERATURE)
        self.before = metrics(held_logits, self.held_answers, 1.0)
        self.after = metrics(held_logits, self.held_answers, self.temperature)
        self.src_before = by_source(held_out, held_logits, 1.0)
        self.src_after = by_source(held_out, held_logits, self.temperature)
        self.majority_all = majority_accuracy(held_out, fit)
        self.majority = {s: majority_accuracy([q for q in held_out if q.source == s], fit) for s in self.src_before}

    def print_held_out(self, chosen: str) -> None:
        print(f"\nheld-out half, format {chosen}, T = {self.temperature:.3f} (accuracy does not change with T)")
        print(f"{'split':<38} {'n':>4} {'accuracy':>8} {'majority':>8} {'nll T=1':>8} {'nll T':>8} {'ece T=1':>8} {'ece T':>8} "
              f"{'conf T=1':>8} {'conf T':>8}")
        print(_row("all", self.before, self.after, self.majority_all))
        for s in self.src_before:
            print(_row(s, self.src_before[s], self.src_after[s], self.majority[s]))

    def option_prior_diagnostic(self) -> dict:
        """Diagnostic only (the host applies a temperature, nothing else): how much of the error is a
        fixed preference for one label. Subtracting each option set's mean log-distribution on the
        fit half (contextual calibration) is something a caller that knows its option set could do."""
        priors = option_priors(self.fit, self.fit_logits)
        temperature = fit_temperature(debiased(self.fit, self.fit_logits, priors), self.fit_answers, high=MAX_TEMPERATURE)
        held_debiased = debiased(self.held_out, self.held_logits, priors)
        overall = metrics(held_debiased, self.held_answers, temperature)
        per_source = by_source(self.held_out, held_debiased, temperature)
        print(f"\ndiagnostic, not applied by the host: option-prior correction fitted on the fit half, then T = {temperature:.3f}")
        print(f"{'split':<38} {'n':>4} {'accuracy':>8} {'nll':>8} {'ece':>8}")
        for name, m in [("all", overall), *per_source.items()]:
            print(f"{name:<38} {m['n']:>4} {m['accuracy']:8.3f} {m['nll']:8.3f} {m['ece']:8.3f}")
        return {
            "note": "not applied by the host; held-out metrics if a caller subtracted each option set's mean "
                    "log-distribution on the fit half (priors below) and then used temperature T",
            "temperature": round(temperature, 4),
            "priors": {" / ".join(k): [round(float(x), 4) for x in v] for k, v in priors.items()},
            "accuracy": round(overall["accuracy"], 4),
            "nll": round(overall["nll"], 4),
            "ece": round(overall["ece"], 4),
            "per_source_accuracy": {k: round(v["accuracy"], 4) for k, v in per_source.items()},
        }


def calibration_record(args, model_version: str, fitted: Fitted, chosen: str, candidates: dict, diagnostic: dict) -> dict:
    """The calibration file: what the host applies (`score.temperature`) and how it was measured."""
    fmt = FORMATS[chosen]
    before, after = fitted.before, fitted.after
    return {
        "model": args.model,
        "model_version": model_version,
        "created_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": "python -m services.model_host.calibrate",
        "score": {
            "temperature": round(fitted.temperature, 4),
            "fit_on": f"{len(fitted.fit)} BIG-bench decisions ({args.data.name})",
            "ece_before": round(before["ece"], 4),
            "ece_after": round(after["ece"], 4),
            "nll_before": round(before["nll"], 4),
            "nll_after": round(after["nll"], 4),
            "accuracy": round(before["accuracy"], 4),
            "majority_baseline_accuracy": round(fitted.majority_all, 4),
            "n_fit": len(fitted.fit),
            "n_eval": len(fitted.held_out),
            "split": f"sha256(prompt) parity: even fit, odd held out; first {args.per_source or 'all'} per source per half in hash order",
            "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
            "prompt_format": {
                "name": chosen,
                "system": fmt["system"],
                "user": fmt["user"],
                "options_joiner": fmt["joiner"],
                "how": "Score `messages`: [system if not null (null = the model's default system prompt, i.e. send no "
                       "system message)] + user = user.format(prompt=PROMPT, options=options_joiner.join(OPTIONS)); "
                       "options passed unchanged in Score `options`",
            },
            "formats_compared_on_fit": {n: {k: round(v, 4) for k, v in c["metrics"].items()} for n, c in candidates.items()},
            "diagnostic_option_prior_correction": diagnostic,
            "per_source": {
                s: {
                    "n": fitted.src_before[s]["n"],
                    "accuracy": round(fitted.src_before[s]["accuracy"], 4),
                    "majority_baseline_accuracy": round(fitted.majority[s], 4),
                    "nll_before": round(fitted.src_before[s]["nll"], 4),
                    "nll_after": round(fitted.src_after[s]["nll"], 4),
                    "ece_before": round(fitted.src_before[s]["ece"], 4),
                    "ece_after": round(fitted.src_after[s]["ece"], 4),
                }
                for s in fitted.src_before
            },
        },
    }


def write_report(path: Path, calibration: dict, fitted: Fitted, chosen: str, candidates: dict) -> None:
    """The calibration plus every question's raw option scores (what --from-report reads back)."""
    report = {
        "calibration": calibration,
        "fit": [{"source": q.source, "answer": q.answer, "digest": q.digest[:16],
                 "logits": {n: c["logits"][i].tolist() for n, c in candidates.items()}} for i, q in enumerate(fitted.fit)],
        "held_out_format": chosen,
        "held_out": [{"source": q.source, "answer": q.answer, "digest": q.digest[:16], "logits": fitted.held_logits[i].tolist()}
                     for i, q in enumerate(fitted.held_out)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
