"""Fault injection, measured: the scenarios of tests/test_faults.py (tests/fault_scenarios.py),
each repeated a few times on tiny real models and real service processes, tabulated as

    fault | runs | what the client saw (status counts) | retried / fell back | lost | time

    python bench/faults.py [--repeats 3] [--streams 4] [--out bench/results]

"Lost" counts what must never happen, per fault: an answer that came back OK but incomplete,
a call in flight that an eviction broke, an escalation committed but missing after a restart,
a half-written optimised graph that broke the next load. Every row must read 0.
Writes faults.json and faults.md to --out. Times from a shared 2-core machine are what they
are: compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import fault_scenarios as fs  # noqa: E402
import fragment  # noqa: E402  (bench/, the script's own folder)


def counts(codes) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(collections.Counter(codes).items()))


def seconds(values) -> str:
    values = list(values)
    if not values:
        return ""
    return f"median {statistics.median(values):.2f} s (max {max(values):.2f})"


def row(fault, runs, saw, retried, lost, lost_means, time_s="", note=""):
    return {"fault": fault, "runs": runs, "client_saw": saw, "retried_or_fell_back": retried, "lost": lost,
            "lost_means": lost_means, "time": time_s, "note": note}


# --------------------------------------------------------------------------- router mesh scenarios


def slow_rows(mesh, repeats):
    outcomes = [fs.ask(fs.router_address(mesh), "slow") for _ in range(repeats)]
    fell = sum(o.complete and o.summary.fell_back for o in outcomes)
    return row("slow primary (3 s before its first token; route 4 s, fallback)", repeats,
               counts(o.code for o in outcomes), f"fell back {fell}/{repeats} (slow-lm → tiny-lm)",
               sum(o.code == "OK" and not o.complete for o in outcomes), "OK answers without their summary",
               seconds(o.elapsed_s for o in outcomes), "the primary gets half the route's budget")


def hang_rows(mesh, repeats):
    results = [fs.hung_model(mesh) for _ in range(repeats)]
    left = sum(sum(r.in_flight_after.values()) for r in results)
    return row(f"hung primary (never answers; route {fs.HUNG_ROUTE_TIMEOUT_MS} ms, no fallback)", repeats,
               counts(r.outcome.code for r in results), "none (no fallback configured)",
               left, "hung calls still open on the host after the client's error",
               seconds(r.outcome.elapsed_s for r in results),
               f"next call OK {sum(r.next_outcome.complete for r in results)}/{repeats}; router "
               f"{'SERVING' if all(r.router_health == 'SERVING' for r in results) else 'NOT SERVING'}")


def corrupt_rows(mesh, repeats):
    first = fs.corrupt_model(mesh)
    routed = [first.through_router] + [fs.ask(fs.router_address(mesh), "flaky") for _ in range(repeats - 1)]
    fell = sum(o.complete and o.summary.fell_back for o in routed)
    return row("corrupt model file (garbage model.onnx)", repeats,
               f"LoadModel {first.load[0]}, Generate {first.generate.code}; via router: {counts(o.code for o in routed)}",
               f"router fell back {fell}/{repeats} (broken-lm → tiny-lm); host SERVING, other models answer",
               sum(o.code == "OK" and not o.complete for o in routed), "OK answers without their summary",
               seconds(o.elapsed_s for o in routed), first.load[1][:160])


def mid_stream_rows(mesh, repeats, streams, max_tokens=60):
    """`streams` concurrent drip-lm streams through the router; one replica killed once every stream has tokens."""
    codes, next_ok, incomplete, times = [], 0, 0, []
    for _ in range(repeats):
        fs.ensure_replicas_up(mesh)
        got = [0] * streams
        outcomes = [None] * streams
        began = [0.0] * streams
        all_started = threading.Event()

        def call(i):
            def on_event(kind, tokens):
                got[i] = tokens
                if all(n >= 3 for n in got):
                    all_started.set()
            began[i] = time.monotonic()
            outcomes[i] = fs.ask(fs.router_address(mesh), "stream", max_tokens=max_tokens, timeout_s=60,
                                 on_event=on_event)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        all_started.wait(30)
        victim = fs.replica_serving(mesh, "drip-lm")
        killed_at = time.monotonic()
        fs.kill_9(mesh, victim)
        for t in threads:
            t.join(60)
        times += [began[i] + o.elapsed_s - killed_at for i, o in enumerate(outcomes) if o.code != "OK"]
        codes += [o.code for o in outcomes]
        incomplete += sum(o.code == "OK" and (not o.complete or o.tokens != max_tokens) for o in outcomes)
        after = fs.ask(fs.router_address(mesh), "chat")
        next_ok += after.complete
    return row(f"kill -9 of 1 of 2 model hosts mid-stream ({streams} streams at once)", repeats * streams,
               counts(codes), f"no retry once a model has answered (the stream's error is the answer); "
               f"next call OK {next_ok}/{repeats} on the other replica",
               incomplete, "OK streams with missing tokens or summary",
               f"error {seconds(times)} after the kill" if times else "",
               "UNAVAILABLE streams were on the killed replica; the others finished whole")


def before_first_token_rows(mesh, repeats):
    results = []
    for _ in range(repeats):
        fs.ensure_replicas_up(mesh)
        results.append(fs.kill_before_first_token(mesh))
    fell = sum(r.outcome.complete and r.outcome.summary.fell_back for r in results)
    return row("kill -9 of a model host before the first token (2 replicas)", repeats,
               counts(r.outcome.code for r in results), f"fell back {fell}/{repeats} (slow-lm → tiny-lm-b, other replica)",
               sum(r.outcome.code == "OK" and not r.outcome.complete for r in results), "OK answers without their summary",
               seconds(r.outcome.elapsed_s for r in results),
               f"next call OK {sum(r.next_outcome.complete for r in results)}/{repeats}")


# --------------------------------------------------------------------------- scenarios with their own processes


def load_kill_rows(directory, repeats):
    results = [fs.kill_during_load(directory / f"load{i}") for i in range(repeats)]
    waiting = [r.load_during[0] for r in results] + [r.generate_during.code for r in results]
    broken = sum(r.load_after_restart[0] != "OK" or bool(r.partials_after) for r in results)
    return row("kill -9 of a model host during LoadModel (graph written, not committed)", repeats,
               f"callers waiting on the load: {counts(waiting)}",
               f"restarted host loads it: {sum(r.load_after_restart[0] == 'OK' for r in results)}/{repeats}; "
               f"truncated cache rebuilt: {sum(r.cache_rebuilt for r in results)}/{repeats}",
               broken, "restarts whose load failed or that kept the dead process's .partial graph")


def budget_rows(directory, repeats):
    results = [fs.full_memory_budget(directory / f"budget{i}") for i in range(repeats)]
    first = results[0]
    saw = counts([r.evicting_load.code for r in results] + [r.during_stream.code for r in results]
                 + [r.retried_later.code for r in results])
    return row("full memory budget (pinned + busy model; budget fits 2 of 3 models)", repeats,
               f"{saw} (load with an idle model to evict: OK; nothing evictable: RESOURCE_EXHAUSTED; later: OK)",
               "idle warm model evicted for the load; the refused call works once the busy model is idle",
               sum(not r.stream.complete or r.stream.tokens != 40 for r in results),
               "in-flight streams broken by an eviction",
               "", f"sizes {first.sizes_mb} MB, budget {first.budget_mb} MB; host SERVING "
               f"{sum(r.host_health == 'SERVING' for r in results)}/{repeats}. {first.during_stream.details[:200]}")


def consensus_rows(directory, repeats):
    env = fs.ConsensusEnv(directory / "consensus")
    try:
        results = [fs.consensus_crash_after_commit(env, env.disputed[i % len(env.disputed)], f"bench-{i}")
                   for i in range(repeats)]
    finally:
        env.stop()
    missing = sum(r.stored is None or [v.model for v in r.stored.votes] != fs.VOTERS for r in results)
    duplicates = sum(r.count_after_retry > 1 for r in results)
    return row("consensus killed after committing an escalation, before answering", repeats,
               counts(r.code for r in results),
               f"client retry of the same request: {counts(r.retry_code for r in results)} "
               f"(replays the stored case; a second case in the queue {duplicates}/{repeats})",
               missing, "escalations committed but missing (or missing a vote) after the restart", "",
               f"process exit {sorted({r.exit_code for r in results})}")


# --------------------------------------------------------------------------- report


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Fault injection ({result['date']})", "",
             f"{m.get('cpu') or m['machine']}, {m['cores']} cores (shared), Python {m['python']}, onnxruntime {m['onnxruntime']}, "
             f"load average at start {m.get('load_average') or m['load_average_at_start']}. Tiny real models, real processes.", "",
             "| fault | runs | what the client saw | retried / fell back | lost | time |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['fault']} | {r['runs']} | {r['client_saw']} | {r['retried_or_fell_back']} | "
                     f"{r['lost']} | {r['time']} |")
    lines += ["", "What \"lost\" counts, and notes:", ""]
    lines += [f"- **{r['fault']}**: lost = {r['lost_means']}. {r['note']}".rstrip() for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams when a host dies mid-stream")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    started = time.monotonic()
    info = fragment.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mirador-faults-") as tmp:
        directory = Path(tmp)
        print("starting router + 2 model hosts ...", flush=True)
        mesh = fs.start_router_mesh(directory / "router")
        try:
            for name, run in (("slow", lambda: slow_rows(mesh, args.repeats)),
                              ("hang", lambda: hang_rows(mesh, args.repeats)),
                              ("corrupt", lambda: corrupt_rows(mesh, args.repeats)),
                              ("mid-stream kill", lambda: mid_stream_rows(mesh, args.repeats, args.streams)),
                              ("kill before first token", lambda: before_first_token_rows(mesh, args.repeats))):
                print(f"  {name} ...", flush=True)
                rows.append(run())
        finally:
            mesh.stop()
        for name, run in (("kill during load", lambda: load_kill_rows(directory, args.repeats)),
                          ("full memory budget", lambda: budget_rows(directory, max(1, args.repeats - 1))),
                          ("consensus crash", lambda: consensus_rows(directory, args.repeats))):
            print(f"  {name} ...", flush=True)
            rows.append(run())
    result = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": info,
              "repeats": args.repeats, "streams": args.streams, "elapsed_s": round(time.monotonic() - started, 1),
              "rows": rows, "lost_total": sum(r["lost"] for r in rows)}
    table = markdown(result)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "faults.md").write_text(table)
    print(f"wrote {args.out / 'faults.json'} and {args.out / 'faults.md'} ({result['elapsed_s']} s)")
    return 0 if result["lost_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
