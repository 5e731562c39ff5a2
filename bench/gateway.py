"""What the HTTP gateway adds: the same streamed requests through `POST /v1/chat/completions`
(SSE, services/gateway) and straight to `Router.Ask` (gRPC), on the real fleet's `chat` route.

The default config runs with free ports (model host, router, gateway as processes). Requests
alternate between the two paths, one at a time, so drifting load hits both alike: greedy,
`max_tokens` 32, a different prompt each pair (the same prompt on both paths). Reported per path:
time to first token p50/p90 (from sending the request to the first token's text arriving) and
inter-token latency p50/p90. The overhead is the median of the paired differences (gateway minus
direct, request by request: first token; each request's median inter-token gap), which cancels
much of the load that other processes put on a shared machine. Issue 13's goals: first token
+2 ms or less, per token +0.2 ms or less. It runs twice: on the real
fleet, and on the tests' tiny model (tokens in about a millisecond, so the gateway's own cost is
not hidden under SmolLM2's ~40 ms a token).

    python bench/gateway.py [--quick] [--only fleet|tiny] [--out DIR] [--requests 40] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
from mirador.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

import fragment  # noqa: E402
from soak import soak_config  # noqa: E402
from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import load_config  # noqa: E402

ROUTE = "chat"
TOPICS = ["octopuses", "the moon", "bread", "volcanoes", "chess", "rainbows", "bees", "glaciers", "jazz", "maps"]
GOALS_MS = {"first_token": 2.0, "inter_token": 0.2}


def config(directory: Path, tiny: bool) -> Path:
    if tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import write_config
        from services.common.model_repository import ModelRepository
        from tiny_models import build_tiny_decoder

        build_tiny_decoder(ModelRepository(directory / "models"), "tiny-lm")
        return write_config(directory, body=f"fleet:\n  tiny-lm: {{task: text-generation, tier: hot}}\n"
                                            f"routes:\n  {ROUTE}: {{primary: tiny-lm, timeout_ms: 60000}}\n")
    return soak_config(directory, tiny=False)  # the default config on free ports, the gateway's too


def direct(router, text: str, max_tokens: int) -> tuple[float, list[float]]:
    """Seconds to the first token and the arrival times of every token, over gRPC."""
    started = time.perf_counter()
    stamps = []
    request = router_pb2.AskRequest(route=ROUTE, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
                                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens))
    for event in router.Ask(request, timeout=120):
        if event.HasField("token"):
            stamps.append(time.perf_counter())
    return started, stamps


def through_gateway(http: httpx.Client, url: str, text: str, max_tokens: int) -> tuple[float, list[float]]:
    """The same over HTTP: the arrival time of every SSE chunk that carries a token's text."""
    started = time.perf_counter()
    stamps = []
    body = {"model": ROUTE, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": True}
    with http.stream("POST", url, json=body) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk.get("choices") or []
            if choices and "content" in choices[0]["delta"] and "role" not in choices[0]["delta"]:
                stamps.append(time.perf_counter())
    return started, stamps


def summarise(samples: list[tuple[float, list[float]]]) -> dict:
    first = [(stamps[0] - started) * 1000 for started, stamps in samples if stamps]
    gaps = [g * 1000 for _, stamps in samples for g in np.diff(stamps)]
    return {"requests": len(samples), "tokens": sum(len(s) for _, s in samples),
            "first_token_p50_ms": float(np.percentile(first, 50)), "first_token_p90_ms": float(np.percentile(first, 90)),
            "inter_token_p50_ms": float(np.percentile(gaps, 50)), "inter_token_p90_ms": float(np.percentile(gaps, 90))}


def run(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        mesh = Mesh(load_config(config(directory, args.tiny)), log_dir=directory / "logs",
                    services=("model_host", "router", "gateway"), env={"XDG_CACHE_HOME": str(directory / "cache")}
                    if args.tiny else {})
        mesh.start(timeout_s=180)
        try:
            settings = mesh.config.services
            url = f"http://{settings.gateway.address}/v1/chat/completions"
            with grpc.insecure_channel(settings.router.address) as channel, httpx.Client(timeout=120) as http:  # as the OpenAI SDK: keep-alive, defaults
                router = router_pb2_grpc.RouterStub(channel)
                deadline = time.monotonic() + 180
                while True:  # the router's channel to the host may be backing off from a try before the host listened
                    try:
                        direct(router, "warm up", 2)
                        break
                    except grpc.RpcError:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
                for i in range(3):  # warm-up: model loaded, channels connected, graphs optimised
                    direct(router, f"warm up {i}", args.max_tokens)
                    through_gateway(http, url, f"warm up {i}", args.max_tokens)
                samples = {"router": [], "gateway": []}
                for i in range(args.requests):
                    text = f"Tell me one interesting fact about {TOPICS[i % len(TOPICS)]} (#{i})."
                    first, second = (("router", "gateway") if i % 2 == 0 else ("gateway", "router"))
                    for path in (first, second):
                        samples[path].append(direct(router, text, args.max_tokens) if path == "router"
                                             else through_gateway(http, url, text, args.max_tokens))
        finally:
            mesh.stop()
    paths = {name: summarise(s) for name, s in samples.items()}
    pairs = [(a, b) for a, b in zip(samples["gateway"], samples["router"]) if a[1] and b[1]]
    overhead = {
        "first_token": float(np.median([(g[1][0] - g[0]) - (r[1][0] - r[0]) for g, r in pairs]) * 1000),
        "inter_token": float(np.median([np.median(np.diff(g[1])) - np.median(np.diff(r[1]))
                                        for g, r in pairs if len(g[1]) > 1 and len(r[1]) > 1]) * 1000),
    }
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": fragment.machine(),
            "route": ROUTE, "model": "tiny-lm (tests/tiny_models.py)" if args.tiny else load_config().routes[ROUTE].primary,
            "max_tokens": args.max_tokens,
            "tiny": args.tiny, "requests_per_path": args.requests, "paths": paths, "overhead_p50_ms": overhead, "goals_ms": GOALS_MS,
            "goals_met": {k: overhead[k] <= GOALS_MS[k] for k in GOALS_MS}}


def report_part(result: dict) -> list[str]:
    rows = [[name, p["requests"], p["tokens"], p["first_token_p50_ms"], p["first_token_p90_ms"], p["inter_token_p50_ms"],
             p["inter_token_p90_ms"]] for name, p in result["paths"].items()]
    header = ["path", "requests", "tokens", "first token p50 ms", "p90", "inter-token p50 ms", "p90"]
    print(f"\n{result['model']}\n{'':<8}" + "  ".join(f"{h:>18}" for h in header[1:]))
    for row in rows:
        print(f"{row[0]:<8}" + "  ".join(f"{v:>18.2f}" if isinstance(v, float) else f"{v:>18}" for v in row[1:]))
    overhead, goals, met = result["overhead_p50_ms"], result["goals_ms"], result["goals_met"]
    lines = [f"- {k.replace('_', ' ')}: {overhead[k]:+.2f} ms, median of paired differences (goal +{goals[k]:g} ms: "
             f"{'met' if met[k] else 'not met'})" for k in goals]
    print("\n".join(lines))
    return [f"**{result['model']}**, greedy, max_tokens {result['max_tokens']}, {result['requests_per_path']} requests "
            "per path", fragment.table(header, rows), "Gateway overhead:\n\n" + "\n".join(lines)]


def report(results: list[dict], out: Path) -> None:
    machine = results[0]["machine"]
    parts = [f"Streamed `{ROUTE}` requests, alternating one at a time: `POST /v1/chat/completions` (SSE) through the "
             f"gateway, read by httpx as the OpenAI SDK reads it, against `Router.Ask` over gRPC. {machine['cpu']}, "
             f"{machine['cores']} cores, load {machine['load_average']} at start (a shared machine: compare within a run)."]
    for result in results:
        parts += report_part(result)
    fragment.write(out, "gateway", parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 requests per path, max_tokens 16")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--only", choices=["fleet", "tiny"], help="one of the two runs (default: both)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens = 10, 16
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for tiny in (False, True):
        if args.only in (None, "tiny" if tiny else "fleet"):
            args.tiny = tiny
            results.append(run(args))
    (args.out / "gateway.json").write_text(json.dumps(results, indent=2))
    report(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
