"""Fault scenarios on tiny real models and real service processes, shared by
tests/test_faults.py (which asserts on what each returns) and bench/faults.py (which
repeats them and tabulates).

Each scenario injects one fault and returns what a client saw (status code, message,
tokens before an error, the summary), what was retried or fallen back to, and what
was still there afterwards. Faults come from the services' own injection points
(services/model_host/faults.py, services/common/faults.py) and from SIGKILL.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc
import yaml
from mirador.v1 import common_pb2, consensus_pb2, consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc
from mirador.v1 import router_pb2, router_pb2_grpc

from conftest import write_config
from services.cli.supervisor import Mesh, health_status
from services.common.config import load_config
from services.common.faults import CRASH_ENV_VAR
from services.common.model_repository import ModelRepository
from services.model_host.faults import ENV_VAR as DELAY_ENV
from services.model_host.faults import LOAD_DELAY_ENV_VAR, TOKEN_DELAY_ENV_VAR
from tiny_models import build_tiny_decoder, write_corrupt_model

MB = 1024 * 1024
MODEL_HOST_SERVICE = "mirador.v1.ModelHost"
SLOW_MS = 3000  # slow-lm waits this long before its prefill
TOKEN_DELAY_MS = 40  # drip-lm (and the budget scenario's cold model) waits this long before each decode step
HUNG_ROUTE_TIMEOUT_MS = 1500
MID = {"kv_heads": 4, "head_dim": 64, "num_layers": 2}  # a ~9 MB decoder: big enough to measure in RSS

ROUTER_FLEET = f"""
fleet:
  tiny-lm: {{task: text-generation, tier: hot}}
  tiny-lm-b: {{task: text-generation, tier: hot}}
  slow-lm: {{task: text-generation, tier: hot}}
  hung-lm: {{task: text-generation, tier: hot}}
  drip-lm: {{task: text-generation, tier: hot}}
  broken-lm: {{task: text-generation, tier: cold}}
routes:
  chat: {{primary: tiny-lm, fallback: tiny-lm-b, timeout_ms: 10000}}
  # half of 4 s is less than slow-lm's delay: the router gives up on it and falls back
  slow: {{primary: slow-lm, fallback: tiny-lm, timeout_ms: 4000}}
  # half of 20 s is more than slow-lm's delay: the router waits for it (a kill makes it fall back)
  slow-start: {{primary: slow-lm, fallback: tiny-lm-b, timeout_ms: 20000}}
  hung: {{primary: hung-lm, timeout_ms: {HUNG_ROUTE_TIMEOUT_MS}}}
  stream: {{primary: drip-lm, fallback: tiny-lm-b, timeout_ms: 30000}}
  flaky: {{primary: broken-lm, fallback: tiny-lm, timeout_ms: 10000}}
"""
ROUTER_HOT = ("tiny-lm", "tiny-lm-b", "slow-lm", "hung-lm", "drip-lm")


# --------------------------------------------------------------------------- client side


@dataclass
class Outcome:
    """What one client call saw."""

    code: str  # "OK" or the status name
    details: str = ""
    tokens: int = 0  # token chunks received (before the error, if any)
    summary: object | None = None  # AskSummary / GenerateSummary when the answer completed
    elapsed_s: float = 0.0

    @property
    def complete(self) -> bool:
        return self.code == "OK" and self.summary is not None


def ask(address: str, route: str, text: str = "hello there", max_tokens: int = 4, timeout_s: float = 30.0,
        on_event: Callable[[str, int], None] | None = None, request_id: str = "") -> Outcome:
    """One Router.Ask; `on_event(kind, tokens_so_far)` runs after each message (to inject a fault there)."""
    started = time.monotonic()
    tokens, summary = 0, None
    with grpc.insecure_channel(address) as channel:
        stream = router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(
            text=text, route=route, request_id=request_id,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=timeout_s)
        try:
            for response in stream:
                kind = response.WhichOneof("event")
                tokens += kind == "token"
                if kind == "summary":
                    summary = response.summary
                if on_event is not None:
                    on_event(kind, tokens)
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "", tokens, None, time.monotonic() - started)
    return Outcome("OK", "", tokens, summary, time.monotonic() - started)


def generate(address: str, model: str, max_tokens: int = 4, timeout_s: float = 30.0, text: str = "hello") -> Outcome:
    """One ModelHost.Generate, straight to a host."""
    started = time.monotonic()
    tokens, summary = 0, None
    with grpc.insecure_channel(address) as channel:
        try:
            for response in model_host_pb2_grpc.ModelHostStub(channel).Generate(model_host_pb2.GenerateRequest(
                    model=model, messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)],
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens)), timeout=timeout_s):
                if response.HasField("token"):
                    tokens += 1
                else:
                    summary = response.summary
        except grpc.RpcError as exc:
            return Outcome(exc.code().name, exc.details() or "", tokens, None, time.monotonic() - started)
    return Outcome("OK", "", tokens, summary, time.monotonic() - started)


def host_call(address: str, method: str, request, timeout_s: float = 30.0):
    """A unary ModelHost call: (reply, None) or (None, (code name, details))."""
    with grpc.insecure_channel(address) as channel:
        try:
            return getattr(model_host_pb2_grpc.ModelHostStub(channel), method)(request, timeout=timeout_s), None
        except grpc.RpcError as exc:
            return None, (exc.code().name, exc.details() or "")


def listing(address: str) -> model_host_pb2.ListModelsResponse:
    reply, error = host_call(address, "ListModels", model_host_pb2.ListModelsRequest(), timeout_s=5)
    if error:
        raise AssertionError(f"ListModels on {address}: {error}")
    return reply


def models_of(address: str) -> dict[str, model_host_pb2.ModelStatus]:
    return {m.name: m for m in listing(address).models}


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(interval_s)


def wait_ready(address: str, names, timeout_s: float = 60.0) -> None:
    wait_for(lambda: all(models_of(address)[n].ready for n in names), timeout_s, f"{sorted(names)} ready on {address}",
             interval_s=0.1)


# --------------------------------------------------------------------------- processes


def replica_names(mesh: Mesh) -> list[str]:
    return [name for name in mesh.processes if name.startswith("model_host")]


def address_of(mesh: Mesh, name: str) -> str:
    return mesh.processes[name].settings.address


def kill_9(mesh: Mesh, name: str) -> int:
    """SIGKILL by PID; returns the exit code (-9)."""
    process = mesh.processes[name].process
    os.kill(process.pid, signal.SIGKILL)
    return process.wait(10)


def restart(mesh: Mesh, name: str, ready: tuple[str, ...] = (), timeout_s: float = 60.0) -> None:
    """Starts a (killed) process of `mesh` again, on the same port and config, and waits for it."""
    service = mesh.processes[name]
    if service.process.poll() is None:
        raise AssertionError(f"{name} is still running")
    mesh.processes[name] = mesh._spawn(name, service.settings)  # the supervisor's own way of starting one
    address = service.settings.address
    wait_for(lambda: mesh.processes[name].process.poll() is not None or health_status(address, timeout_s=0.5) == "SERVING",
             timeout_s, f"{name} SERVING again", interval_s=0.1)
    if mesh.processes[name].process.poll() is not None:
        raise AssertionError(f"{name} exited while restarting:\n{mesh.processes[name].log_tail()}")
    if ready:
        wait_ready(address, ready, timeout_s)


def replica_serving(mesh: Mesh, model: str, timeout_s: float = 5.0) -> str:
    """The replica with a call of `model` in flight now."""
    def find():
        for name in replica_names(mesh):
            if mesh.processes[name].process.poll() is None and models_of(address_of(mesh, name))[model].requests_in_flight:
                return name
        return None
    return wait_for(find, timeout_s, f"a replica serving {model}", interval_s=0.02)


def served_totals(mesh: Mesh, model: str) -> dict[str, int]:
    return {name: models_of(address_of(mesh, name))[model].requests_total
            for name in replica_names(mesh) if mesh.processes[name].process.poll() is None}


# --------------------------------------------------------------------------- the router mesh


def start_router_mesh(directory: Path, replicas: int = 2) -> Mesh:
    """Router + `replicas` model hosts over the tiny fleet, with slow-lm slow, hung-lm hung and
    drip-lm streaming slowly (all injected in every replica). Identical replicas: the router
    balances them with round_robin (placement's own failover is tests/test_placement_hosts.py,
    where a call that lost its host before its first token is answered by the same model elsewhere)."""
    repository = ModelRepository(directory / "models")
    for seed, name in enumerate(ROUTER_HOT):
        build_tiny_decoder(repository, name, seed=seed)
    write_corrupt_model(repository, "broken-lm")
    config = load_config(write_config(directory, {"router": "model_host_balancing: round_robin"}, body=ROUTER_FLEET))
    mesh = Mesh(config, log_dir=directory / "logs", services=("router", "model_host"), replicas=replicas, env={
        DELAY_ENV: f"slow-lm={SLOW_MS},hung-lm=hang",
        TOKEN_DELAY_ENV_VAR: f"drip-lm={TOKEN_DELAY_MS}",
        "XDG_CACHE_HOME": str(directory / "cache"),
    })
    mesh.start(timeout_s=90)
    try:
        for name in replica_names(mesh):
            wait_ready(address_of(mesh, name), ROUTER_HOT)
    except BaseException:
        mesh.stop()
        raise
    return mesh


def router_address(mesh: Mesh) -> str:
    return mesh.config.services.router.address


def ensure_replicas_up(mesh: Mesh, timeout_s: float = 30.0) -> None:
    """Restarts any killed replica and waits until the router sends calls to every replica."""
    restarted = [name for name in replica_names(mesh) if mesh.processes[name].process.poll() is not None]
    for name in restarted:
        restart(mesh, name, ready=ROUTER_HOT)
    if not restarted:
        return
    # The router's channel reconnects with backoff: ask until the restarted replicas answer some calls.
    before = served_totals(mesh, "tiny-lm")

    def reached():
        ask(router_address(mesh), "chat", max_tokens=1, timeout_s=10)
        now = served_totals(mesh, "tiny-lm")
        return all(now[name] > before[name] for name in restarted)
    wait_for(reached, timeout_s, f"the router calling the restarted {restarted}", interval_s=0.1)


@dataclass
class KillResult:
    outcome: Outcome  # what the client of the call in flight saw
    victim: str  # the replica killed
    exit_code: int | None
    next_outcome: Outcome  # the next call through the router
    next_served_by: list[str] = field(default_factory=list)  # replicas whose count grew for the next call
    router_health: str = ""


def kill_mid_stream(mesh: Mesh, after_tokens: int = 5, max_tokens: int = 200) -> KillResult:
    """Kill -9 the replica streaming drip-lm's answer once the client has `after_tokens` tokens."""
    killed: dict[str, object] = {}

    def on_event(kind: str, tokens: int) -> None:
        if kind == "token" and tokens == after_tokens and not killed:
            victim = replica_serving(mesh, "drip-lm")
            killed.update(victim=victim, code=kill_9(mesh, victim))

    outcome = ask(router_address(mesh), "stream", max_tokens=max_tokens, timeout_s=30, on_event=on_event)
    return _after_kill(mesh, outcome, killed)


def kill_before_first_token(mesh: Mesh) -> KillResult:
    """Kill -9 the replica holding slow-lm's call while it waits before its prefill (no token sent yet)."""
    killed: dict[str, object] = {}

    def on_event(kind: str, tokens: int) -> None:
        if kind == "route" and not killed:
            victim = replica_serving(mesh, "slow-lm", timeout_s=SLOW_MS / 1000 * 0.8)
            killed.update(victim=victim, code=kill_9(mesh, victim))

    outcome = ask(router_address(mesh), "slow-start", max_tokens=4, timeout_s=30, on_event=on_event)
    return _after_kill(mesh, outcome, killed)


@dataclass
class BatchKillResult:
    outcomes: list[Outcome]  # every concurrent stream's client
    victim: str
    exit_code: int | None
    in_flight_on_victim: int  # drip-lm calls the victim held (one batch) when it died
    next_outcomes: list[Outcome]  # calls through the router after the kill
    router_health: str


def kill_mid_batch(mesh: Mesh, streams: int = 4, after_tokens: int = 5, max_tokens: int = 200) -> BatchKillResult:
    """`streams` clients stream drip-lm's answer at once (the replicas' engines batch them); once one
    has `after_tokens` tokens, kill -9 the replica it streams from."""
    killed: dict[str, object] = {}
    lock = threading.Lock()

    def on_event(kind: str, tokens: int) -> None:
        if kind != "token" or tokens != after_tokens:
            return
        with lock:
            if not killed:
                victim = replica_serving(mesh, "drip-lm")
                in_flight = models_of(address_of(mesh, victim))["drip-lm"].requests_in_flight
                killed.update(victim=victim, in_flight=in_flight, code=kill_9(mesh, victim))

    results: list[Outcome | None] = [None] * streams

    def client(i: int) -> None:
        results[i] = ask(router_address(mesh), "stream", text=f"stream number {i}", max_tokens=max_tokens,
                         timeout_s=30, on_event=on_event)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    following = [ask(router_address(mesh), "chat", max_tokens=4, timeout_s=10) for _ in range(4)]
    return BatchKillResult([r for r in results if r is not None], str(killed.get("victim", "")), killed.get("code"),
                           int(killed.get("in_flight", 0)), following, health_status(router_address(mesh), timeout_s=2))


def _after_kill(mesh: Mesh, outcome: Outcome, killed: dict) -> KillResult:
    before = served_totals(mesh, "tiny-lm")
    following = ask(router_address(mesh), "chat", max_tokens=4, timeout_s=10)
    after = served_totals(mesh, "tiny-lm")
    return KillResult(outcome, killed.get("victim", ""), killed.get("code"), following,
                      [n for n in after if after[n] > before.get(n, 0)],
                      health_status(router_address(mesh), timeout_s=2))


@dataclass
class HangResult:
    outcome: Outcome
    in_flight_after: dict[str, int]  # hung-lm calls still open on each replica once the client has its answer
    router_health: str
    next_outcome: Outcome


def hung_model(mesh: Mesh, client_timeout_s: float = 30.0) -> HangResult:
    outcome = ask(router_address(mesh), "hung", timeout_s=client_timeout_s)

    def open_calls():
        return {n: models_of(address_of(mesh, n))["hung-lm"].requests_in_flight for n in replica_names(mesh)}
    try:  # the router cancels its call: the host's wait ends and its slot is freed
        in_flight = wait_for(lambda: (lambda c: c if not any(c.values()) else None)(open_calls()), 3.0,
                             "hung-lm calls cancelled")
    except AssertionError:
        in_flight = open_calls()
    return HangResult(outcome, in_flight, health_status(router_address(mesh), timeout_s=2),
                      ask(router_address(mesh), "chat", timeout_s=10))


@dataclass
class CorruptResult:
    load: tuple[str, str]  # LoadModel: (code, details)
    generate: Outcome  # Generate on the broken model, straight to the host
    state: str  # ListModels state name and detail of the broken model
    detail: str
    model_file: str  # the corrupt file's path
    others: Outcome  # another model on the same host
    through_router: Outcome  # a route whose primary is the broken model
    host_alive: bool


def corrupt_model(mesh: Mesh) -> CorruptResult:
    host = address_of(mesh, "model_host")
    _, load_error = host_call(host, "LoadModel", model_host_pb2.LoadModelRequest(model="broken-lm"))
    generated = generate(host, "broken-lm")
    status = models_of(host)["broken-lm"]
    model_file = mesh.config.model_repository / "broken-lm" / "1" / "model.onnx"
    return CorruptResult(
        load=load_error or ("OK", ""), generate=generated,
        state=model_host_pb2.ModelState.Name(status.state), detail=status.detail, model_file=str(model_file),
        others=generate(host, "tiny-lm"), through_router=ask(router_address(mesh), "flaky"),
        host_alive=mesh.processes["model_host"].process.poll() is None,
    )


# --------------------------------------------------------------------------- kill -9 during a load


LOAD_FLEET = """
fleet:
  load-lm: {task: text-generation, tier: cold}
routes:
  chat: {primary: load-lm}
"""


@dataclass
class LoadKillResult:
    load_during: tuple[str, str]  # the LoadModel call in flight at the kill
    generate_during: Outcome  # a Generate waiting on the same load
    state_at_kill: str
    partials_at_kill: list[str]  # optimised graphs half-written when the host died
    committed_at_kill: list[str]  # optimised graphs in the cache under their final name
    exit_code: int | None
    load_after_restart: tuple[str, str]
    partials_after: list[str]
    committed_after: list[str]
    text_after_restart: str
    load_after_truncated_cache: tuple[str, str]  # the cached graph cut in half, then unload + load
    text_after_truncated_cache: str
    cache_rebuilt: bool


def kill_during_load(directory: Path, load_pause_ms: int = 60_000) -> LoadKillResult:
    repository = ModelRepository(directory / "models")
    build_tiny_decoder(repository, "load-lm", seed=5, **MID)
    config = load_config(write_config(directory, body=LOAD_FLEET))
    cache = directory / "cache"
    optimized = cache / "mirador" / "optimized" / "load-lm" / "1"
    env = {"XDG_CACHE_HOME": str(cache)}
    host = Mesh(config, log_dir=directory / "logs", services=("model_host",),
                env={**env, LOAD_DELAY_ENV_VAR: f"load-lm={load_pause_ms}"})
    address = config.services.model_host.address
    host.start(timeout_s=60)
    try:
        results: dict[str, object] = {}
        load = threading.Thread(target=lambda: results.update(load=host_call(
            address, "LoadModel", model_host_pb2.LoadModelRequest(model="load-lm"), timeout_s=load_pause_ms / 1000)))
        load.start()
        wait_for(lambda: models_of(address)["load-lm"].state == model_host_pb2.MODEL_STATE_LOADING, 30, "load-lm loading")
        waiting = threading.Thread(target=lambda: results.update(generate=generate(address, "load-lm", timeout_s=30)))
        waiting.start()
        wait_for(lambda: list(optimized.glob("*.partial")), 30, "the optimised graph written (not committed)")
        state = model_host_pb2.ModelState.Name(models_of(address)["load-lm"].state)
        time.sleep(0.2)  # the Generate call has reached the host and waits on the load
        code = kill_9(host, "model_host")
        load.join(30)
        waiting.join(30)
        partials_at_kill = sorted(p.name for p in optimized.glob("*.partial"))
        committed_at_kill = sorted(p.name for p in optimized.glob("*.onnx"))
    finally:
        host.stop()

    again = Mesh(config, log_dir=directory / "logs", services=("model_host",), env=env)
    again.start(timeout_s=60)
    try:
        _, error = host_call(address, "LoadModel", model_host_pb2.LoadModelRequest(model="load-lm"))
        load_after = error or ("OK", "")
        partials_after = sorted(p.name for p in optimized.glob("*.partial"))
        committed = sorted(optimized.glob("*.onnx"))
        text_after = generate(address, "load-lm", max_tokens=8)
        # A half-written graph under the cache's own name (what a non-atomic write would leave):
        # the next load must notice, rebuild it and serve the same answers.
        size = committed[0].stat().st_size if committed else 0
        if committed:
            committed[0].write_bytes(committed[0].read_bytes()[: size // 2])
        host_call(address, "UnloadModel", model_host_pb2.UnloadModelRequest(model="load-lm"))
        _, error = host_call(address, "LoadModel", model_host_pb2.LoadModelRequest(model="load-lm"))
        text_truncated = generate(address, "load-lm", max_tokens=8)
        rebuilt = bool(committed) and committed[0].exists() and committed[0].stat().st_size == size
    finally:
        again.stop()
    load_during = results.get("load", (None, ("NONE", "")))[1] or ("OK", "")
    return LoadKillResult(
        load_during=load_during, generate_during=results.get("generate", Outcome("NONE")),
        state_at_kill=state, partials_at_kill=partials_at_kill, committed_at_kill=committed_at_kill, exit_code=code,
        load_after_restart=load_after, partials_after=partials_after, committed_after=[p.name for p in committed],
        text_after_restart=text_after.summary.text if text_after.complete else f"<{text_after.code}>",
        load_after_truncated_cache=error or ("OK", ""),
        text_after_truncated_cache=text_truncated.summary.text if text_truncated.complete else f"<{text_truncated.code}>",
        cache_rebuilt=rebuilt,
    )


# --------------------------------------------------------------------------- a full memory budget


BUDGET_FLEET = """
fleet:
  pinned-lm: {task: text-generation, tier: hot}
  warm-lm: {task: text-generation, tier: warm}
  cold-lm: {task: text-generation, tier: cold}
routes:
  chat: {primary: warm-lm}
"""


@dataclass
class BudgetResult:
    sizes_mb: dict[str, float]  # measured by the host with no budget
    budget_mb: int
    evicting_load: Outcome  # cold-lm loaded into a full budget: the idle warm model makes room
    after_eviction: dict[str, tuple[str, str]]  # model: (state, detail)
    # warm-lm while cold-lm streams and pinned-lm is pinned: nothing idle can be evicted (refused at
    # once, or answered once the stream ended, with room_wait_s long enough)
    during_stream: Outcome
    stream: Outcome  # the cold-lm stream in flight during the refusal
    retried_later: Outcome  # warm-lm again once the stream ended
    after_retry: dict[str, tuple[str, str]]
    host_alive: bool
    host_health: str


def full_memory_budget(directory: Path, stream_tokens: int = 40, room_wait_s: float = 0) -> BudgetResult:
    """The budget is set (by a config reload) from the sizes the host measured, so that any two of
    the three ~9 MB models fit and all three do not, whatever this machine's allocator does.
    `room_wait_s`: how long the host lets a load wait for calls on busy models to end."""
    repository = ModelRepository(directory / "models")
    for seed, name in enumerate(("pinned-lm", "warm-lm", "cold-lm"), start=20):
        build_tiny_decoder(repository, name, seed=seed, **MID)
    path = write_config(directory, {"model_host": f"room_wait_s: {room_wait_s}s"}, body=BUDGET_FLEET)
    config = load_config(path)
    address = config.services.model_host.address
    host = Mesh(config, log_dir=directory / "logs", services=("model_host",), env={
        TOKEN_DELAY_ENV_VAR: f"cold-lm={TOKEN_DELAY_MS}", "XDG_CACHE_HOME": str(directory / "cache")})
    host.start(timeout_s=60)
    try:
        wait_ready(address, ["pinned-lm"])
        for name in ("warm-lm", "cold-lm"):
            loaded = generate(address, name)
            if not loaded.complete:
                raise AssertionError(f"{name} did not answer with no budget: {loaded}")
        sizes = {name: m.memory_bytes for name, m in models_of(address).items()}
        budget_mb = math.ceil((sizes["pinned-lm"] + max(sizes["warm-lm"], sizes["cold-lm"])) / MB) + 1
        data = yaml.safe_load(path.read_text())
        data["services"]["model_host"]["memory_budget_mb"] = budget_mb
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        os.kill(host.processes["model_host"].process.pid, signal.SIGHUP)
        wait_for(lambda: listing(address).memory_budget_bytes == budget_mb * MB, 20, "the new budget applied")

        host_call(address, "UnloadModel", model_host_pb2.UnloadModelRequest(model="cold-lm"))
        evicting = generate(address, "cold-lm")
        after_eviction = _states(address)

        results: dict[str, Outcome] = {}
        streaming = threading.Thread(target=lambda: results.update(
            stream=generate(address, "cold-lm", max_tokens=stream_tokens, timeout_s=60)))
        streaming.start()
        wait_for(lambda: models_of(address)["cold-lm"].requests_in_flight, 10, "cold-lm streaming")
        during_stream = generate(address, "warm-lm")
        streaming.join(60)
        retried = generate(address, "warm-lm")
        after_retry = _states(address)
        alive = host.processes["model_host"].process.poll() is None
        health = health_status(address, MODEL_HOST_SERVICE, timeout_s=2)
    finally:
        host.stop()
    return BudgetResult(
        sizes_mb={k: round(v / MB, 1) for k, v in sizes.items()}, budget_mb=budget_mb,
        evicting_load=evicting, after_eviction=after_eviction, during_stream=during_stream,
        stream=results.get("stream", Outcome("NONE")), retried_later=retried, after_retry=after_retry,
        host_alive=alive, host_health=health,
    )


def _states(address: str) -> dict[str, tuple[str, str]]:
    return {name: (model_host_pb2.ModelState.Name(m.state), m.detail) for name, m in models_of(address).items()}


# --------------------------------------------------------------------------- consensus dies after the commit


VOTERS = ["voter-a", "voter-b", "voter-c"]
OPTIONS = ["Y", "N", "R"]  # one byte token each, as in tests/test_consensus.py
CONSENSUS_FLEET = """
fleet:
  voter-a: {task: text-generation, tier: hot}
  voter-b: {task: text-generation, tier: hot}
  voter-c: {task: text-generation, tier: hot}
routes:
  compliance:
    primary: voter-a
    validators: [voter-b, voter-c]
    consensus_threshold: 0.8
    options: [compliant, non-compliant, needs review]
"""


class ConsensusEnv:
    """A model host with three voters, and the consensus service (started, killed, restarted)."""

    def __init__(self, directory: Path):
        repository = ModelRepository(directory / "models")
        for seed, name in enumerate(VOTERS, start=11):
            build_tiny_decoder(repository, name, seed=seed)
        self.directory = directory
        self.config = load_config(write_config(directory, body=CONSENSUS_FLEET))
        self.host = Mesh(self.config, log_dir=directory / "logs", services=("model_host",),
                         env={"XDG_CACHE_HOME": str(directory / "cache")})
        self.consensus: Mesh | None = None
        self.host.start(timeout_s=60)
        try:
            wait_ready(self.config.services.model_host.address, VOTERS)
        except BaseException:
            self.host.stop()
            raise
        self.disputed = find_disputed(self.config.services.model_host.address)

    @property
    def address(self) -> str:
        return self.config.services.consensus.address

    def start_consensus(self, crash_after_commit: bool) -> None:
        env = {CRASH_ENV_VAR: "after-escalation-commit"} if crash_after_commit else {}
        self.consensus = Mesh(self.config, log_dir=self.directory / "logs", services=("consensus",), env=env)
        self.consensus.start(timeout_s=60)

    def stop(self) -> None:
        if self.consensus is not None:
            self.consensus.stop()
        self.host.stop()


def find_disputed(host_address: str, wanted: int = 3) -> list[str]:
    """Questions the voters disagree on (consistency below 1, so a threshold of 1.0 escalates)."""
    from services.consensus import voting
    from services.common.decision_prompt import decision_messages

    found = []
    with grpc.insecure_channel(host_address) as channel:
        host = model_host_pb2_grpc.ModelHostStub(channel)
        for n in range(100):
            text = f"Request {n}: is this compliant?"
            ballots = []
            for i, model in enumerate(VOTERS):
                reply = host.Score(model_host_pb2.ScoreRequest(
                    model=model, messages=decision_messages(_user(text), OPTIONS), options=OPTIONS), timeout=10)
                ballots.append(voting.Ballot(model, primary=i == 0, answer=reply.best_option,
                                             confidence=reply.confidence.calibrated_confidence,
                                             distribution={p.label: p.probability
                                                           for p in reply.confidence.label_distribution}))
            if voting.label_vote(ballots, OPTIONS).consistency < 0.9:
                found.append(text)
                if len(found) == wanted:
                    return found
    raise AssertionError(f"the voters agree on every question; found only {found}")


def _user(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


@dataclass
class CrashResult:
    code: str  # what the Decide caller saw
    details: str
    votes_seen: list  # the votes streamed before the crash
    exit_code: int | None
    stored: object | None  # the escalation found after the restart (pb.Escalation), by request id
    stored_count: int  # escalations with this request id after the restart
    decisions_counted: int  # GetStats decisions for the route, after the restart
    retry_code: str  # the same Decide again, on the restarted service
    retry_verdict: object | None
    count_after_retry: int  # escalations with this request id after the retry (1: it replayed the case)


def consensus_crash_after_commit(env: ConsensusEnv, question: str, request_id: str) -> CrashResult:
    """Decide with the crash point armed; then restart without it and look for the case."""
    env.start_consensus(crash_after_commit=True)
    request = consensus_pb2.DecideRequest(
        request_id=request_id, route="compliance", models=VOTERS, messages=_user(question), options=OPTIONS,
        consensus_threshold=1.0)
    votes, code, details = [], "OK", ""
    with grpc.insecure_channel(env.address) as channel:
        try:
            for event in consensus_pb2_grpc.ConsensusStub(channel).Decide(request, timeout=30):
                if event.HasField("vote"):
                    votes.append(event.vote)
        except grpc.RpcError as exc:
            code, details = exc.code().name, exc.details() or ""
    process = env.consensus.processes["consensus"].process
    try:
        exit_code = process.wait(10)
    except subprocess.TimeoutExpired:
        exit_code = None
    env.consensus.stop()

    env.start_consensus(crash_after_commit=False)
    with grpc.insecure_channel(env.address) as channel:
        stub = consensus_pb2_grpc.ConsensusStub(channel)
        cases = [e for e in stub.ListEscalations(consensus_pb2.ListEscalationsRequest(
            state=consensus_pb2.ESCALATION_STATE_PENDING, limit=1000), timeout=10).escalations
            if e.request_id == request_id]
        stats = stub.GetStats(consensus_pb2.GetStatsRequest(route="compliance"), timeout=10)
        try:
            retry = list(stub.Decide(request, timeout=30))
            retry_code, retry_verdict = "OK", retry[-1].verdict
        except grpc.RpcError as exc:
            retry_code, retry_verdict = exc.code().name, None
        count_after_retry = sum(e.request_id == request_id for e in stub.ListEscalations(
            consensus_pb2.ListEscalationsRequest(limit=1000), timeout=10).escalations)
    env.consensus.stop()
    return CrashResult(code, details, votes, exit_code, cases[-1] if cases else None, len(cases), stats.decisions,
                       retry_code, retry_verdict, count_after_retry)
