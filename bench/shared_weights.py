"""What ONNX Runtime's weight sharing saves for two sessions of the same SmolLM2 graph.

    python bench/shared_weights.py [--models fused,fused-int8] [--tokens 16] [--out bench/results]

Two model-host-style sessions of one graph (two versions of a model, or one model under two names)
hold two copies of its weights. ONNX Runtime's Python API offers one way to share them:
`SessionOptions.add_initializer(name, OrtValue)` hands every session the same buffer instead of
deserialising its own. The CPU provider then still *prepacks* weights (MatMul's packed B, the
MatMulNBits blocks) into per-session buffers unless `session.disable_prepacking` is set; sharing
the prepacked copies needs a PrepackedWeightsContainer, which only the C/C++/C# APIs expose.

Each approach runs in a fresh child process, so RSS is the process's own (heap trimmed before
each reading): after imports, after the first session, after the second. The second session then
decodes `--tokens` greedy tokens of one prompt (2 intra-op threads), which must equal the first
session's, and its median ms/token is shown: what each approach costs in speed.
Nothing is asserted: the machine is shared and noisy; the table says what was measured where.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MB = 1024 * 1024
APPROACHES = {
    "one": "one session (the reference)",
    "two": "two sessions, each its own weights",
    "two-add_initializer": "two sessions, add_initializer (prepacking on)",
    "two-add_initializer-no-prepack": "two sessions, add_initializer + session.disable_prepacking",
}
PROMPT = "Write a short story about a small robot who slowly learns to paint, in three short sentences."


def rss_mb() -> float:
    import psutil

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return psutil.Process().memory_info().rss / MB


def shared_initializers(path: Path) -> dict:
    """Every initializer of the graph as an OrtValue over one numpy buffer (kept alive by the caller)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(path))
    values = {t.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
    del model
    return values


def child(approach: str, model: str, tokens: int) -> dict:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from services.common.model_repository import ModelRepository
    from services.model_host.runtimes.decoder import DecoderRuntime

    manifest = ModelRepository().get(f"smollm2-135m-instruct-{model}")
    tokenizer = Tokenizer.from_file(str(manifest.path_of("tokenizer")))
    readings = {"start": rss_mb()}
    shared = shared_initializers(manifest.path_of("model")) if "add_initializer" in approach else {}
    readings["weights"] = rss_mb()

    def session():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        for name, value in shared.items():
            options.add_initializer(name, value)
        if approach.endswith("no-prepack"):
            options.add_session_config_entry("session.disable_prepacking", "1")
        return ort.InferenceSession(str(manifest.path_of("model")), options, providers=["CPUExecutionProvider"])

    started = time.perf_counter()
    sessions = [session()]
    readings["first"] = rss_mb()
    if approach != "one":
        sessions.append(session())
    readings["second"] = rss_mb()
    load_s = time.perf_counter() - started

    def greedy(runtime):
        ids = runtime.prompts.encode(runtime.chat.render([("user", PROMPT)]))
        state, logits = runtime.prefill(ids)
        out, steps = [int(np.argmax(logits))], []
        while len(out) < tokens:
            begun = time.perf_counter()
            logits = runtime.step(state, out[-1])
            steps.append(time.perf_counter() - begun)
            out.append(int(np.argmax(logits)))
        return out, steps

    first, _ = greedy(DecoderRuntime(manifest, sessions[0], tokenizer))
    last, steps = greedy(DecoderRuntime(manifest, sessions[-1], tokenizer))
    readings["after_decode"] = rss_mb()
    return {"approach": approach, "model": model, "rss_mb": readings, "load_s": round(load_s, 1),
            "decode_ms": round(1000 * statistics.median(steps), 1), "same_tokens": first == last,
            "file_mb": round(manifest.path_of("model").stat().st_size / MB, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="fused,fused-int8",
                        help="fused graphs of smollm2-135m-instruct (suffixes), comma-separated")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument("--child", nargs=2, metavar=("APPROACH", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.tokens)))
        return 0

    import fragment

    rows, results = [], []
    for model in args.models.split(","):
        for approach in APPROACHES:
            done = subprocess.run([sys.executable, __file__, "--child", approach, model, "--tokens", str(args.tokens)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{model} / {approach} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(result)
            r = result["rss_mb"]
            sessions = r["second"] - r["weights"]  # what the sessions added over the shared buffers
            rows.append([f"smollm2 {model} ({result['file_mb']:.0f} MB file)", APPROACHES[approach],
                         round(r["start"]), round(r["weights"] - r["start"]), round(r["first"] - r["weights"]),
                         round(r["second"] - r["first"]), round(r["second"] - r["start"]), round(sessions),
                         result["decode_ms"], "yes" if result["same_tokens"] else "NO"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    header = ["graph", "approach", "RSS before (MB)", "shared buffers (MB)", "1st session (MB)",
              "2nd session (MB)", "total added (MB)", "sessions alone (MB)", "decode ms/token (2nd)",
              "same tokens"]
    machine = fragment.machine()
    table = fragment.table(header, rows, title="Two sessions of one SmolLM2 graph: RSS per approach")
    print("\n" + table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shared_weights.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    fragment.write(out, "shared_weights", [table, f"Measured on {fragment.describe(machine)}."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
