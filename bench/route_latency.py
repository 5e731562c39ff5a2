"""Where a Route call's time goes, and what cuts it: the router's embedding models in-process,
then real routers side by side, one per variant, asked the same requests in turn.

    python bench/route_latency.py [--rounds 3] [--variants fp32,int8,int8-threads1] [--out bench/results]

In-process: each model's tokenizer alone and its whole embed of one request (tokenize, run, pool),
on routing-dev's held-out requests (bench/routing_split.py), with 1 and 2 intra-op threads; the two
router models side by side on two threads (as the model host runs two Embed calls) and back to back.

Through the router: one mesh (router + model host) per variant, all started before the first
request, each on ports of its own; every held-out request goes to each variant in turn (so load
from other processes falls on every variant alike), `--rounds` times. Each router learned its routes
from the config's examples without the held-out requests (as bench/routing.py's router part), so
the accuracy column is on requests it never saw (requests sent to `default` count as wrong).
Variants:

* fp32: the router reads minilm-l6 and smollm2-135m-features (the fp32 graphs, hot);
* int8: the shipped config (minilm-l6-int8 + smollm2-135m-features-int8);
* int8-threads1: the same, model host `intra_op_threads: 1` (one thread per session);
* int8-spin: the same, model host `thread_spinning: true`;
* minilm-int8-alone: the router reads minilm-l6-int8 alone (its embedding and lexical terms).

`--variants int8` alone measures a lone router: at load ~5 on the AMD EPYC (2 cores) lone routers
measured int8 9.9-11.3 ms p50, fp32 14.9-16.4 (alternating runs), about what the same variants
measured side by side; bench/routing.py's router measured 5.1 ms when the load fell.

Needs the real fleet (`mirador fleet build`). Prints tables; writes route_latency.json and
route_latency.md to --out. Speed depends on the machine's load: the load average at start and
end is printed; compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fragment  # noqa: E402
from router_ready import wait_for_routes  # noqa: E402
from routing_split import load, split  # noqa: E402

from services.common.config import load_config  # noqa: E402
from services.common.model_repository import ModelRepository  # noqa: E402
from services.model_host.loader import SessionSettings, load_runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FP32_FEATURES_HOT = {"smollm2-135m-features": {"task": "embedding", "recipe": "smollm2-135m-features",
                                               "capabilities": ["routing"], "tier": "hot"}}
VARIANTS = {
    "fp32": {"fleet": FP32_FEATURES_HOT,
             "router": {"embedding_model": "minilm-l6", "feature_models": ["smollm2-135m-features"]}},
    "int8": {},
    "int8-threads1": {"model_host": {"intra_op_threads": 1}},
    "int8-spin": {"model_host": {"thread_spinning": True}},
    "minilm-int8-alone": {"router": {"embedding_model": "minilm-l6-int8", "feature_models": []}},
}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def in_process(models: list[str], texts: list[str], pair: tuple[str, str], rounds: int) -> list[dict]:
    repository = ModelRepository()
    rows = []
    for threads in (1, 2):
        runtimes = {m: load_runtime(repository.get(m), SessionSettings(intra_op_threads=threads)) for m in models}
        for runtime in runtimes.values():
            for text in texts[:5]:  # warm
                runtime.embed([text])
        times = {m: {"tokenize": [], "embed": []} for m in models}
        for _ in range(rounds):
            for text in texts:
                for model, runtime in runtimes.items():
                    started = time.perf_counter()
                    runtime.tokenizer.encode_batch([text])
                    tokenized = time.perf_counter()
                    runtime.embed([text])
                    times[model]["tokenize"].append((tokenized - started) * 1000)
                    times[model]["embed"].append((time.perf_counter() - tokenized) * 1000)
        for model in models:
            embed = times[model]["embed"]
            rows.append({"what": model, "threads": threads, "tokenize_p50_ms": statistics.median(times[model]["tokenize"]),
                         "p50_ms": statistics.median(embed), "p95_ms": quantile(embed, 0.95)})
        if all(m in runtimes for m in pair):
            both = [runtimes[m] for m in pair]
            pool = ThreadPoolExecutor(2)
            side, back = [], []
            for _ in range(rounds):
                for text in texts:
                    started = time.perf_counter()
                    for future in [pool.submit(r.embed, [text]) for r in both]:
                        future.result()
                    side.append((time.perf_counter() - started) * 1000)
                    started = time.perf_counter()
                    for r in both:
                        r.embed([text])
                    back.append((time.perf_counter() - started) * 1000)
            pool.shutdown()
            for name, values in (("side by side", side), ("back to back", back)):
                rows.append({"what": f"{' + '.join(pair)}, {name}", "threads": threads, "tokenize_p50_ms": None,
                             "p50_ms": statistics.median(values), "p95_ms": quantile(values, 0.95)})
        for row in rows[-len(models) - 2:]:
            print(f"  {row['what']:<58} threads {threads}: p50 {row['p50_ms']:.2f} ms, p95 {row['p95_ms']:.2f}",
                  file=sys.stderr, flush=True)
    return rows


def variant_config(base: dict, name: str, index: int, held_out: set[str], folder: Path) -> Path:
    document = json.loads(json.dumps(base))
    for settings in document["services"].values():
        if isinstance(settings, dict) and "port" in settings:
            settings["port"] += 400 + 100 * index  # each variant's services on ports of their own
            settings["metrics_port"] = 0
    for section, overrides in VARIANTS[name].items():
        target = document["fleet"] if section == "fleet" else document["services"].setdefault(section, {})
        target.update(overrides)
    for route in document["routes"].values():
        if route.get("examples"):
            route["examples"] = [t for t in route["examples"] if t not in held_out]
    path = folder / name / "mirador.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def through_routers(config_path: Path, names: list[str], rows: list[dict], rounds: int) -> list[dict]:
    import grpc
    from mirador.v1 import router_pb2, router_pb2_grpc

    from services.cli.supervisor import Mesh

    base = yaml.safe_load(config_path.read_text())
    folder = Path(tempfile.mkdtemp(prefix="route-latency-"))
    meshes: dict[str, Mesh] = {}
    try:
        for index, name in enumerate(names):
            config = load_config(variant_config(base, name, index, {r["text"] for r in rows}, folder))
            meshes[name] = Mesh(config, log_dir=folder / name / "logs", services=("router", "model_host"))
            meshes[name].start(timeout_s=120)
        routers = {}
        for name, mesh in meshes.items():
            router = router_pb2_grpc.RouterStub(grpc.insecure_channel(mesh.config.services.router.address))
            wait_for_routes(router)
            for row in rows[:10]:
                router.Route(router_pb2.RouteRequest(text=row["text"]), timeout=30)
            routers[name] = router
        latencies = {name: [] for name in names}
        correct = {name: 0 for name in names}
        started_load = load_average()
        for round_ in range(rounds):
            for row in rows:
                for name, router in routers.items():
                    started = time.perf_counter()
                    decision = router.Route(router_pb2.RouteRequest(text=row["text"]), timeout=30)
                    latencies[name].append((time.perf_counter() - started) * 1000)
                    if round_ == 0:
                        correct[name] += decision.route == row["route"]
        ended_load = load_average()
    finally:
        for mesh in meshes.values():
            mesh.stop()
    return [{"variant": name, "p50_ms": statistics.median(latencies[name]), "p99_ms": quantile(latencies[name], 0.99),
             "accuracy": correct[name] / len(rows), "requests": len(rows) * rounds,
             "load_start": started_load, "load_end": ended_load} for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="fp32,int8,int8-threads1")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    config = load_config(args.config)
    _, held_out = split(load())
    texts = [r["text"] for r in held_out]
    settings = config.services.router
    shipped = (settings.embedding_model, *settings.feature_models)
    result = {"machine": fragment.describe(fragment.machine()), "load_at_start": load_average()}
    print(f"machine: {result['machine']}; load average {result['load_at_start']}")
    if not args.skip_in_process:
        models = list(dict.fromkeys(["minilm-l6", "smollm2-135m-features", *shipped]))
        result["in_process"] = in_process(models, texts, shipped[:2] if len(shipped) > 1 else shipped, args.rounds)
        print(f"\n{'in-process, one request':<64} {'threads':>7} {'tokenize':>9} {'p50 ms':>7} {'p95 ms':>7}")
        for row in result["in_process"]:
            tokenize = "" if row["tokenize_p50_ms"] is None else f"{row['tokenize_p50_ms']:.3f}"
            print(f"{row['what']:<64} {row['threads']:>7} {tokenize:>9} {row['p50_ms']:>7.2f} {row['p95_ms']:>7.2f}")
    result["routers"] = through_routers(config.path, names, held_out, args.rounds)
    print(f"\n{'through a real router (Route)':<24} {'p50 ms':>7} {'p99 ms':>7} {'held-out acc':>12} {'load start -> end'}")
    for row in result["routers"]:
        print(f"{row['variant']:<24} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} {row['accuracy']:>12.1%} "
              f"{row['load_start']} -> {row['load_end']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "route_latency.json").write_text(json.dumps(result, indent=2))
    parts = [f"{result['machine']}; load average at start {result['load_at_start']}. The router's embedding models "
             f"on routing-dev's {len(texts)} held-out requests, one at a time, {args.rounds} rounds."]
    if "in_process" in result:
        parts.append(fragment.table(
            ["model(s)", "intra-op threads", "tokenize p50 ms", "embed p50 ms", "p95 ms"],
            [[r["what"], r["threads"], r["tokenize_p50_ms"], r["p50_ms"], r["p95_ms"]] for r in result["in_process"]],
            title="In-process (tokenize, run, pool)"))
    parts.append(fragment.table(
        ["variant", "Route p50 ms", "p99 ms", "held-out accuracy", "requests", "load average start -> end"],
        [[r["variant"], r["p50_ms"], r["p99_ms"], f"{r['accuracy']:.1%}", r["requests"],
          f"{r['load_start'][0]} -> {r['load_end'][0]}"] for r in result["routers"]],
        title="Through real routers side by side, each request to every variant in turn"))
    fragment.write(args.out, "route_latency", parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
