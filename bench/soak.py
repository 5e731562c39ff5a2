"""Soak at a stated load: first a short capacity probe, then a bounded open-loop soak
through the router on the real default fleet (built by `mirador fleet build`; tiny models
with --tiny), with a mix of explicit and classified routes (MIX below).

    python bench/soak.py [--duration 180] [--load 0.7 | --rate R] [--arrivals poisson|uniform]
                         [--quick] [--tiny] [--out bench/results]

1. Capacity probe (closed loop): 1, 2, 4, ... concurrent clients (up to --max-clients), each
   level for --probe-s seconds (longer, up to 3x, until 10 calls have started), every client
   sending its next Ask when the last one ends. The ramp stops at the knee: when two levels
   in a row add less than 10 % throughput over the best so far (one flat level can be noise),
   or more than 1 % of a level's calls fail. Capacity = the OK calls/s of the best level.
2. Soak (open loop): Poisson arrivals (evenly spaced with --arrivals uniform) at --load x
   capacity (or --rate calls/s) for --duration seconds, each call started at its arrival
   time whether or not earlier ones finished, so a slow mesh builds a queue instead of
   slowing the clients down, and each latency is measured from the call's scheduled
   arrival (no coordinated omission).

Reports throughput, latency percentiles (p50/p99/p999 of the whole Ask stream, and of the
first token), errors by status code and by route, every service's RSS over time, and
availability (OK calls / all calls of the soak) next to the article's 99.9 %. The soak of
an earlier version (8 closed-loop clients, 2 minutes) drove this 2-core machine past
capacity, so calls queued past their routes' timeouts: 79 % availability measured the
overload, not the mesh. Writes NAME.json, NAME.png and NAME.md (the report fragment) to
--out; NAME is `soak` (`soak-quick` with --quick). The clients run in this process on the
same cores as the mesh; compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from mirador.v1 import common_pb2, router_pb2, router_pb2_grpc  # noqa: E402

import fragment  # noqa: E402
from services.cli.supervisor import Mesh  # noqa: E402
from services.common.config import DEFAULT_CONFIG_PATH, load_config  # noqa: E402

ARTICLE_AVAILABILITY = 0.999
# (route, share of requests); "" = let the router classify the text.
MIX = [("chat", 0.25), ("extraction", 0.15), ("coding", 0.15), ("reasoning", 0.1), ("compliance", 0.1), ("", 0.25)]
TEXTS = {
    "chat": ["Good morning! How's it going?", "Tell me a fun fact about octopuses.", "Suggest a name for our team."],
    "extraction": ["Pull the invoice number and total from: 'INV-0042 due 03/15/2025, total $1,240.00'",
                   "List the dates in: admitted 11/02, discharged 11/06.",
                   "Extract the member id from: 'Member ID W123456789, plan Gold PPO'"],
    "coding": ["Write a Python function that reverses a string.", "What does this regex match: ^[A-Z]{2}\\d{6}$",
               "Fix this JavaScript: const total = items.reduce((a, b) => a + b.price);"],
    "reasoning": ["What are the risks of moving our portal to a new vendor mid-year?",
                  "Summarize the trade-offs between capitation and fee-for-service.",
                  "If claims rise 8% a year, how long until they double? Explain the steps."],
    "compliance": ["Is it a HIPAA violation to leave a voicemail that mentions a diagnosis?",
                   "Can we offer a $50 gift card to members who enroll early?",
                   "Does emailing lab results to a patient's personal address need their consent?"],
    "": ["Tell me a joke about accountants.", "Extract the ICD-10 codes from: E11.9 and I10.",
         "Write a SQL query for the top 5 providers by paid amount.", "Is sharing claims data without a BAA allowed?"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak_config(directory: Path, tiny: bool, overrides: list[str] = ()) -> Path:
    """The default config (or the tiny test fleet) with every service on a free port and no metrics,
    and `overrides` (`SERVICE.KEY=VALUE`, VALUE read as YAML) for A/B runs of a setting."""
    if tiny:
        from conftest import write_config
        from services.common.model_repository import ModelRepository
        from tiny_models import build_tiny_decoder, build_tiny_encoder

        repository = ModelRepository(directory / "models")
        build_tiny_decoder(repository, "tiny-lm")
        build_tiny_encoder(repository, "tiny-embed")
        routes = "\n".join(f"  {r}: {{primary: tiny-lm, timeout_ms: 20000, examples: {json.dumps(TEXTS[r][:3])}}}"
                           for r, _ in MIX if r)
        body = f"fleet:\n  tiny-lm: {{task: text-generation, tier: hot}}\n  tiny-embed: {{task: embedding, tier: hot}}\nroutes:\n{routes}\n"
        return write_config(directory, body=body, service_extra={"router": "embedding_model: tiny-embed\nmin_confidence: 0.0"})
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    for name in ("router", "consensus", "quantizer", "model_host", "gateway"):
        service = data["services"].setdefault(name, {}) or {}
        service.update(port=free_port(), metrics_port=0)
        data["services"][name] = service
    data["services"]["consensus"]["escalation_db"] = str(directory / "escalations.sqlite3")
    for override in overrides:
        dotted, _, value = override.partition("=")
        service, _, key = dotted.partition(".")
        if service not in data["services"] or not key or not value:
            raise SystemExit(f"--set {override}: write SERVICE.KEY=VALUE, e.g. model_host.thread_spinning=true")
        data["services"][service][key] = yaml.safe_load(value)
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


KNEE_GAIN = 0.10      # a level adding less throughput than this over the best so far is past the knee
MAX_ERROR_SHARE = 0.01
PROBE_MIN_CALLS = 10  # a probe level runs until this many calls started (at most 3x --probe-s)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="mirador-soak-") as tmp:
        directory = Path(tmp)
        config = load_config(soak_config(directory, args.tiny, args.set))
        missing = [r for r, _ in MIX if r and r not in config.routes]
        if missing:
            raise SystemExit(f"the config lacks routes {missing}")
        print(f"starting the mesh ({'tiny models' if args.tiny else 'default fleet'}) ...", flush=True)
        # the services' logs go with the temp dir unless --keep-logs names a folder for them
        logs = args.keep_logs or directory / "logs"
        mesh = Mesh(config, log_dir=logs, services=("router", "model_host", "consensus"))
        mesh.start(timeout_s=180)
        try:
            return soak(mesh, args)
        finally:
            mesh.stop()


def warm_up(router, deadline_s: float = 180) -> None:
    """Waits until the router classifies (it learns its routes after the embedding model
    loads), then sends one short Ask per route so that no first-call cost lands in the probe."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            router.Route(router_pb2.RouteRequest(text="hello there"), timeout=30)
            for route in dict(MIX):
                list(router.Ask(router_pb2.AskRequest(text=TEXTS[route][0], route=route,
                                                      sampling=common_pb2.SamplingParams(max_tokens=2)), timeout=60))
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@dataclasses.dataclass
class Call:
    at_s: float                  # scheduled start, seconds from the phase's start
    latency_s: float             # scheduled start to the end of the stream (or the error)
    first_token_s: float | None  # scheduled start to the first token
    route: str                   # the route asked for, or "classified:<chosen>"
    code: str                    # "OK" or the gRPC status name
    details: str = ""            # the status message of a failed call


class Load:
    """Sends Asks with the route mix over one aio channel; records every call."""

    def __init__(self, address: str, args, seed: int):
        self.address, self.args = address, args
        self.rng = random.Random(seed)
        self.routes, self.weights = zip(*MIX)
        self.calls: list[Call] = []

    async def ask(self, stub, client: str, t0: float, scheduled: float) -> None:
        route = self.rng.choices(self.routes, self.weights)[0]
        request = router_pb2.AskRequest(text=self.rng.choice(TEXTS[route]), route=route,
                                        sampling=common_pb2.SamplingParams(max_tokens=self.args.max_tokens))
        code, chosen, first, details = "OK", "?", None, ""
        try:
            async for response in stub.Ask(request, timeout=self.args.deadline_s,
                                           metadata=(("x-mirador-client", client),)):
                kind = response.WhichOneof("event")
                if kind == "route":
                    chosen = response.route.route
                elif kind == "token" and first is None:
                    first = time.monotonic() - scheduled
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        self.calls.append(Call(scheduled - t0, time.monotonic() - scheduled, first,
                               route or f"classified:{chosen}", code, details))

    async def closed(self, clients: int, seconds: float, min_calls: int = PROBE_MIN_CALLS) -> float:
        """`clients` callers, each sending its next call when the last ends, for `seconds`
        (longer, up to 3x, until `min_calls` calls have started: a slow level still gets a sample)."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            t0 = time.monotonic()
            started = 0

            def more() -> bool:
                elapsed = time.monotonic() - t0
                return elapsed < seconds or (started < min_calls and elapsed < 3 * seconds)

            async def caller(index: int) -> None:
                nonlocal started
                while more():
                    started += 1
                    await self.ask(stub, f"soak-{index}", t0, time.monotonic())

            await asyncio.gather(*(caller(i) for i in range(clients)))
            return time.monotonic() - t0

    async def open(self, rate: float, seconds: float, poisson: bool = True) -> float:
        """Arrivals at `rate` per second (Poisson, or evenly spaced) for `seconds`; every call
        starts on time."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            t0 = time.monotonic()
            tasks, next_at, index = [], t0, 0
            while True:
                next_at += self.rng.expovariate(rate) if poisson else 1 / rate
                if next_at >= t0 + seconds:
                    break
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                tasks.append(asyncio.create_task(self.ask(stub, f"soak-{index % 8}", t0, next_at)))
                index += 1
            await asyncio.gather(*tasks)
            return time.monotonic() - t0


def percentiles(values_s: list[float]) -> dict:
    if not values_s:
        return {"p50": None, "p99": None, "p999": None, "max": None}
    ms = np.array(values_s) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 1), "p99": round(float(np.percentile(ms, 99)), 1),
            "p999": round(float(np.percentile(ms, 99.9)), 1), "max": round(float(ms.max()), 1)}


def level_stats(calls: list[Call], window_s: float) -> dict:
    ok = [c for c in calls if c.code == "OK"]
    return {"calls": len(calls), "ok": len(ok), "errors": len(calls) - len(ok),
            "ok_per_s": round(len(ok) / window_s, 3), "window_s": round(window_s, 1),
            "latency_ms": percentiles([c.latency_s for c in ok]),
            "codes": dict(collections.Counter(c.code for c in calls))}


def probe(address: str, args) -> dict:
    """Closed-loop ramp 1, 2, 4, ... clients; stops at the knee (see the module doc)."""
    levels, best, clients, flat = [], None, 1, 0
    while clients <= args.max_clients:
        load = Load(address, args, seed=clients)
        elapsed = asyncio.run(load.closed(clients, args.probe_s))
        stats = {"clients": clients, **level_stats(load.calls, elapsed)}
        failing = stats["errors"] > MAX_ERROR_SHARE * max(1, stats["calls"])
        levels.append(stats)
        print(f"  probe: {clients} client(s): {stats['ok_per_s']:.2f} OK calls/s, p50 {stats['latency_ms']['p50']} ms, "
              f"errors {stats['errors']}/{stats['calls']}", flush=True)
        if failing:
            break
        if best is not None and stats["ok_per_s"] < best["ok_per_s"] * (1 + KNEE_GAIN):
            # One flat level can be noise (2 clients on 2 cores gained 2 %, then 4 clients 50 %):
            # past the knee only when two levels in a row add less than KNEE_GAIN.
            flat += 1
            if flat == 2:
                break
        else:
            best, flat = stats, 0
        clients *= 2
    if best is None:
        raise SystemExit("capacity probe: even one client saw more than 1 % failed calls; "
                         f"levels: {json.dumps(levels)}")
    return {"levels": levels, "capacity_ok_per_s": best["ok_per_s"], "knee_clients": best["clients"],
            "probe_s": args.probe_s, "rule": f"stop when two levels in a row add < {KNEE_GAIN:.0%} throughput "
                                            f"or > {MAX_ERROR_SHARE:.0%} of its calls fail; capacity = the best level"}


class RssSampler(threading.Thread):
    """Every `period_s`, each service's RSS (MB), from `t0` on."""

    def __init__(self, pids: dict[str, int], period_s: float, t0: float):
        super().__init__(daemon=True)
        self.pids, self.period_s, self.t0 = pids, period_s, t0
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.done = threading.Event()

    def sample(self) -> None:
        point = {}
        for name, pid in self.pids.items():
            try:
                point[name] = psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                point[name] = 0.0
        self.samples.append((time.monotonic() - self.t0, point))

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self.done.set()
        self.join(self.period_s + 5)
        self.sample()


def soak(mesh: Mesh, args) -> dict:
    address = mesh.config.services.router.address
    pids = {name: s.process.pid for name, s in mesh.processes.items()}
    began = time.monotonic()
    load_average_start = os.getloadavg()
    with grpc.insecure_channel(address) as channel:
        warm_up(router_pb2_grpc.RouterStub(channel))
    rss = RssSampler(pids, args.sample_s, began)
    rss.sample()
    rss.start()
    if args.rate:
        capacity = None
        rate = args.rate
        print(f"soak at the given rate {rate:g} calls/s (no capacity probe)", flush=True)
    else:
        print(f"capacity probe: closed loop, {args.probe_s:g} s per level ...", flush=True)
        capacity = probe(address, args)
        rate = args.load * capacity["capacity_ok_per_s"]
        print(f"capacity ~{capacity['capacity_ok_per_s']:.2f} OK calls/s at {capacity['knee_clients']} client(s); "
              f"soak at {args.load:.0%} of it: {rate:.2f} calls/s", flush=True)
    soak_began = time.monotonic() - began
    print(f"soaking: open loop, {args.arrivals} arrivals at {rate:.2f} calls/s for {args.duration:g} s ...", flush=True)
    load = Load(address, args, seed=12345)
    elapsed = asyncio.run(load.open(rate, args.duration, poisson=args.arrivals == "poisson"))
    rss.stop()
    alive = {name: s.process.poll() is None for name, s in mesh.processes.items()}
    return summarise(load.calls, rss.samples, soak_began, elapsed, rate, capacity, alive, load_average_start, args)


def error_samples(calls: list[Call], per_cause: int = 3) -> list[dict]:
    """What the failed calls said, grouped by status and message (numbers masked, so one cause is
    one row): how many, on which routes, and when the first few happened."""
    groups: dict[tuple[str, str], list[Call]] = collections.defaultdict(list)
    for c in calls:
        if c.code != "OK":
            groups[(c.code, re.sub(r"\d+(\.\d+)?", "N", c.details)[:200])].append(c)
    rows = [{"code": code, "message": message, "calls": len(group),
             "routes": dict(collections.Counter(c.route.split(":")[0] for c in group)),
             "first_at_s": [round(c.at_s, 1) for c in group[:per_cause]]}
            for (code, message), group in groups.items()]
    return sorted(rows, key=lambda r: -r["calls"])


def summarise(calls: list[Call], rss, soak_began: float, elapsed: float, rate: float, capacity: dict | None,
              alive: dict, load_average_start, args) -> dict:
    stats = level_stats(calls, elapsed)
    ok = [c for c in calls if c.code == "OK"]
    by_route = collections.defaultdict(collections.Counter)
    for c in calls:
        by_route[c.route.split(":")[0]][c.code] += 1
    availability = stats["ok"] / max(1, len(calls))
    first, last = rss[0][1], rss[-1][1]
    # RSS settling: the trend over the soak's second half, per service (MB per minute)
    half = [p for p in rss if p[0] >= soak_began + elapsed / 2]
    trend = {}
    for name in first:
        xs, ys = np.array([p[0] for p in half]), np.array([p[1][name] for p in half])
        trend[name] = float(np.polyfit(xs, ys, 1)[0] * 60) if len(half) > 2 else 0.0
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{fragment.describe(fragment.machine())}, Python {platform.python_version()}", "load_average_start": [round(x, 2) for x in load_average_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "fleet": "tiny test models" if args.tiny else "default fleet (smollm2-135m-instruct-fused-mixed on the generation routes, minilm-l6, ...)",
        "mode": "quick" if args.quick else "full", "max_tokens": args.max_tokens, "deadline_s": args.deadline_s,
        "settings_overridden": list(args.set),
        "mix": {r or "classified": w for r, w in MIX},
        "capacity": capacity,
        "load": {"arrivals": f"{'Poisson' if args.arrivals == 'poisson' else 'evenly spaced'} arrivals (open loop)",
                 "rate_per_s": round(rate, 3),
                 "share_of_capacity": None if capacity is None else args.load, "duration_s": args.duration},
        "requests": len(calls), "elapsed_s": round(elapsed, 1),
        "throughput_ok_per_s": stats["ok_per_s"], "offered_per_s": round(len(calls) / args.duration, 3),
        "latency_ms": stats["latency_ms"],
        "first_token_ms": percentiles([c.first_token_s for c in ok if c.first_token_s is not None]),
        "codes": stats["codes"], "by_route": {k: dict(v) for k, v in sorted(by_route.items())},
        "error_samples": error_samples(calls),
        "availability": round(availability, 5), "article_availability": ARTICLE_AVAILABILITY,
        "meets_article": availability >= ARTICLE_AVAILABILITY,
        "rss_mb": {"first": {k: round(v, 1) for k, v in first.items()}, "last": {k: round(v, 1) for k, v in last.items()},
                   "peak": {k: round(max(p[k] for _, p in rss), 1) for k in first},
                   "soak_second_half_trend_mb_per_min": {k: round(v, 2) for k, v in trend.items()},
                   "soak_began_s": round(soak_began, 1),
                   "samples": [(round(t, 1), {k: round(v, 1) for k, v in p.items()}) for t, p in rss]},
        "services_alive_after": alive,
        "calls": [(round(c.at_s, 2), round(c.latency_s * 1000, 1), c.code) for c in calls],
    }


def markdown(result: dict, name: str) -> list[str]:
    lat, ftl, load = result["latency_ms"], result["first_token_ms"], result["load"]
    parts = [f"{result['fleet']}; {result['machine']}; load average at start {result['load_average_start'][0]}, "
             f"at end {result['load_average_end'][0]}; max_tokens {result['max_tokens']}, client deadline "
             f"{result['deadline_s']:g} s; route mix {json.dumps(result['mix'])}"
             + (f"; settings overridden: {', '.join(result['settings_overridden'])}." if result.get("settings_overridden") else ".")]
    capacity = result["capacity"]
    if capacity:
        parts.append(fragment.table(
            ["clients", "calls", "OK calls/s", "p50 ms", "p99 ms", "errors"],
            [[lv["clients"], lv["calls"], lv["ok_per_s"], lv["latency_ms"]["p50"], lv["latency_ms"]["p99"], lv["errors"]]
             for lv in capacity["levels"]],
            title=f"Capacity probe: closed loop, {capacity['probe_s']:g} s per level ({capacity['rule']}): "
                  f"capacity {capacity['capacity_ok_per_s']:.2f} OK calls/s at {capacity['knee_clients']} client(s)"))
    share = f" = {load['share_of_capacity']:.0%} of capacity" if load["share_of_capacity"] else " (given)"
    few = " (fewer than 1000 calls: p999 is the maximum in all but name)" if result["requests"] < 1000 else ""
    parts.append(fragment.table(["measure", "value"], [
        ["offered load", f"{load['rate_per_s']:.2f} calls/s{share}, {load['arrivals']}, {load['duration_s']:g} s"],
        ["calls (arrivals)", f"{result['requests']} ({result['offered_per_s']:.2f}/s over {load['duration_s']:g} s)"],
        ["throughput (OK calls/s, to the end of the last call)", result["throughput_ok_per_s"]],
        ["latency p50 / p99 / p999 (ms, whole stream)", f"{lat['p50']} / {lat['p99']} / {lat['p999']} (max {lat['max']}){few}"],
        ["first token p50 / p99 / p999 (ms)", f"{ftl['p50']} / {ftl['p99']} / {ftl['p999']}"],
        ["status codes", ", ".join(f"{k} {v}" for k, v in sorted(result["codes"].items()))],
        ["availability (OK / all calls)", f"{result['availability'] * 100:.2f} % (article: "
                                          f"{result['article_availability'] * 100:.1f} %: "
                                          f"{'meets it' if result['meets_article'] else 'below it'})"],
        ["services alive after", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in result["services_alive_after"].items())],
    ], title="Soak (open loop)"))
    codes = sorted({c for v in result["by_route"].values() for c in v})
    parts.append(fragment.table(["route"] + codes, [[route] + [counts.get(c, 0) for c in codes]
                                                    for route, counts in result["by_route"].items()],
                                title="Calls by route and status"))
    if result.get("error_samples"):
        parts.append(fragment.table(["status", "message (numbers as N)", "calls", "routes", "first at (s)"],
                                    [[r["code"], r["message"], r["calls"], ", ".join(f"{k} {v}" for k, v in r["routes"].items()),
                                      ", ".join(map(str, r["first_at_s"]))] for r in result["error_samples"]],
                                    title="Failed calls by cause"))
    rss = result["rss_mb"]
    names = list(rss["first"])
    parts.append(fragment.table(["service", "RSS first MB", "RSS last MB", "peak MB", "soak 2nd-half trend MB/min"],
                                [[n, rss["first"][n], rss["last"][n], rss["peak"][n],
                                  rss["soak_second_half_trend_mb_per_min"][n]] for n in names],
                                title=f"RSS of each service (every sample in {name}.json)"))
    samples = rss["samples"]
    step = max(1, len(samples) // 10)
    shown = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    parts.append(fragment.table(["t (s)", "phase"] + [f"{n} MB" for n in names],
                                [[t, "soak" if t >= rss["soak_began_s"] else "probe / warm"] + [p[n] for n in names]
                                 for t, p in shown],
                                title="RSS over time (seconds since the mesh answered)"))
    if result["load"]["duration_s"] < 120:
        parts.append(f"A {result['load']['duration_s']:g} s soak is too short for the RSS trend to mean much "
                     "(the full run soaks for minutes).")
    parts.append(f"![soak: capacity probe, latency over time, RSS over time]({name}.png)")
    return parts


def report(result: dict, out: Path, name: str = "soak") -> None:
    out.mkdir(parents=True, exist_ok=True)
    parts = markdown(result, name)
    print("\n" + "\n\n".join(parts[1:-1]))
    summary = {k: v for k, v in result.items() if k != "calls"}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2))
    plot(result, out / f"{name}.png")
    fragment.write(out, name, parts)


def plot(result: dict, path: Path) -> None:
    plt = fragment.pyplot()
    if plt is None:
        return
    capacity = result["capacity"]
    fig, axes = plt.subplots(3 if capacity else 2, 1, figsize=(9, 10 if capacity else 7))
    if capacity:
        top = axes[0]
        levels = capacity["levels"]
        top.plot([lv["clients"] for lv in levels], [lv["ok_per_s"] for lv in levels], "o-", label="OK calls/s")
        top.axhline(result["load"]["rate_per_s"], color="grey", linestyle=":", label="soak rate")
        top.set_xscale("log", base=2)
        top.set_xlabel("closed-loop clients")
        top.set_ylabel("OK calls/s")
        twin = top.twinx()
        twin.plot([lv["clients"] for lv in levels], [lv["latency_ms"]["p50"] or 0 for lv in levels], "s--",
                  color="tab:orange", label="p50 ms")
        twin.set_ylabel("p50 latency (ms)")
        top.set_title(f"Capacity probe: {capacity['capacity_ok_per_s']:.2f} OK calls/s at {capacity['knee_clients']} client(s)")
        top.legend(loc="upper left")
        twin.legend(loc="lower right")
    middle, bottom = axes[-2], axes[-1]
    ok = [(t, ms) for t, ms, code in result["calls"] if code == "OK"]
    bad = [(t, ms) for t, ms, code in result["calls"] if code != "OK"]
    if ok:
        middle.scatter(*zip(*ok), s=6, alpha=0.6, label="OK")
    if bad:
        middle.scatter(*zip(*bad), s=14, color="red", marker="x", label="error")
    middle.set_yscale("log")
    middle.set_xlabel("soak time (s)")
    middle.set_ylabel("Ask latency (ms)")
    lat = result["latency_ms"]
    middle.set_title(f"Soak: {result['load']['rate_per_s']:.2f} calls/s offered, "
                     f"availability {result['availability'] * 100:.2f} %, p50 {lat['p50']} ms, p99 {lat['p99']} ms")
    middle.legend(loc="upper right")
    samples = result["rss_mb"]["samples"]
    for name in result["rss_mb"]["first"]:
        bottom.plot([t for t, _ in samples], [p[name] for _, p in samples], label=name)
    bottom.axvline(result["rss_mb"]["soak_began_s"], color="grey", linestyle=":", label="soak begins")
    bottom.set_xlabel("time since the mesh answered (s)")
    bottom.set_ylabel("RSS (MB)")
    bottom.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (a `kill`, a runner's timeout) unwinds like Ctrl-C, so the mesh's services are stopped too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=None, help="soak seconds (default 180; 30 with --quick)")
    parser.add_argument("--load", type=float, default=0.7, help="soak rate as a share of the probed capacity")
    parser.add_argument("--rate", type=float, default=None, help="soak at this many calls/s; skips the probe")
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson",
                        help="Poisson arrivals (bursty, as independent clients are), or evenly spaced")
    parser.add_argument("--probe-s", type=float, default=None, help="seconds per probe level (default 20; 8 with --quick)")
    parser.add_argument("--max-clients", type=int, default=16, help="the probe's last level at most")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--deadline-s", type=float, default=30.0, help="each Ask's client deadline")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval")
    parser.add_argument("--quick", action="store_true", help="short run: 8 s probe levels, 30 s soak")
    parser.add_argument("--tiny", action="store_true", help="tiny test models instead of the default fleet")
    parser.add_argument("--set", action="append", default=[], metavar="SERVICE.KEY=VALUE",
                        help="override a service setting of the default config (repeatable), for A/B runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--keep-logs", type=Path, default=None, help="write the services' logs here (kept)")
    parser.add_argument("--name", default=None, help="output files NAME.json/.png/.md (default soak, soak-quick with --quick)")
    args = parser.parse_args(argv)
    args.duration = args.duration or (30.0 if args.quick else 180.0)
    args.probe_s = args.probe_s or (8.0 if args.quick else 20.0)
    args.name = args.name or ("soak-quick" if args.quick else "soak")
    result = run(args)
    report(result, args.out, args.name)
    return 0 if all(result["services_alive_after"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
