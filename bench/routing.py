"""Routing: accuracy and calibration on the held-out part of routing-dev.jsonl, three
classifiers compared on the same embeddings, and routing latency through a real router.

    python bench/routing.py [--data PATH] [--skip-latency] [--quick] [--out bench/results]

Needs the real fleet (`mirador fleet build`). Prints tables; writes routing.json and
routing.md (the report fragment) to --out. `--quick` sends only the first 40 held-out
requests through the router for the latency (the classifier comparison is fast and
always uses all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fragment  # noqa: E402
from routing_split import DEFAULT_DATA, load, split  # noqa: E402

from services.common.config import load_config  # noqa: E402
from services.common.model_repository import ModelRepository  # noqa: E402
from services.model_host.calibration import expected_calibration_error  # noqa: E402
from services.model_host.loader import SessionSettings, load_runtime  # noqa: E402
from services.router.classifier import RouteClassifier, fit_temperature, softmax  # noqa: E402
from services.router.routing import classified_routes  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}"


def evaluate(name: str, probabilities: np.ndarray, truth: np.ndarray, routes: list[str]) -> dict:
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = (predicted == truth).astype(float)
    return {"method": name, "accuracy": float(correct.mean()),
            "ece": expected_calibration_error(confidence, correct), "n": int(len(truth))}


def compare_classifiers(config, fit_texts, fit_labels, eval_rows) -> list[dict]:
    manifest = ModelRepository(config.model_repository).get(config.services.router.embedding_model)
    encoder = load_runtime(manifest, SessionSettings(intra_op_threads=2))
    embed = lambda texts: np.concatenate([encoder.embed(texts[i:i + 32]) for i in range(0, len(texts), 32)])
    x_fit, x_eval = embed(fit_texts), embed([r["text"] for r in eval_rows])
    routes = sorted(set(fit_labels))
    y_fit = np.array([routes.index(l) for l in fit_labels])
    y_eval = np.array([routes.index(r["route"]) for r in eval_rows])

    logistic = RouteClassifier.train(x_fit, fit_labels)
    p_logistic = np.array([[logistic.scores(v)[r] for r in routes] for v in x_eval])

    centroids = np.stack([x_fit[y_fit == k].mean(axis=0) for k in range(len(routes))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    t_centroid = fit_temperature(x_fit @ centroids.T, y_fit)  # in-sample: centroids have nothing to hold out
    p_centroid = softmax((x_eval @ centroids.T) / t_centroid)

    k = 5
    nearest = np.argsort(-(x_eval @ x_fit.T), axis=1)[:, :k]
    p_knn = np.stack([np.bincount(y_fit[row], minlength=len(routes)) / k for row in nearest])

    return [evaluate("logistic head (calibrated, the router's)", p_logistic, y_eval, routes),
            evaluate("nearest centroid (cosine, temperature)", p_centroid, y_eval, routes),
            evaluate(f"{k}-nearest neighbours (vote share)", p_knn, y_eval, routes)]


def through_the_router(config_path: Path, eval_rows) -> dict:
    import grpc
    from mirador.v1 import router_pb2, router_pb2_grpc

    from services.cli.supervisor import Mesh

    mesh = Mesh(load_config(config_path), log_dir=Path(tempfile.mkdtemp()), services=("router", "model_host"))
    mesh.start(timeout_s=120)
    try:
        with grpc.insecure_channel(mesh.config.services.router.address) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            router.Route(router_pb2.RouteRequest(text="warm up"), timeout=120)
            latencies, correct, defaulted = [], 0, 0
            for row in eval_rows:
                started = time.perf_counter()
                decision = router.Route(router_pb2.RouteRequest(text=row["text"]), timeout=30)
                latencies.append((time.perf_counter() - started) * 1000)
                correct += decision.route == row["route"]
                defaulted += decision.reason == router_pb2.ROUTE_REASON_LOW_CONFIDENCE
    finally:
        mesh.stop()
    latencies.sort()
    return {"requests": len(eval_rows),
            "accuracy_including_default": correct / len(eval_rows), "sent_to_default": defaulted / len(eval_rows),
            "p50_ms": statistics.median(latencies), "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--quick", action="store_true", help="latency through the router on 40 requests only")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    config = load_config(args.config)
    fit, held_out = split(load(args.data))
    held_texts = {r["text"] for r in held_out}
    examples = [(t, name) for name, route in classified_routes(config).items() for t in route.examples]
    leaked = sum(t in held_texts for t, _ in examples)
    print(f"machine: {machine()}\nheld-out requests: {len(held_out)} (fit split {len(fit)}); "
          f"route examples in the config: {len(examples)}, of which held-out texts: {leaked}\n")
    rows = compare_classifiers(config, [t for t, _ in examples], [n for _, n in examples], held_out)
    print(f"{'classifier':<42} {'accuracy':>9} {'ECE':>7}")
    for row in rows:
        print(f"{row['method']:<42} {row['accuracy']:>9.1%} {row['ece']:>7.3f}")
    result = {"machine": machine(), "held_out": len(held_out), "classifiers": rows}
    if not args.skip_latency:
        router = through_the_router(config.path, held_out[:40] if args.quick else held_out)
        print(f"\nthrough the router (Route RPC, embedding included, min_confidence "
              f"{config.services.router.min_confidence}): accuracy {router['accuracy_including_default']:.1%} "
              f"(requests sent to `default` count as wrong), sent to default {router['sent_to_default']:.1%}, "
              f"latency p50 {router['p50_ms']:.1f} ms, p99 {router['p99_ms']:.1f} ms")
        result["router"] = router
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(result, indent=2))
    write_fragment(args.out, result, config, len(examples), "quick" if args.quick else "full")
    return 0


def write_fragment(out: Path, result: dict, config, examples: int, mode: str) -> None:
    parts = [f"{result['machine']}. Held-out requests: {result['held_out']} (the other part of routing-dev.jsonl "
             f"is the {examples} route examples in the config); same MiniLM embeddings for every classifier.",
             fragment.table(["classifier", "accuracy", "ECE"],
                            [[r["method"], f"{r['accuracy']:.1%}", f"{r['ece']:.3f}"] for r in result["classifiers"]],
                            title="Classifiers on the held-out split")]
    if "router" in result:
        r = result["router"]
        parts.append(fragment.table(
            ["measure", "value"],
            [["accuracy (requests sent to `default` count as wrong)", f"{r['accuracy_including_default']:.1%}"],
             ["sent to default (below min_confidence " f"{config.services.router.min_confidence})",
              f"{r['sent_to_default']:.1%}"],
             ["Route latency p50 / p99 (ms, embedding included)", f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}"],
             ["requests", r.get("requests", result["held_out"])]],
            title=f"Through a real router (Route RPC, one client){' — quick: first 40 requests' if mode == 'quick' else ''}"))
    fragment.write(out, "routing", parts)


if __name__ == "__main__":
    sys.exit(main())
