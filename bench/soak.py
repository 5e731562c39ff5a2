"""Soak: N concurrent clients through the router for a bounded time, on the real default fleet
(built by `mirador fleet build`; tiny models with --tiny), with a mix of explicit and
classified routes.

    python bench/soak.py [--minutes 2] [--clients 8] [--max-tokens 16] [--tiny] [--out bench/results] [--name soak]

Reports throughput, latency percentiles (p50/p99/p999 of the whole Ask stream), errors by
status code, every service's RSS over time, and availability (successful calls / all calls)
next to the article's 99.9 %. Writes soak.json and soak.png to --out. Timings on a shared
2-core machine are what they are: compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from mirador.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import DEFAULT_CONFIG_PATH, load_config  # noqa: E402

ARTICLE_AVAILABILITY = 0.999
# (route, share of requests); "" = let the router classify the text.
MIX = [("chat", 0.25), ("extraction", 0.15), ("coding", 0.15), ("reasoning", 0.1), ("compliance", 0.1), ("", 0.25)]
TEXTS = {
    "chat": ["Good morning! How's it going?", "Tell me a fun fact about octopuses.", "Suggest a name for our team."],
    "extraction": ["Pull the invoice number and total from: 'INV-0042 due 03/15/2025, total $1,240.00'",
                   "List the dates in: admitted 11/02, discharged 11/06."],
    "coding": ["Write a Python function that reverses a string.", "What does this regex match: ^[A-Z]{2}\\d{6}$"],
    "reasoning": ["What are the risks of moving our portal to a new vendor mid-year?",
                  "Summarize the trade-offs between capitation and fee-for-service."],
    "compliance": ["Is it a HIPAA violation to leave a voicemail that mentions a diagnosis?",
                   "Can we offer a $50 gift card to members who enroll early?"],
    "": ["Tell me a joke about accountants.", "Extract the ICD-10 codes from: E11.9 and I10.",
         "Write a SQL query for the top 5 providers by paid amount.", "Is sharing claims data without a BAA allowed?"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak_config(directory: Path, tiny: bool) -> Path:
    """The default config (or the tiny test fleet) with every service on a free port and no metrics."""
    if tiny:
        from conftest import write_config
        from services.common.model_repository import ModelRepository
        from tiny_models import build_tiny_decoder, build_tiny_encoder

        repository = ModelRepository(directory / "models")
        build_tiny_decoder(repository, "tiny-lm")
        build_tiny_encoder(repository, "tiny-embed")
        routes = "\n".join(f"  {r}: {{primary: tiny-lm, timeout_ms: 20000, examples: {json.dumps(TEXTS[r][:2])}}}"
                           for r, _ in MIX if r)
        body = f"fleet:\n  tiny-lm: {{task: text-generation, tier: hot}}\n  tiny-embed: {{task: embedding, tier: hot}}\nroutes:\n{routes}\n"
        return write_config(directory, body=body, service_extra={"router": "embedding_model: tiny-embed\nmin_confidence: 0.0"})
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for name in ("router", "consensus", "quantizer", "model_host"):
        service = data["services"].setdefault(name, {}) or {}
        service.update(port=free_port(), metrics_port=0)
        data["services"][name] = service
    data["services"]["consensus"]["escalation_db"] = str(directory / "escalations.sqlite3")
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mirador-soak-") as tmp:
        directory = Path(tmp)
        config = load_config(soak_config(directory, args.tiny))
        missing = [r for r, _ in MIX if r and r not in config.routes]
        if missing:
            raise SystemExit(f"the config lacks routes {missing}")
        print(f"starting the mesh ({'tiny models' if args.tiny else 'default fleet'}) ...", flush=True)
        mesh = Mesh(config, log_dir=directory / "logs", services=("router", "model_host", "consensus"))
        mesh.start(timeout_s=180)
        try:
            return soak(mesh, args)
        finally:
            mesh.stop()


def warm_up(router, deadline_s: float = 180) -> None:
    """Waits until the router classifies (it learns its routes after the embedding model loads)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            router.Route(router_pb2.RouteRequest(text="hello there"), timeout=30)
            list(router.Ask(router_pb2.AskRequest(text="hello", route=MIX[0][0],
                                                  sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=60))
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def soak(mesh: Mesh, args) -> dict:
    address = mesh.config.services.router.address
    pids = {name: s.process.pid for name, s in mesh.processes.items()}
    with grpc.insecure_channel(address) as channel:
        warm_up(router_pb2_grpc.RouterStub(channel))
    print(f"soaking: {args.clients} clients for {args.minutes:g} min ...", flush=True)
    routes, weights = zip(*MIX)
    results = []  # (start offset s, latency s, route, code, fell_back)
    lock = threading.Lock()
    started = time.monotonic()
    stop_at = started + args.minutes * 60
    rss = []  # (offset s, {service: MB})

    def client(index: int) -> None:
        rng = random.Random(index)
        with grpc.insecure_channel(address) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            while time.monotonic() < stop_at:
                route = rng.choices(routes, weights)[0]
                request = router_pb2.AskRequest(text=rng.choice(TEXTS[route]), route=route,
                                                sampling=common_pb2.SamplingParams(max_tokens=args.max_tokens))
                t0 = time.monotonic()
                code, chosen = "OK", route or "?"
                try:
                    for response in router.Ask(request, timeout=args.deadline_s,
                                               metadata=(("x-mirador-client", f"soak-{index}"),)):
                        if response.HasField("route"):
                            chosen = response.route.route
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    results.append((t0 - started, time.monotonic() - t0, route or f"classified:{chosen}", code))

    def sample_rss() -> None:
        while time.monotonic() < stop_at + 1:
            point = {}
            for name, pid in pids.items():
                try:
                    point[name] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    point[name] = 0.0
            rss.append((time.monotonic() - started, point))
            time.sleep(args.sample_s)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sampler.join(args.sample_s + 5)
    elapsed = time.monotonic() - started
    alive = {name: s.process.poll() is None for name, s in mesh.processes.items()}
    return summarise(results, rss, elapsed, alive, args)


def summarise(results, rss, elapsed, alive, args) -> dict:
    codes = collections.Counter(r[3] for r in results)
    ok = [r[1] for r in results if r[3] == "OK"]
    lat = np.array(ok) * 1000 if ok else np.array([0.0])
    by_route = collections.defaultdict(collections.Counter)
    for r in results:
        by_route[r[2].split(":")[0] if r[2].startswith("classified") else r[2]][r[3]] += 1
    availability = codes["OK"] / max(1, len(results))
    first, last = rss[0][1], rss[-1][1]
    # RSS settling: the second half's trend, per service
    half = [p for p in rss if p[0] >= elapsed / 2]
    trend = {}
    for name in first:
        xs = np.array([p[0] for p in half])
        ys = np.array([p[1][name] for p in half])
        trend[name] = float(np.polyfit(xs, ys, 1)[0] * 60) if len(half) > 2 else 0.0  # MB per minute
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), {platform.python_version()}",
        "fleet": "tiny test models" if args.tiny else "default fleet (smollm2-135m-instruct, minilm-l6)",
        "clients": args.clients, "minutes": args.minutes, "max_tokens": args.max_tokens, "deadline_s": args.deadline_s,
        "requests": len(results), "elapsed_s": round(elapsed, 1),
        "throughput_rps": round(len(results) / elapsed, 3),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 1), "p99": round(float(np.percentile(lat, 99)), 1),
                       "p999": round(float(np.percentile(lat, 99.9)), 1), "max": round(float(lat.max()), 1)},
        "codes": dict(codes), "by_route": {k: dict(v) for k, v in sorted(by_route.items())},
        "availability": round(availability, 5), "article_availability": ARTICLE_AVAILABILITY,
        "meets_article": availability >= ARTICLE_AVAILABILITY,
        "rss_mb": {"first": {k: round(v, 1) for k, v in first.items()}, "last": {k: round(v, 1) for k, v in last.items()},
                   "second_half_trend_mb_per_min": {k: round(v, 2) for k, v in trend.items()},
                   "samples": [(round(t, 1), {k: round(v, 1) for k, v in p.items()}) for t, p in rss]},
        "services_alive_after": alive,
        "latencies": [(round(r[0], 2), round(r[1] * 1000, 1), r[3]) for r in results],
    }


def report(result: dict, out: Path, name: str = "soak") -> None:
    print(f"\n{result['fleet']}: {result['clients']} clients, {result['elapsed_s']} s, max_tokens {result['max_tokens']}")
    print(f"{'requests':<24}{result['requests']}")
    print(f"{'throughput':<24}{result['throughput_rps']} req/s")
    lat = result["latency_ms"]
    print(f"{'latency p50/p99/p999':<24}{lat['p50']} / {lat['p99']} / {lat['p999']} ms (max {lat['max']})")
    print(f"{'status codes':<24}{result['codes']}")
    print(f"{'availability':<24}{result['availability'] * 100:.3f} % (article: {ARTICLE_AVAILABILITY * 100:.1f} %) "
          f"{'meets it' if result['meets_article'] else 'BELOW it'}")
    print(f"{'services alive after':<24}{result['services_alive_after']}")
    print("\nRSS (MB) over time:")
    names = list(result["rss_mb"]["first"])
    print(f"{'t (s)':>7}" + "".join(f"{n:>13}" for n in names))
    samples = result["rss_mb"]["samples"]
    step = max(1, len(samples) // 12)
    for t, point in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{t:>7.0f}" + "".join(f"{point[n]:>13.1f}" for n in names))
    print(f"second-half RSS trend (MB/min): {result['rss_mb']['second_half_trend_mb_per_min']}")
    print("\nby route:", json.dumps(result["by_route"]))

    out.mkdir(parents=True, exist_ok=True)
    summary = {k: v for k, v in result.items() if k != "latencies"}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing (pip install -e '.[bench]'): no soak.png")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    ok = [(t, ms) for t, ms, code in result["latencies"] if code == "OK"]
    bad = [(t, ms) for t, ms, code in result["latencies"] if code != "OK"]
    if ok:
        top.scatter(*zip(*ok), s=4, alpha=0.5, label="OK")
    if bad:
        top.scatter(*zip(*bad), s=12, color="red", marker="x", label="error")
    top.set_yscale("log")
    top.set_ylabel("Ask latency (ms)")
    top.set_title(f"Soak: {result['clients']} clients, {result['throughput_rps']} req/s, "
                  f"availability {result['availability'] * 100:.2f} %, p99 {lat['p99']:.0f} ms")
    top.legend(loc="upper right")
    for name in names:
        bottom.plot([t for t, _ in samples], [p[name] for _, p in samples], label=name)
    bottom.set_xlabel("time (s)")
    bottom.set_ylabel("RSS (MB)")
    bottom.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.png'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=30.0, help="each Ask's deadline")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval")
    parser.add_argument("--tiny", action="store_true", help="tiny test models instead of the default fleet")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--name", default="soak", help="output files: NAME.json and NAME.png")
    args = parser.parse_args(argv)
    result = run(args)
    report(result, args.out, args.name)
    return 0 if all(result["services_alive_after"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
