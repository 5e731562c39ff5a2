"""Decode speed and greedy agreement of SmolLM2-135M graphs, in this process, through
the model host's real DecoderRuntime (`load_runtime`, 2 intra-op threads).

    python bench/decode_graphs.py [--models A,B,...] [--rounds 2] [--quick] [--out bench/results]

Graphs: the optimum fp32 export (the reference), the fused graphs written by
`python -m services.fleet.fused_versions` (fp32, int8, int4 and int4-exact; those not built are
skipped) and the per-layer quantized default the fleet builds with the quantizer (mixed).
For each: size on disk, prefill of a ~49-token chat prompt (median of 5), decode ms/token (median of the 31
one-token steps that produce tokens 2..32), and greedy tokens equal to the reference
on three chat prompts (32 tokens each, stop tokens ignored; "equal" = the length of
the common prefix). Timings run in `--rounds` rounds, models interleaved inside each
round, so a burst of load from other jobs hits every model alike; the table shows
each round and the median of the rounds. Nothing is asserted: the machine is shared
and noisy (the load average is recorded). Writes decode_graphs.json and decode_graphs.md
(the report fragment). `--quick`: one round, the reference and the fused fp32 graph only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np
import onnxruntime as ort

import fragment
from services.common.model_repository import ModelRepository
from services.model_host.loader import SessionSettings, load_runtime

REFERENCE = "smollm2-135m-instruct"
MODELS = [REFERENCE, "smollm2-135m-instruct-fused", "smollm2-135m-instruct-fused-mixed",
          "smollm2-135m-instruct-fused-int8", "smollm2-135m-instruct-fused-int4", "smollm2-135m-instruct-fused-int4-exact"]
# With the default system prompt this renders to 49 tokens.
TIMING_PROMPT = "Write a short story about a small robot who slowly learns to paint, in three short sentences."
AGREEMENT_PROMPTS = [
    TIMING_PROMPT,
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
]
NEW_TOKENS = 32
PREFILL_REPEATS = 5


def greedy(runtime, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> tuple[list[int], float, list[float]]:
    """Greedy tokens (stop tokens ignored), prefill seconds, and each decode step's seconds."""
    started = time.perf_counter()
    state, logits = runtime.prefill(prompt_ids)
    prefill_s = time.perf_counter() - started
    tokens, steps = [int(np.argmax(logits))], []
    while len(tokens) < new_tokens:
        started = time.perf_counter()
        logits = runtime.step(state, tokens[-1])
        steps.append(time.perf_counter() - started)
        tokens.append(int(np.argmax(logits)))
    return tokens, prefill_s, steps


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def teacher_forced(runtime, reference_runtime, reference_outputs: list[list[int]]) -> list[int]:
    """Positions (of NEW_TOKENS) where the model's top-1 equals the reference's greedy token,
    fed the reference's tokens: unlike the common prefix, one early near-tie does not
    hide the rest."""
    matches = []
    for prompt, tokens in zip(AGREEMENT_PROMPTS, reference_outputs):
        ids = reference_runtime.encode(reference_runtime.render_chat([("user", prompt)]))
        sequence = np.asarray([ids + tokens[:-1]], np.int64)
        full, _ = runtime._run(sequence, np.ones_like(sequence), runtime._empty_past(1), 0)
        predicted = np.argmax(full[0, len(ids) - 1 :], axis=-1)
        matches.append(int(np.sum(predicted == np.asarray(tokens))))
    return matches


def measure(runtime, prompt_ids: list[int]) -> dict:
    greedy(runtime, prompt_ids, 4)  # warm-up
    prefills = []
    for _ in range(PREFILL_REPEATS):
        started = time.perf_counter()
        runtime.prefill(prompt_ids)
        prefills.append(time.perf_counter() - started)
    _, _, steps = greedy(runtime, prompt_ids)
    return {"prefill_ms": statistics.median(prefills) * 1e3, "decode_ms": statistics.median(steps) * 1e3,
            "decode_min_ms": min(steps) * 1e3, "decode_steps": len(steps)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated repository names; the first is the reference")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="one round, the reference and the fused fp32 graph")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
        if args.models == parser.get_default("models"):
            args.models = ",".join(MODELS[:2])

    repository = ModelRepository(args.repository)
    names = [n for n in args.models.split(",") if n]
    missing = [n for n in names if not repository.exists(n)]
    if missing:
        print(f"not in {repository.root}: {', '.join(missing)} (build with python -m services.fleet.fused_versions)")
        names = [n for n in names if n not in missing]
    settings = SessionSettings(intra_op_threads=args.threads)
    load_before = os.getloadavg()

    runtimes, rows = {}, {}
    for name in names:
        manifest = repository.get(name)
        started = time.perf_counter()
        runtimes[name] = load_runtime(manifest, settings)
        rows[name] = {
            "model": manifest.reference,
            "graph": manifest.extra.get("graph", "optimum"),
            "bits": manifest.extra.get("bits", 32),
            "size_mib": round(manifest.size_bytes / 2**20, 1),
            "model_onnx_mib": round(manifest.path_of("model").stat().st_size / 2**20, 1),
            "load_s": round(time.perf_counter() - started, 2),
            "rounds": [],
        }

    # Greedy agreement with the reference (the first model).
    reference = names[0]
    texts, outputs = {}, {}
    for name, runtime in runtimes.items():
        prompts = [runtime.encode(runtime.render_chat([("user", p)])) for p in AGREEMENT_PROMPTS]
        outputs[name] = [greedy(runtime, ids)[0] for ids in prompts]
        texts[name] = [runtime.tokenizer.decode(tokens) for tokens in outputs[name]]
    for name in names:
        equal = [common_prefix(a, b) for a, b in zip(outputs[name], outputs[reference])]
        rows[name]["equal_tokens"] = equal
        rows[name]["teacher_forced_top1"] = teacher_forced(runtimes[name], runtimes[reference], outputs[reference])
        rows[name]["texts"] = texts[name]

    timing_ids = runtimes[reference].encode(runtimes[reference].render_chat([("user", TIMING_PROMPT)]))
    for round_index in range(args.rounds):
        for name, runtime in runtimes.items():
            rows[name]["rounds"].append(measure(runtime, timing_ids))
    for row in rows.values():
        for key in ("prefill_ms", "decode_ms"):
            row[key] = round(statistics.median(r[key] for r in row["rounds"]), 2)
        row["decode_min_ms"] = round(min(r["decode_min_ms"] for r in row["rounds"]), 2)

    lines = []
    header = (f"| graph | bits | size MiB | prefill {len(timing_ids)} tok ms (rounds) | decode ms/token (rounds) "
              f"| greedy tokens equal to {reference} | top-1 equal, teacher-forced |")
    lines += [header, "|---|---:|---:|---:|---:|---|---|"]
    for name, row in rows.items():
        pre = " / ".join(f"{r['prefill_ms']:.0f}" for r in row["rounds"])
        dec = " / ".join(f"{r['decode_ms']:.1f}" for r in row["rounds"])
        equal = ", ".join(f"{e}/{NEW_TOKENS}" for e in row["equal_tokens"])
        forced = ", ".join(str(e) for e in row["teacher_forced_top1"])
        lines.append(f"| {name} | {row['bits']} | {row['size_mib']:.0f} | {row['prefill_ms']:.0f} ({pre}) "
                     f"| {row['decode_ms']:.2f} ({dec}) | {equal} | {forced} |")
    load_after = os.getloadavg()
    context = (f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} ({os.cpu_count()} cores; "
               f"above the core count means contention)")
    print("\n".join(lines) + "\n" + context)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "decode_graphs",
        "created_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "onnxruntime": ort.__version__, "intra_op_threads": args.threads,
                    "load_average_before": load_before, "load_average_after": load_after},
        "timing_prompt_tokens": len(timing_ids),
        "new_tokens": NEW_TOKENS,
        "agreement_prompts": AGREEMENT_PROMPTS,
        "reference": reference,
        "models": rows,
    }
    path = args.out / "decode_graphs.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    fragment.write(args.out, "decode_graphs", [
        f"In-process DecoderRuntime, {args.threads} intra-op threads, onnxruntime {ort.__version__}, "
        f"{args.rounds} round(s), models interleaved within each round; prefill of a {len(timing_ids)}-token prompt "
        f"(median of 5), decode = median of the one-token steps for tokens 2..{NEW_TOKENS}; {context}.",
        "\n".join(lines)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
