"""Model-host benchmark: a real host process (started through the supervisor) against
a bare ONNX Runtime loop in this process, on the real fleet.

    python bench/model_host.py [--quick] [--out bench/results]

Sections (one table each): decode and prefill, loading and switching, Score/Embed
throughput with batching on and off, memory. Writes model_host.json and
model_host_throughput.png to the output folder. Nothing here is asserted: timings on
a shared 2-core machine are ratios, not promises.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from mirador.v1 import common_pb2, model_host_pb2, model_host_pb2_grpc  # noqa: E402

import fragment  # noqa: E402
from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import load_config  # noqa: E402
from services.common.model_repository import ModelRepository, default_repository_root  # noqa: E402

LM = "smollm2-135m-instruct"
EMBED = "minilm-l6"
USER, SYSTEM = common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM
# ~45 tokens with the default system prompt; asks for something long so 64 tokens come.
DECODE_PROMPT = ("Write a detailed step-by-step guide to planting a vegetable garden in spring: "
                 "soil preparation, choosing seeds, watering, and pest control.")
SCORE_QUESTIONS = [
    ("Is the sky blue on a clear day?", ["Yes", "No"]),
    ("Claim: Paris is the capital of France. Is the claim True, False or Neither?", ["True", "False", "Neither"]),
    ("Speaker 1: 'Are you coming tonight?' Speaker 2: 'I have to work late.' Does this mean yes or no?", ["yes", "no"]),
    ("Can a fish climb a tree?", ["Yes", "No"]),
]
EMBED_TEXTS = [
    "Hello there.",
    "What is the capital of France?",
    "Extract the ICD-10 codes and the date of service from this note.",
    "The quarterly report shows revenue growth in every region except the north-east, where supply problems delayed two large orders.",
    "Summarise the main risks in this vendor contract, in particular the clauses about termination, liability caps and data retention.",
    "Write a Python function that validates an NPI number.",
    "The match ended in a draw after a late equaliser from the visiting side, who had been a man down since the first half.",
    "Is a prior authorization required for this procedure under the plan rules, given that the member changed plans in March?",
]

# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MARKDOWN: list[str] = []  # every table, as markdown, for the report fragment


def table(title: str, header: list[str], rows: list[list]) -> str:
    MARKDOWN.append(fragment.table(header, rows, title=title))
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "-" * len(title)]
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def pctl(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process so far (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def user(text: str) -> list:
    return [common_pb2.ChatMessage(role=USER, content=text)]


# --------------------------------------------------------------------------- the host


class Host:
    """One model-host process, started by the supervisor from a config written to a temp dir."""

    def __init__(self, workdir: Path, name: str, tier: str, max_batch_size: int, env: dict[str, str]):
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        repo_root = default_repository_root()  # the real models, whatever XDG_CACHE_HOME the host gets
        ports = {s: free_port() for s in ("router", "consensus", "quantizer", "model_host")}
        keep = "" if tier == "hot" else ", keep_alive: 1h"
        text = f"""# written by bench/model_host.py
services:
  router: {{port: {ports['router']}}}
  consensus: {{port: {ports['consensus']}}}
  quantizer: {{port: {ports['quantizer']}}}
  model_host:
    port: {ports['model_host']}
    memory_budget_mb: 8192
    max_batch_size: {max_batch_size}
    max_queue_delay_ms: 2
    shutdown_grace_s: 2s
model_repository: {repo_root}
fleet:
  {LM}: {{task: text-generation, tier: {tier}{keep}}}
  {EMBED}: {{task: embedding, tier: {tier}{keep}}}
routes:
  chat: {{primary: {LM}}}
"""
        path = self.dir / "mirador.yaml"
        path.write_text(text)
        self.config = load_config(path)
        self.env = env
        self.mesh = Mesh(self.config, log_dir=self.dir / "logs", services=("model_host",))
        self.address = self.config.services.model_host.address

    def start(self) -> float:
        saved = dict(os.environ)
        os.environ.update(self.env)  # the supervisor passes this process's environment on
        started = time.perf_counter()
        try:
            self.mesh.start(timeout_s=60)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = model_host_pb2_grpc.ModelHostStub(self.channel)
        return (time.perf_counter() - started) * 1000

    @property
    def pid(self) -> int:
        return self.mesh.processes["model_host"].process.pid

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss

    def wait_ready(self, names: tuple[str, ...], timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            models = {m.name: m for m in self.stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}
            if all(models[n].state == model_host_pb2.MODEL_STATE_READY for n in names):
                return
            failed = [n for n in names if models[n].state == model_host_pb2.MODEL_STATE_FAILED]
            if failed:
                raise RuntimeError(f"{failed} failed to load: {[models[n].detail for n in failed]}")
            time.sleep(0.2)
        raise TimeoutError(f"{names} not ready after {timeout_s} s")

    def listing(self) -> dict:
        return {m.name: m for m in self.stub.ListModels(model_host_pb2.ListModelsRequest(), timeout=5).models}

    def load(self, name: str) -> tuple[float, float]:
        """(client ms, host's load_ms) for LoadModel."""
        started = time.perf_counter()
        status = self.stub.LoadModel(model_host_pb2.LoadModelRequest(model=name), timeout=600)
        return (time.perf_counter() - started) * 1000, status.load_ms

    def unload(self, name: str) -> None:
        self.stub.UnloadModel(model_host_pb2.UnloadModelRequest(model=name), timeout=30)

    def generate(self, text: str, max_tokens: int) -> dict:
        """Streams one greedy answer; returns client-side token arrival times and the summary."""
        request = model_host_pb2.GenerateRequest(
            model=LM, messages=user(text), sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        )
        started = time.perf_counter()
        arrivals, summary = [], None
        for event in self.stub.Generate(request, timeout=600):
            if event.HasField("token"):
                arrivals.append((time.perf_counter() - started) * 1000)
            else:
                summary = event.summary
        total = (time.perf_counter() - started) * 1000
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        return {"arrivals_ms": arrivals, "gaps_ms": gaps, "total_ms": total, "summary": summary}

    def embed(self, texts: list[str]) -> float:
        started = time.perf_counter()
        self.stub.Embed(model_host_pb2.EmbedRequest(model=EMBED, texts=texts), timeout=60)
        return (time.perf_counter() - started) * 1000

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.close()
        self.mesh.stop(grace_s=2)


# --------------------------------------------------------------------------- sections


def _inprocess_run(runtime, ids: list[int], steps: int) -> dict:
    """One greedy generation with the bare runtime: prefill ms, ms of each step, tokens produced."""
    t0 = time.perf_counter()
    state, logits = runtime.prefill(ids)
    prefill_ms = (time.perf_counter() - t0) * 1000
    token, step_ms, count = int(np.argmax(logits)), [], 1
    while count < steps and token not in runtime.eos_token_ids:
        s = time.perf_counter()
        logits = runtime.step(state, token)
        step_ms.append((time.perf_counter() - s) * 1000)
        token = int(np.argmax(logits))
        count += 1
    return {"prefill_ms": prefill_ms, "step_ms": step_ms, "tokens": count}


def bench_decode(host: Host, runs: int, max_tokens: int) -> tuple[dict, dict]:
    """Host (gRPC stream) and a bare ORT loop in this process on the same graph, runs interleaved
    so both see the same background load. The bare loop uses the host's session settings
    (default intra-op threads, the same optimised-graph cache)."""
    from services.model_host.loader import SessionSettings, default_optimized_cache, load_runtime

    manifest = ModelRepository(default_repository_root()).get(LM, None)
    started = time.perf_counter()
    runtime = load_runtime(manifest, SessionSettings(intra_op_threads=0, optimized_cache=default_optimized_cache()))
    load_ms = (time.perf_counter() - started) * 1000
    ids = runtime.encode(runtime.render_chat([("user", DECODE_PROMPT)]))
    host.generate(DECODE_PROMPT, 4)  # warm-up both
    _inprocess_run(runtime, ids, 4)
    results, bare = [], []
    for _ in range(runs):
        results.append(host.generate(DECODE_PROMPT, max_tokens))
        steps = results[-1]["summary"].usage.completion_tokens or max_tokens
        bare.append(_inprocess_run(runtime, ids, steps))
    runtime.close()
    gaps = [g for r in results for g in r["gaps_ms"][1:]]  # steps after the first
    bare_gaps = [g for r in bare for g in r["step_ms"][1:]]
    summaries = [r["summary"] for r in results]
    host_row = {
        "runs": runs,
        "prompt_tokens": summaries[0].usage.prompt_tokens,
        "completion_tokens": [s.usage.completion_tokens for s in summaries],
        "finish_reason": [common_pb2.FinishReason.Name(s.finish_reason) for s in summaries],
        "decode_ms_per_token_client": median(gaps),
        "decode_ms_per_token_client_p90": pctl(gaps, 90),
        "decode_ms_per_token_host": median([s.timings.decode_ms / max(s.usage.completion_tokens - 1, 1) for s in summaries]),
        "prefill_ms_host": median([s.timings.prefill_ms for s in summaries]),
        "first_token_ms_client": median([r["arrivals_ms"][0] for r in results]),
        "total_ms_client": median([r["total_ms"] for r in results]),
        "text_sample": summaries[0].text[:160],
    }
    bare_row = {
        "load_ms": load_ms,
        "prompt_tokens": len(ids),
        "tokens": [r["tokens"] for r in bare],
        "decode_ms_per_token": median(bare_gaps),
        "decode_ms_per_token_p90": pctl(bare_gaps, 90),
        "prefill_ms": median([r["prefill_ms"] for r in bare]),
        "intra_op_threads": "0 (ORT default, as the host)",
    }
    return host_row, bare_row


def bench_switch(host: Host, reps: int) -> dict:
    host.embed([EMBED_TEXTS[1]])
    host.generate("Say hi.", 4)
    embed_after_generate, embed_after_embed, ft_after_embed, ft_after_generate = [], [], [], []
    for _ in range(reps):
        host.generate("Name three colours.", 8)
        embed_after_generate.append(host.embed([EMBED_TEXTS[2]]))
        embed_after_embed.append(host.embed([EMBED_TEXTS[2]]))
        ft_after_embed.append(host.generate("Name three colours.", 8)["arrivals_ms"][0])
        ft_after_generate.append(host.generate("Name three colours.", 8)["arrivals_ms"][0])
    return {
        "reps": reps,
        "embed_ms_after_generate": median(embed_after_generate),
        "embed_ms_after_embed": median(embed_after_embed),
        "first_token_ms_after_embed": median(ft_after_embed),
        "first_token_ms_after_generate": median(ft_after_generate),
    }


async def _throughput(address: str, kind: str, clients: int, seconds: float) -> dict:
    """`clients` concurrent callers, each calling in a loop for `seconds`; counts calls finished in the window."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_host_pb2_grpc.ModelHostStub(channel)

        def request(i: int):
            if kind == "score":
                question, options = SCORE_QUESTIONS[i % len(SCORE_QUESTIONS)]
                return stub.Score(model_host_pb2.ScoreRequest(model=LM, messages=user(question), options=options), timeout=120)
            return stub.Embed(model_host_pb2.EmbedRequest(model=EMBED, texts=[EMBED_TEXTS[i % len(EMBED_TEXTS)]]), timeout=60)

        await request(0)  # warm-up
        latencies: list[float] = []
        errors: list[str] = []
        start = time.perf_counter()
        end = start + seconds

        async def caller(index: int) -> None:
            # Calls start until the window closes; every call is counted, and the rate
            # is calls over the time to the last completion (Score calls last ~0.1-1 s).
            i = index
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    await request(i)
                except grpc.aio.AioRpcError as exc:
                    errors.append(exc.code().name)
                    continue
                latencies.append((time.perf_counter() - t) * 1000)
                i += clients

        await asyncio.gather(*(caller(c) for c in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "kind": kind,
        "clients": clients,
        "window_s": seconds,
        "elapsed_s": elapsed,
        "calls": len(latencies),
        "per_s": len(latencies) / elapsed,
        "p50_ms": pctl(latencies, 50),
        "p95_ms": pctl(latencies, 95),
        "errors": len(errors),
        "error_codes": sorted(set(errors)),
    }


def bench_throughput(on: Host, off: Host, levels: list[int], seconds: float) -> tuple[list[dict], list[dict]]:
    """Each cell on the batching host, then at once on the other (only one host busy at a time)."""
    rows_on, rows_off = [], []
    for kind in ("score", "embed"):
        for clients in levels:
            for host, rows, label in ((on, rows_on, "on"), (off, rows_off, "off")):
                rows.append(asyncio.run(_throughput(host.address, kind, clients, seconds)))
                print(f"  {kind} x{clients} batching {label}: {rows[-1]['per_s']:.1f}/s", file=sys.stderr, flush=True)
    return rows_on, rows_off


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global LM
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced run (< 2 minutes): fewer repeats, shorter windows, warm graph cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--decoder", default=LM, help="repository name of the decoder to measure (default %(default)s)")
    args = parser.parse_args(argv)
    LM = args.decoder
    quick = args.quick
    runs = 1 if quick else 3
    max_tokens = 32 if quick else 64
    window_s = 1.5 if quick else 5.0
    levels = [1, 4, 16]
    switch_reps = 2 if quick else 5

    began = time.perf_counter()
    info = fragment.machine()
    info["mode"] = "quick" if quick else "full"
    info["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"machine: {info['cpu']}, {info['cores']} cores (AVX2 {info['avx2']}, AVX-512 {info['avx512f']}), "
          f"{info['memory_gib']} GiB; onnxruntime {info['onnxruntime']}, grpcio {info['grpcio']}, Python {info['python']}; "
          f"load average at start {info.get('load_average') or info['load_average_at_start']}; mode {info['mode']}")
    results: dict = {"machine": info, "tables": {}}

    workdir = Path(tempfile.mkdtemp(prefix="mirador-bench-"))
    # Full mode: the host gets an empty optimised-graph cache, so its first load optimises
    # the graph (a true cold load) and the reload after UnloadModel uses the cache.
    # Quick mode reuses the user's cache (~/.cache/mirador/optimized): both loads hit it.
    env = {} if quick else {"XDG_CACHE_HOME": str(workdir / "xdg-cache")}
    hosts: list[Host] = []
    try:
        # ---------------------------------------------------------------- host A: batching on
        host = Host(workdir, "batch-on", tier="warm", max_batch_size=16, env=env)
        hosts.append(host)
        start_ms = host.start()
        print(f"\nhost (batching on) SERVING after {start_ms:.0f} ms, pid {host.pid}", file=sys.stderr)
        loads = {}
        loads["lm_first"] = host.load(LM)
        host.unload(LM)
        loads["lm_reload"] = host.load(LM)
        host.unload(LM)
        cold_gen = host.generate("What is the capital of France?", 16)
        loads["embed_first"] = host.load(EMBED)
        host.unload(EMBED)
        loads["embed_reload"] = host.load(EMBED)
        cache_note = "empty cache: graph optimised" if not quick else "cache hit (quick mode)"
        load_rows = [
            ["host start to SERVING (no model loaded)", start_ms, None, ""],
            [f"{LM}: first LoadModel after start", loads["lm_first"][0], loads["lm_first"][1], cache_note],
            [f"{LM}: LoadModel after UnloadModel", loads["lm_reload"][0], loads["lm_reload"][1], "optimised-graph cache hit"],
            [f"{LM}: Generate on unloaded model, first token", cold_gen["arrivals_ms"][0],
             cold_gen["summary"].timings.load_ms, "load on demand, cache hit"],
            [f"{EMBED}: first LoadModel after start", loads["embed_first"][0], loads["embed_first"][1], cache_note],
            [f"{EMBED}: LoadModel after UnloadModel", loads["embed_reload"][0], loads["embed_reload"][1], "cache hit"],
        ]
        results["loading"] = {
            "start_ms": start_ms,
            **{k: {"client_ms": v[0], "host_load_ms": v[1]} for k, v in loads.items()},
            "cold_generate": {"first_token_ms_client": cold_gen["arrivals_ms"][0],
                              "host_load_ms": cold_gen["summary"].timings.load_ms,
                              "host_first_token_ms": cold_gen["summary"].timings.first_token_ms},
            "optimized_cache": cache_note,
        }

        decode, inproc = bench_decode(host, runs, max_tokens)
        results["decode_host"], results["decode_inprocess"] = decode, inproc
        switch = bench_switch(host, switch_reps)
        results["switch"] = switch

        listing = host.listing()
        memory = {
            "host_a_rss_both_loaded_mb": host.rss() / 2**20,
            "host_a_vmhwm_mb": vm_hwm_bytes(host.pid) / 2**20,
            "measured_by_registry_mb": {n: m.memory_bytes / 2**20 for n, m in listing.items()},
        }

        # ---------------------------------------------------------------- host B: batching off, default fleet hot
        # Host A stays up (idle) so the throughput cells of A and B can alternate and see the same load.
        host_b = Host(workdir, "batch-off", tier="hot", max_batch_size=1, env=env)
        hosts.append(host_b)
        host_b.start()
        started = time.perf_counter()
        host_b.wait_ready((LM, EMBED))
        memory["host_b_pinned_ready_ms"] = (time.perf_counter() - started) * 1000
        memory["host_b_rss_default_fleet_mb"] = host_b.rss() / 2**20
        memory["host_b_vmhwm_default_fleet_mb"] = vm_hwm_bytes(host_b.pid) / 2**20
        memory["host_b_measured_by_registry_mb"] = {n: m.memory_bytes / 2**20 for n, m in host_b.listing().items()}
        throughput_on, throughput_off = bench_throughput(host, host_b, levels, window_s)
        memory["host_a_vmhwm_after_throughput_mb"] = vm_hwm_bytes(host.pid) / 2**20
        memory["host_b_vmhwm_after_throughput_mb"] = vm_hwm_bytes(host_b.pid) / 2**20
        host.stop()
        host_b.stop()
        results["memory"] = memory
        results["throughput"] = {"batching_on": throughput_on, "batching_off": throughput_off}
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                h.stop()  # a second stop of a stopped mesh does nothing

    # ---------------------------------------------------------------- tables
    T = results["tables"]
    ratio = decode["decode_ms_per_token_client"] / inproc["decode_ms_per_token"]
    T["decode"] = table(
        f"Decode and prefill, {LM}, greedy, {decode['prompt_tokens']}-token prompt, "
        f"up to {max_tokens} tokens, median of steps after the first ({runs} run(s), host and bare loop interleaved; "
        "the other graphs: the decode_graphs bench, llama.cpp: the serving bench, both measured, not quoted)",
        ["path", "decode ms/token", "p90", "prefill ms", "tokens", "note"],
        [
            ["model host, gRPC Generate stream (client gaps)", decode["decode_ms_per_token_client"],
             decode["decode_ms_per_token_client_p90"], decode["prefill_ms_host"], "/".join(map(str, decode["completion_tokens"])),
             f"finish {decode['finish_reason'][0]}"],
            ["model host, its own timings (decode_ms/(n-1))", decode["decode_ms_per_token_host"], None, None, None, ""],
            ["bare ORT loop in-process (DecoderRuntime.prefill/step)", inproc["decode_ms_per_token"],
             inproc["decode_ms_per_token_p90"], inproc["prefill_ms"], "/".join(map(str, inproc["tokens"])),
             f"host overhead x{ratio:.2f}"],
        ],
    )
    results["decode_overhead_ratio"] = ratio
    T["loading"] = table(
        "Loading and cold start (client wall time; host load_ms from ModelStatus / Timings)",
        ["event", "client ms", "host load ms", "note"], load_rows,
    )
    T["switch"] = table(
        f"Warm switch between models, both loaded (median of {switch_reps})",
        ["measurement", "ms"],
        [
            [f"Embed ({EMBED}) right after a Generate ({LM})", switch["embed_ms_after_generate"]],
            ["Embed right after an Embed", switch["embed_ms_after_embed"]],
            ["Generate first token right after an Embed", switch["first_token_ms_after_embed"]],
            ["Generate first token right after a Generate", switch["first_token_ms_after_generate"]],
        ],
    )
    rows = []
    for label, data in (("on (16)", throughput_on), ("off (1)", throughput_off)):
        for r in data:
            rows.append([r["kind"], label, r["clients"], r["per_s"], r["p50_ms"], r["p95_ms"], r["calls"], r["errors"]])
    T["throughput"] = table(
        f"Throughput, {window_s:g} s window per cell, hosts A (on) and B (off) alternating cell by cell (Score: {LM}, 2-3 options; Embed: {EMBED}, one text per call)",
        ["rpc", "batching (max_batch_size)", "clients", "calls/s", "p50 ms", "p95 ms", "calls", "errors"], rows,
    )
    T["memory"] = table(
        "Memory of the host process (psutil RSS; peak = /proc VmHWM)",
        ["measurement", "MiB"],
        [
            ["host B (default fleet, both hot, graph cache hit): RSS when both READY", memory["host_b_rss_default_fleet_mb"]],
            ["host B: peak RSS up to both READY", memory["host_b_vmhwm_default_fleet_mb"]],
            ["host B: peak RSS after throughput runs", memory["host_b_vmhwm_after_throughput_mb"]],
            ["host A (warm tier, loads by LoadModel): RSS with both loaded, after decode runs",
             memory["host_a_rss_both_loaded_mb"]],
            [f"host A: peak RSS incl. loads ({cache_note})", memory["host_a_vmhwm_mb"]],
            ["host A: peak RSS after throughput runs", memory["host_a_vmhwm_after_throughput_mb"]],
            *[[f"host B: registry's measured size of {n} (first load)", mb]
              for n, mb in memory["host_b_measured_by_registry_mb"].items()],
            *[[f"host A: registry's measured size of {n} (after unload + reload)", mb]
              for n, mb in memory["measured_by_registry_mb"].items()],
        ],
    )
    results["elapsed_s"] = time.perf_counter() - began
    print(f"\nelapsed {results['elapsed_s']:.0f} s; load average now {[round(x, 2) for x in os.getloadavg()]}")

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("-quick" if quick else "") + ("" if LM == "smollm2-135m-instruct" else f"-{LM}")
    (args.out / f"model_host{suffix}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    plot(results, args.out / f"model_host_throughput{suffix}.png")
    print(f"wrote {args.out / f'model_host{suffix}.json'} and {args.out / f'model_host_throughput{suffix}.png'}")
    fragment.write(args.out, f"model_host{suffix}", [
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; onnxruntime {info['onnxruntime']}; "
        f"load average at start {info.get('load_average') or info['load_average_at_start']}; mode {info['mode']}; "
        f"{results['elapsed_s']:.0f} s. Clients run in the bench process on the same cores as the host.",
        *MARKDOWN, f"![throughput against clients](model_host_throughput{suffix}.png)"])
    with contextlib.suppress(Exception):
        import shutil

        shutil.rmtree(workdir)
    return 0


def plot(results: dict, path: Path) -> None:
    plt = fragment.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("score", "embed")):
        for label, key, style in (("batching on (16)", "batching_on", "o-"), ("batching off (1)", "batching_off", "s--")):
            rows = [r for r in results["throughput"][key] if r["kind"] == kind]
            ax.plot([r["clients"] for r in rows], [r["per_s"] for r in rows], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 4, 16], labels=["1", "4", "16"])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("calls / s")
        ax.set_title(f"{kind.capitalize()} ({LM if kind == 'score' else EMBED})")
        ax.grid(alpha=0.3)
        ax.legend()
    m = results["machine"]
    fig.suptitle(f"Mirador model host throughput - {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']} ({m['mode']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
