"""Fuzzing at scale: the generators of tests/test_fuzz.py, 10,000+ RPC cases against a real
mesh of the four services on tiny models, plus YAML config documents against the loader.

    python bench/fuzz.py [--cases 10000] [--config-cases 2000] [--workers 4] [--json FILE] [--out DIR] [--quick]

RPC cases go out in batches of 100 from `--workers` threads at once (so the services also
see concurrent malformed calls); after each batch every process must be alive and SERVING.
Prints, per RPC, how many cases got each status; lists every UNKNOWN/INTERNAL answer, every
answer without a sentence, and every process that died, with the request that preceded it.
Exit status 1 when any of those happened. Nothing is timed: this is about crashes.
With --out, writes fuzz.json and fuzz.md (the report fragment) there. `--quick`: 300 RPC
cases and 200 config documents.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fragment  # noqa: E402
import test_fuzz as fz  # noqa: E402  (the generators and the mesh)

BATCH = 100


def fuzz_rpcs(mesh, cases: int, workers: int) -> dict:
    channels = {name: grpc.insecure_channel(getattr(mesh.config.services, name).address) for name in fz.SERVICES}
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unclear, silent, deaths = [], [], []
    examples: dict[str, str] = {}  # "rpc code" → the first answer's sentence
    sent = 0
    started = time.monotonic()

    def one(case):
        name, path, method, payload = case
        code, details = fz.call(channels[name], path, method, payload)
        return path, payload, code, details

    @settings(max_examples=max(1, cases // BATCH), deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(fz.requests(), min_size=BATCH, max_size=BATCH))
    def batch(cases_):
        nonlocal sent
        with ThreadPoolExecutor(workers) as pool:
            for path, payload, code, details in pool.map(one, cases_):
                outcomes[path][code.name] += 1
                examples.setdefault(f"{path} {code.name}", details[:300])
                if code in fz.UNCLEAR or "metadata size exceeds" in details:
                    unclear.append({"rpc": path, "code": code.name, "details": details[:300], "request": payload[:200].hex()})
                elif code != grpc.StatusCode.OK and not details.strip():
                    silent.append({"rpc": path, "code": code.name, "request": payload[:200].hex()})
        sent += len(cases_)
        problems = fz.alive_and_serving(mesh)
        if problems:
            deaths.append({"after_cases": sent, "problems": problems,
                           "batch": [{"rpc": c[1], "request": c[3][:200].hex()} for c in cases_]})
            raise SystemExit(f"a service died or stopped serving after {sent} cases: {problems}")
        if sent % 1000 == 0:
            print(f"  {sent} RPC cases, {time.monotonic() - started:.0f} s", flush=True)

    try:
        batch()
    except SystemExit as exc:
        print(exc, file=sys.stderr)
    for channel in channels.values():
        channel.close()
    return {"cases": sent, "seconds": round(time.monotonic() - started, 1),
            "by_rpc": {path: dict(counter) for path, counter in sorted(outcomes.items())},
            "unclear": unclear, "without_sentence": silent, "deaths": deaths, "example_answers": examples}


def fuzz_config(cases: int) -> dict:
    outcomes = collections.Counter()
    crashes = []

    @settings(max_examples=cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fz.config_documents())
    def one(text):
        try:
            outcomes[fz.check_config_text(text)] += 1
        except Exception as exc:  # noqa: BLE001 - what we are looking for
            outcomes["crash"] += 1
            crashes.append({"error": f"{type(exc).__name__}: {str(exc)[:300]}", "document": text[:500]})

    started = time.monotonic()
    one()
    return {"cases": sum(outcomes.values()), "seconds": round(time.monotonic() - started, 1),
            "outcomes": dict(outcomes), "crashes": crashes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="RPC cases (rounded down to batches of 100)")
    parser.add_argument("--config-cases", type=int, default=2_000, help="YAML documents for the config loader")
    parser.add_argument("--workers", type=int, default=4, help="concurrent RPCs")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--out", type=Path, help="write fuzz.json and fuzz.md (the report fragment) here")
    parser.add_argument("--quick", action="store_true", help="300 RPC cases, 200 config documents")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases = min(args.cases, 300)
        args.config_cases = min(args.config_cases, 200)

    report = {}
    with tempfile.TemporaryDirectory(prefix="mirador-fuzz-") as directory:
        print(f"starting the mesh (tiny models) in {directory} ...", flush=True)
        with fz.fuzz_mesh(Path(directory)) as mesh:
            report["rpc"] = fuzz_rpcs(mesh, args.cases, args.workers)
            report["rpc"]["alive_and_serving_after"] = fz.alive_and_serving(mesh) == {}
    if args.config_cases:
        report["config"] = fuzz_config(args.config_cases)

    rpc = report["rpc"]
    codes = sorted({code for counter in rpc["by_rpc"].values() for code in counter})
    print(f"\nRPC fuzzing: {rpc['cases']} cases in {rpc['seconds']} s")
    print(f"{'rpc':<40}" + "".join(f"{c[:12]:>13}" for c in codes))
    for path, counter in rpc["by_rpc"].items():
        print(f"{path:<40}" + "".join(f"{counter.get(c, 0):>13}" for c in codes))
    print(f"UNKNOWN/INTERNAL answers: {len(rpc['unclear'])}; answers without a sentence: {len(rpc['without_sentence'])}; "
          f"services that died: {len(rpc['deaths'])}; all alive and SERVING after: {rpc['alive_and_serving_after']}")
    for item in rpc["unclear"][:20] + rpc["without_sentence"][:20]:
        print("  ", item)
    if "config" in report:
        config = report["config"]
        print(f"\nconfig fuzzing: {config['cases']} documents in {config['seconds']} s: {config['outcomes']}")
        for crash in config["crashes"][:20]:
            print("  ", crash)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fuzz.json").write_text(json.dumps(report, indent=2))
        write_fragment(report, args.out, args.workers)
    failed = rpc["unclear"] or rpc["without_sentence"] or rpc["deaths"] or not rpc["alive_and_serving_after"] \
        or report.get("config", {}).get("crashes")
    return 1 if failed else 0


def write_fragment(report: dict, out: Path, workers: int) -> None:
    rpc = report["rpc"]
    codes = sorted({code for counter in rpc["by_rpc"].values() for code in counter})
    parts = [f"{rpc['cases']} RPC cases from the generators of tests/test_fuzz.py in batches of {BATCH}, {workers} at "
             f"once, against a real mesh on tiny models ({rpc['seconds']} s); after every batch each process must be "
             "alive and SERVING. Nothing is timed.",
             fragment.table(["rpc"] + codes, [[path] + [counter.get(c, 0) for c in codes]
                                              for path, counter in rpc["by_rpc"].items()], title="Answers by RPC and status"),
             fragment.table(["finding", "count"], [
                 ["UNKNOWN / INTERNAL answers", len(rpc["unclear"])],
                 ["error answers without a sentence", len(rpc["without_sentence"])],
                 ["services that died or stopped serving", len(rpc["deaths"])],
                 ["all alive and SERVING after", "yes" if rpc["alive_and_serving_after"] else "NO"]], title="Findings")]
    if "config" in report:
        config = report["config"]
        parts.append(fragment.table(["outcome", "documents"], sorted(config["outcomes"].items()),
                                    title=f"Config loader: {config['cases']} YAML documents ({config['seconds']} s), "
                                          f"{len(config['crashes'])} crashes"))
    fragment.write(out, "fuzz", parts)


if __name__ == "__main__":
    sys.exit(main())
