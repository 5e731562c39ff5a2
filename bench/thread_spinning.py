"""When should ONNX Runtime's idle worker threads spin? (`services.model_host.thread_spinning`)

By default ONNX Runtime's intra-op threads spin for a while after each parallel section
instead of sleeping, which saves the wake-up when one session has the cores to itself. A model
host rarely does: engines of several models, Embed batches and Scores run at once beside the
router and the consensus. Four modes: `always` (ONNX Runtime's default), `off` (threads sleep at
once), `during_runs` (they spin between the operators of a run and sleep once it ends:
session.force_spinning_stop), and `in_turn` (`during_runs`, with the process's runs taking turns,
services/model_host/run_turns.py). This runs the model host's own loader and engine pieces (the default
chat graph decoding a batch of 4 through its KV slots; minilm embedding batches of 4) in a fresh
process per measurement, every mode in turn (the order rotating each round), for four workloads:

- one stream: one session decoding one sequence with the cores to itself (where spinning helps);
- decode alone: the same session decoding a batch of 4;
- decode + embed: the chat engine while the router's classifier embeds (two sessions at once);
- decode + decode: two decoders' engines at once (two models answering together).

    python bench/thread_spinning.py [--quick] [--seconds 8] [--rounds 3] [--out DIR]

Reported: decode steps/s and embed batches/s per workload and mode, median of the rounds, and
each mode's ratio to `always`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import fragment  # noqa: E402

DECODER = "smollm2-135m-instruct-fused-mixed"
ENCODER = "minilm-l6"
WORKLOADS = ("one stream", "decode alone", "decode + embed", "decode + decode")
MODES = ("always", "during_runs", "in_turn", "off")
BATCH = 4  # sequences per decode step (1 for "one stream")


def work(workload: str, spinning: str, seconds: float) -> dict[str, float]:
    """One measurement, in this process: how many decode steps (and embed batches) per second."""
    from services.common.model_repository import ModelRepository
    from services.model_host.engine.kv_slots import slots_for
    from services.model_host.loader import SessionSettings, load_runtime

    repository = ModelRepository()
    settings = SessionSettings(thread_spinning=spinning)
    decoders = [load_runtime(repository.get(DECODER), settings) for _ in range(2 if workload == "decode + decode" else 1)]
    encoder = load_runtime(repository.get(ENCODER), settings) if workload == "decode + embed" else None
    prompt = decoders[0].encode("Tell me a fun fact about octopuses.")
    batch = 1 if workload == "one stream" else BATCH
    counts = {"decode": 0, "embed": 0}
    lock = threading.Lock()

    def decode(runtime, stop: float) -> None:
        slots = slots_for(runtime, batch, 256)
        for slot in range(batch):
            slots.prefill(slot, prompt, 0)
        length = len(prompt)
        while time.monotonic() < stop:
            if length >= 250:
                length = len(prompt)
            slots.decode(list(range(batch)), [42] * batch, [length] * batch)
            length += 1
            with lock:
                counts["decode"] += 1

    def embed(stop: float) -> None:
        texts = ["Is it a HIPAA violation to leave a voicemail that mentions a diagnosis?"] * BATCH
        while time.monotonic() < stop:
            encoder.embed(texts)
            with lock:
                counts["embed"] += 1

    # warm-up: one step of everything, then the timed window
    decode(decoders[0], 0)
    if encoder is not None:
        encoder.embed(["warm up"])
    stop = time.monotonic() + seconds
    threads = [threading.Thread(target=decode, args=(d, stop)) for d in decoders]
    if encoder is not None:
        threads.append(threading.Thread(target=embed, args=(stop,)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {kind: count / seconds for kind, count in counts.items()}


def measure(workload: str, spinning: str, seconds: float) -> dict[str, float]:
    """`work` in a fresh process, so no thread pool of an earlier measurement is left running."""
    done = subprocess.run([sys.executable, __file__, "--worker", workload, "--spinning", spinning,
                           "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s windows, 2 rounds")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--spinning", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(work(args.worker, args.spinning, args.seconds)))
        return 0
    seconds, rounds = (4.0, 2) if args.quick else (args.seconds, args.rounds)
    from services.common.model_repository import ModelRepository

    repository = ModelRepository()
    missing = [m for m in (DECODER, ENCODER) if not repository.exists(m)]
    if missing:
        print(f"skipping: {', '.join(missing)} not built (`mirador fleet build`)")
        return 0
    machine = fragment.machine()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {w: {mode: [] for mode in MODES} for w in WORKLOADS}
    for round_ in range(rounds):
        for workload in WORKLOADS:
            for i in range(len(MODES)):  # the order rotates each round, so drifting load hits every mode
                mode = MODES[(i + round_) % len(MODES)]
                result = measure(workload, mode, seconds)
                runs[workload][mode].append(result)
                print(f"round {round_ + 1} {workload:<16} spinning {mode:<11}: "
                      f"{result['decode']:6.1f} decode steps/s  {result['embed']:6.1f} embed batches/s", flush=True)
    median = {w: {mode: {kind: statistics.median(r[kind] for r in results) for kind in ("decode", "embed")}
                  for mode, results in by_mode.items()} for w, by_mode in runs.items()}
    rows = []
    for workload, by_mode in median.items():
        always = by_mode["always"]
        row = [workload]
        for kind in ("decode", "embed"):
            for mode in MODES:
                value = by_mode[mode][kind]
                row.append(value or None)
                if mode != "always":
                    row.append(value / always[kind] if always[kind] else None)
        rows.append(row)
    name = "thread_spinning-quick" if args.quick else "thread_spinning"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"machine": machine, "seconds": seconds, "rounds": rounds,
                                                       "runs": runs, "median": median}, indent=1))
    fragment.write(args.out, name, [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average at start {machine['load_average']}; "
        f"onnxruntime {machine['onnxruntime']}. {DECODER} decoding one sequence or a batch of {BATCH} through the engine's KV "
        f"slots, {ENCODER} embedding batches of {BATCH}; {seconds:.0f} s windows, median of {rounds} rounds, "
        "a fresh process each.",
        fragment.table(["workload", *(f"{kind}, {mode}" if mode == "always" else h
                                      for kind in ("decode steps/s", "embed batches/s") for mode in MODES
                                      for h in ((mode,) if mode == "always" else (mode, "/ always")))], rows,
                       title="ONNX Runtime intra-op thread spinning: always, during runs only "
                             "(alone, and taking turns), off"),
        "The model host's default is `in_turn` (`services.model_host.thread_spinning`): a session alone runs "
        "as fast as with spinning threads, and sessions that run at once take turns instead of fighting over "
        "the cores (`during_runs` and `always` lose most when two spin together). Turns are fair, one run "
        "each: beside an Embed loop the decoder gets as many runs as the encoder, where with `off` the "
        "encoder took most of the cores. `off` keeps sessions running side by side (a long run never makes "
        "another wait), at the speed of sleeping threads.",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
