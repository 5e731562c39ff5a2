"""Placement with real processes: a router and several model-host processes on tiny models.

* A fleet whose memory is twice one host's budget, served by three hosts with 0 errors.
* kill -9 of the host holding the most models under load: its models serve elsewhere, and no
  idempotent call (Embed) is lost.
* A host that joins takes new models whose hash it wins, and busy models stay where they are.
* A host that hangs (SIGSTOP): calls waiting for it go to another host; it serves again after SIGCONT.

Sizes are made deterministic with the KV reserve: each decoder keeps 256 slots of 2048 tokens,
128 MiB counted against the budget before any RSS is measured (and never touched by these short
calls), so a 300 MB budget holds two decoders and not three, whatever the allocator does.
Loopback only; every process is stopped by PID (Mesh.stop), a stopped one resumed in a finally.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from mirador.v1 import common_pb2, model_host_pb2, router_pb2, router_pb2_grpc

from fault_scenarios import listing, models_of, wait_for, wait_ready
from placement_mesh import write_placement_config
from services.cli.supervisor import Mesh, write_config_variant
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.common.placement_policy import HostView, placement_order
from conftest import free_port_run
from tiny_models import build_tiny_decoder, build_tiny_encoder

MB = 2**20
BUDGET_MB = 300
BIG = {"kv_heads": 2}  # 256 slots x 2048 tokens x 2 layers x (K, V) x 2 heads x 8 dims x 4 bytes = 128 MiB
DECODER_KEYS = "{task: text-generation, tier: warm, max_num_seqs: 256, max_context: 2048}"


def write_fleet(directory: Path, decoders: list[str], *, hosts: int, listed: int | None = None,
                budget_mb: int = 0, port: int | None = None, big: bool = True, copies: dict[str, int] | None = None,
                huge: str = "") -> Path:
    """Config: `hosts` model-host replicas (ports p..p+hosts-1); the router lists `listed` of them."""
    fleet = {"tiny-embed": f"{{task: embedding, tier: hot, copies: {hosts}}}",  # pinned on every host
             **{name: DECODER_KEYS if big else "{task: text-generation, tier: warm}" for name in decoders},
             **{name: f"{{task: text-generation, tier: warm, copies: {n}}}" for name, n in (copies or {}).items()},
             **({huge: DECODER_KEYS} if huge else {})}
    path = write_placement_config(directory, fleet, {"chat": f"{{primary: {decoders[0]}}}"}, hosts=hosts, listed=listed,
                                  port=port, model_host={"memory_budget_mb": budget_mb} if budget_mb else None)
    repository = ModelRepository(directory / "models")
    build_tiny_encoder(repository, "tiny-embed")
    for seed, name in enumerate(decoders):
        build_tiny_decoder(repository, name, seed=seed, **(BIG if big else {}))
    for name in copies or {}:
        build_tiny_decoder(repository, name, seed=99)
    if huge:
        build_tiny_decoder(repository, huge, seed=98, kv_heads=6)  # 384 MiB of KV slots
    return path


def start(config, directory: Path, services=("router", "model_host")) -> Mesh:
    mesh = Mesh(config, log_dir=directory / "logs", services=services,
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=90)
    return mesh


def host_addresses(mesh: Mesh) -> dict[str, str]:
    return {name: p.settings.address for name, p in mesh.processes.items() if name.startswith("model_host")}


def ask(router: str, model: str, max_tokens: int = 2, timeout_s: float = 20.0) -> str:
    """One Router.Ask naming a fleet model: "OK" or the status code's name."""
    with grpc.insecure_channel(router) as channel:
        try:
            for _ in router_pb2_grpc.RouterStub(channel).Ask(router_pb2.AskRequest(
                    text="hello", model=model, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)),
                    timeout=timeout_s):
                pass
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "OK"


def embed(router: str, timeout_s: float = 10.0) -> str:
    with grpc.insecure_channel(router) as channel:
        try:
            router_pb2_grpc.RouterStub(channel).Embed(
                model_host_pb2.EmbedRequest(model="tiny-embed", texts=["idempotent"]), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return "OK"


def ready_on(address: str) -> set[str]:
    return {name for name, m in models_of(address).items() if m.ready and name != "tiny-embed"}


def served_on(address: str) -> dict[str, int]:
    return {name: m.requests_total for name, m in models_of(address).items()}


def router_logged(mesh: Mesh, event: str, address: str) -> int:
    lines = mesh.processes["router"].log_path.read_text(errors="replace").splitlines()
    count = 0
    for line in lines:
        with_event = f'"{event}"' in line
        if with_event and address in line:
            count += 1
    return count


def run_callers(work, callers: int, rounds: int) -> list[str]:
    """`callers` threads each run `work(i)` `rounds` times; returns every outcome."""
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        for round_ in range(rounds):
            outcome = work(index * rounds + round_)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


# --------------------------------------------------------------------------- a fleet larger than one host


DECODERS = [f"lm-{letter}" for letter in "abcde"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    directory = tmp_path_factory.mktemp("placement")
    config = load_config(write_fleet(directory, DECODERS, hosts=3, budget_mb=BUDGET_MB, huge="lm-huge"))
    mesh = start(config, directory)
    try:
        for address in host_addresses(mesh).values():
            wait_ready(address, ["tiny-embed"])
            wait_for(lambda a=address: router_logged(mesh, "model host usable", a), 10, f"the router using {address}")
        yield mesh
    finally:
        mesh.stop()


def test_a_fleet_larger_than_one_host_is_served_by_all_of_them(fleet):
    router = fleet.config.services.router.address
    outcomes = run_callers(lambda i: ask(router, DECODERS[i % len(DECODERS)]), callers=3, rounds=10)
    errors = [o for o in outcomes if o != "OK"]
    assert not errors, errors
    hosts = host_addresses(fleet)
    held = {name: ready_on(address) for name, address in hosts.items()}
    used = {name: listing(address).memory_used_bytes for name, address in hosts.items()}
    print(f"\n[placement] {len(outcomes)} calls over {len(DECODERS)} models of 128 MiB on 3 hosts of {BUDGET_MB} MB: "
          f"0 errors; held {held}; used MB {({n: round(u / MB) for n, u in used.items()})}")
    assert all(u <= BUDGET_MB * MB for u in used.values())
    assert sum(used.values()) > BUDGET_MB * MB  # more than one host could hold is loaded at once
    assert set().union(*held.values()) == set(DECODERS)  # each where it fits: none pushed out by another
    served = {name: served_on(address) for name, address in hosts.items()}
    assert all(sum(s.get(m, 0) for s in served.values()) > 0 for m in DECODERS)
    # `mirador status` shows which host holds what
    status = subprocess.run([sys.executable, "-m", "services.cli", "--config", str(fleet.config.path), "status"],
                            capture_output=True, text=True, timeout=60).stdout
    print(status)
    rows = {line.split()[0]: line for line in status.splitlines() if line.strip()}
    for name, models in held.items():
        assert all(hosts[name] in rows[m] and m in rows[hosts[name]] for m in models), status


def test_a_model_larger_than_every_host_is_refused_naming_sizes(fleet):
    outcome = ask(fleet.config.services.router.address, "lm-huge")
    assert outcome.startswith("RESOURCE_EXHAUSTED: "), outcome
    # 384 MiB of KV slots plus its files x 1.2
    assert re.search(r"model `lm-huge` needs 38\d MB, more than the memory budget of every model host "
                     r"\(the largest: 300 MB at 127\.0\.0\.1:\d+\); raise services\.model_host\.memory_budget_mb", outcome), outcome
    assert not any("lm-huge" in ready_on(a) for a in host_addresses(fleet).values())


def test_kill_9_of_a_host_its_models_serve_elsewhere_and_no_idempotent_call_is_lost(fleet):
    router = fleet.config.services.router.address
    hosts = host_addresses(fleet)
    for model in DECODERS:  # everything loaded somewhere first
        assert ask(router, model) == "OK"
    held = {name: ready_on(address) for name, address in hosts.items()}
    victim = max(held, key=lambda name: len(held[name]))
    orphans = sorted(held[victim])
    assert orphans, held
    stop = threading.Event()
    embeds: list[str] = []
    asks: list[str] = []

    def embedding() -> None:
        while not stop.is_set() and len(embeds) < 5000:
            embeds.append(embed(router))

    def asking(offset: int) -> None:
        index = offset
        while not stop.is_set() and len(asks) < 5000:
            asks.append(ask(router, DECODERS[index % len(DECODERS)]))
            index += 1

    threads = [threading.Thread(target=embedding) for _ in range(2)] + [
        threading.Thread(target=asking, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)
        killed_at = time.monotonic()
        os.kill(fleet.processes[victim].process.pid, signal.SIGKILL)
        recovered = {}
        for model in orphans:  # each of its models answers again, from another host
            wait_for(lambda m=model: ask(router, m, timeout_s=10) == "OK", 30, f"{model} serving again")
            recovered[model] = time.monotonic() - killed_at
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    lost_embeds = [o for o in embeds if o != "OK"]
    failed_asks = [o for o in asks if o != "OK"]
    print(f"\n[placement] kill -9 of {victim} holding {orphans}: {len(embeds)} Embed calls, {len(lost_embeds)} lost; "
          f"{len(asks)} Ask calls, {len(failed_asks)} failed; serving again after "
          f"{({m: round(s, 2) for m, s in recovered.items()})} s")
    assert not lost_embeds, lost_embeds
    assert len(failed_asks) <= 2, failed_asks  # at most the two streams that had begun on the killed host
    assert max(recovered.values()) < 5.0, recovered


# --------------------------------------------------------------------------- a host joins, a host hangs


@pytest.fixture(scope="module")
def growing(tmp_path_factory):
    """Two hosts running of the three the router lists (no budgets: a pure hash decides)."""
    directory = tmp_path_factory.mktemp("placement-join")
    probe = [f"lm-{i}" for i in range(40)]
    port = free_port_run(3)
    addresses = [f"127.0.0.1:{port + i}" for i in range(3)]
    views = [HostView(a, healthy=True) for a in addresses]
    target = {m: placement_order(m, views)[0].address for m in probe}
    before_join = [m for m in probe if target[m] != addresses[2]]
    old, new_elsewhere = before_join[:3], before_join[3]
    new_on_joiner = next(m for m in probe if target[m] == addresses[2])
    decoders = [*old, new_elsewhere, new_on_joiner]
    config = load_config(write_fleet(directory, decoders, hosts=2, listed=3, port=port, big=False,
                                     copies={"lm-twice": 2}))
    mesh = start(config, directory)
    try:
        for address in addresses[:2]:
            wait_for(lambda a=address: router_logged(mesh, "model host usable", a), 10, f"the router using {address}")
        yield {"mesh": mesh, "directory": directory, "addresses": addresses, "old": old,
               "new_elsewhere": new_elsewhere, "new_on_joiner": new_on_joiner, "config": config}
    finally:
        mesh.stop()


def test_a_host_that_joins_takes_new_models_and_busy_ones_stay(growing):
    mesh, addresses, config = growing["mesh"], growing["addresses"], growing["config"]
    router = config.services.router.address
    for model in growing["old"]:
        assert ask(router, model) == "OK"
    where = {m: [a for a in addresses[:2] if m in ready_on(a)] for m in growing["old"]}
    assert all(len(hosts) == 1 for hosts in where.values()), where
    # the third host starts (a generated copy of the config listening on the third port)
    variant = write_config_variant(config, growing["directory"] / "joiner.yaml", port=int(addresses[2].rsplit(":", 1)[1]),
                                   replicas=1)
    joiner = Mesh(load_config(variant), log_dir=growing["directory"] / "logs-joiner", services=("model_host",),
                  env={"XDG_CACHE_HOME": str(growing["directory"] / "cache")})
    joiner.start(timeout_s=90)
    try:
        wait_for(lambda: router_logged(mesh, "model host usable", addresses[2]), 15, "the router using the new host",
                 interval_s=0.2)
        for model in growing["old"]:  # busy models are not moved
            assert ask(router, model) == "OK"
        assert not ready_on(addresses[2]) and not any(served_on(addresses[2]).get(m) for m in growing["old"])
        assert ask(router, growing["new_on_joiner"]) == "OK"
        assert ask(router, growing["new_elsewhere"]) == "OK"
        assert ready_on(addresses[2]) == {growing["new_on_joiner"]}
        assert growing["new_elsewhere"] in ready_on(addresses[0]) | ready_on(addresses[1])
    finally:
        joiner.stop()


def test_a_host_that_reports_nonsense_is_ignored_with_a_log_line(growing):
    """A host at the third address runs another config (a model the router's fleet lacks): the router
    logs it once and leaves it out, so the model whose hash it wins is served by another host."""
    mesh, addresses, config = growing["mesh"], growing["addresses"], growing["config"]
    router = config.services.router.address
    variant = write_config_variant(config, growing["directory"] / "stranger.yaml",
                                   port=int(addresses[2].rsplit(":", 1)[1]), replicas=1)
    data = yaml.safe_load(variant.read_text())
    data["fleet"]["stranger-lm"] = {"task": "text-generation", "tier": "cold"}
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    stranger = Mesh(load_config(variant), log_dir=growing["directory"] / "logs-stranger", services=("model_host",),
                    env={"XDG_CACHE_HOME": str(growing["directory"] / "cache")})
    stranger.start(timeout_s=90)
    try:
        wait_for(lambda: router_logged(mesh, "model host ignored: its report makes no sense", addresses[2]), 15,
                 "the router ignoring the stranger", interval_s=0.2)
        model = growing["new_on_joiner"]  # its first choice is the third address
        assert ask(router, model) == "OK"
        assert model not in ready_on(addresses[2])
        assert model in ready_on(addresses[0]) | ready_on(addresses[1])
        assert router_logged(mesh, "model host ignored: its report makes no sense", addresses[2]) == 1  # once
    finally:
        stranger.stop()


def test_a_model_with_two_copies_is_loaded_on_two_hosts(growing):
    router, mesh = growing["config"].services.router.address, growing["mesh"]
    assert ask(router, "lm-twice") == "OK"  # one host loads it for the call, the next in its order in the background
    hosts = list(host_addresses(mesh).values())
    wait_for(lambda: all("lm-twice" in ready_on(a) for a in hosts), 15, "lm-twice READY on both hosts", interval_s=0.2)
    assert router_logged(mesh, "loading another copy", "lm-twice")


def test_a_hung_host_hands_its_calls_on_and_serves_again_after_sigcont(growing):
    mesh = growing["mesh"]
    router = growing["config"].services.router.address
    model = growing["old"][0]
    assert ask(router, model) == "OK"
    hung = next(name for name, address in host_addresses(mesh).items() if model in ready_on(address))
    pid = mesh.processes[hung].process.pid
    hung_address = mesh.processes[hung].settings.address
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        outcomes = run_callers(lambda i: ask(router, model, timeout_s=15) if i % 2 else embed(router, 15), 2, 3)
        elapsed = time.monotonic() - started
        print(f"\n[placement] {hung} stopped (SIGSTOP): {len(outcomes)} calls, outcomes {sorted(set(outcomes))}, "
              f"{elapsed:.1f} s in all")
        assert all(o == "OK" for o in outcomes), outcomes
        assert router_logged(mesh, "model host down: its models go to their next hosts", hung_address)
    finally:
        os.kill(pid, signal.SIGCONT)
    usable_before = router_logged(mesh, "model host usable", hung_address)
    wait_for(lambda: router_logged(mesh, "model host usable", hung_address) > usable_before, 15,
             f"{hung} usable again after SIGCONT", interval_s=0.2)
    assert ask(router, model) == "OK"


def test_a_call_that_finds_no_usable_host_waits_for_one_within_its_deadline(growing):
    """Every host stopped (SIGSTOP) and known to be down: a call waits (up to 5 s, within its
    deadline) for a host to come back instead of failing at once, and is answered."""
    mesh = growing["mesh"]
    router = growing["config"].services.router.address
    model = growing["old"][2]
    assert ask(router, model) == "OK"
    hosts = {p.settings.address: p.process.pid for name, p in mesh.processes.items() if name.startswith("model_host")}
    down = "model host down: its models go to their next hosts"
    before = {address: router_logged(mesh, down, address) for address in hosts}
    for pid in hosts.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        for address in hosts:
            wait_for(lambda a=address: router_logged(mesh, down, a) > before[a], 15, f"the router seeing {address} down",
                     interval_s=0.2)
        outcome: list[str] = []
        caller = threading.Thread(target=lambda: outcome.append(ask(router, model, timeout_s=20)))
        caller.start()
        time.sleep(1.5)
    finally:
        for pid in hosts.values():
            os.kill(pid, signal.SIGCONT)
    caller.join(30)
    assert outcome == ["OK"]


def test_a_host_that_stops_serving_loses_its_models_without_errors(growing):
    """SIGTERM: the host says NOT_SERVING and drains; calls keep being answered, by the others."""
    mesh = growing["mesh"]
    router = growing["config"].services.router.address
    model = growing["old"][1]
    assert ask(router, model) == "OK"
    leaving = next(name for name, address in host_addresses(mesh).items() if model in ready_on(address))
    process = mesh.processes[leaving].process
    outcomes: list[str] = []
    stop = threading.Event()

    def calling(index: int) -> None:
        while not stop.is_set() and len(outcomes) < 2000:
            outcomes.append(ask(router, model) if index else embed(router))

    threads = [threading.Thread(target=calling, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    errors = [o for o in outcomes if o != "OK"]
    print(f"\n[placement] SIGTERM of {leaving} holding {model}: {len(outcomes)} calls, {len(errors)} errors")
    assert not errors, errors
    assert any(model in ready_on(a) for n, a in host_addresses(mesh).items() if n != leaving)
