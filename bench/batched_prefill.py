"""Does batching prefills across requests pay here? (the serving-engine issue, item 4)

A consensus fan-out sends Score calls that arrive together, and each Score is one prompt
prefill plus a few option tokens. Batching several requests' prompts into one run pays where
one prompt leaves the hardware idle (a GPU); on a CPU whose cores a single prompt already
keeps busy it may not. This measures it on the decoders the default config serves: B prompts
of L tokens as one right-padded run against one run per prompt, same session, alternating.

    python bench/batched_prefill.py [--quick] [--out DIR]

Reported per graph and prompt length: ms per prompt at batch 1, 2 and 4, and the gain of the
batch (B runs of one prompt / one run of B prompts: above 1 it pays). The model host's engine
prefills one sequence per iteration (in chunks); it batches decode steps, not prefills.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402

import fragment  # noqa: E402
from services.common.model_repository import ModelRepository  # noqa: E402
from services.quantizer.model import decoder_feeds, session_options  # noqa: E402

GRAPHS = ("smollm2-135m-instruct-fused-mixed", "smollm2-135m-instruct-fused", "smollm2-135m-instruct-fused-int8")
BATCHES = (1, 2, 4)


def measure(path: Path, lengths: tuple[int, ...], repeats: int) -> dict[int, dict[int, float]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), session_options(0), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out: dict[int, dict[int, float]] = {}
    for length in lengths:
        feeds = {}
        for batch in BATCHES:
            feeds[batch] = decoder_feeds(session, rng.integers(100, 20000, (batch, length)))
            feeds[batch]["logits_to_keep"] = np.array([1], np.int64)  # a prefill needs the last position only
            session.run(["logits"], feeds[batch])  # warm-up
        times: dict[int, list[float]] = {batch: [] for batch in BATCHES}
        for _ in range(repeats):  # alternate, so drifting load hits every batch size alike
            for batch in BATCHES:
                started = time.perf_counter()
                session.run(["logits"], feeds[batch])
                times[batch].append(time.perf_counter() - started)
        out[length] = {batch: statistics.median(t) * 1000 / batch for batch, t in times.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one prompt length, 3 repeats")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    lengths, repeats = ((160,), 3) if args.quick else ((64, 160, 400), 7)
    machine = fragment.machine()
    repository = ModelRepository()
    results = {}
    for name in GRAPHS:
        if not repository.exists(name):
            print(f"skipping {name}: not built (`mirador fleet build`)")
            continue
        results[name] = measure(repository.get(name).path_of("model"), lengths, repeats)
        for length, per_prompt in results[name].items():
            print(f"{name:<36} L={length:<4} " + "  ".join(
                f"B={b}: {ms:6.0f} ms/prompt" for b, ms in per_prompt.items()), flush=True)
    rows = [[name, length, *(per_prompt[b] for b in BATCHES), per_prompt[1] / per_prompt[2], per_prompt[1] / per_prompt[4]]
            for name, by_length in results.items() for length, per_prompt in by_length.items()]
    name = "batched_prefill-quick" if args.quick else "batched_prefill"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    fragment.write(args.out, name, [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average at start "
        f"{machine['load_average']}; onnxruntime {machine['onnxruntime']}. Median of {repeats} runs each.",
        fragment.table(["graph", "prompt tokens", "ms/prompt, batch 1", "batch 2", "batch 4", "gain of 2", "gain of 4"],
                       rows, title="Prefill: one run per prompt against one run of B prompts"),
        "A gain above 1 means batching requests' prefills pays; the engine batches decode steps only.",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
