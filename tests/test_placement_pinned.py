"""Placement and pinned (hot) memory, with real processes: a router and two model hosts.

Host A pins a hot decoder that takes most of its budget; host B holds two idle warm decoders
(nearly full, but evictable). A model that fits neither without evicting, whose hash prefers A,
is loaded on B at once: A could never hold it beside its pinned model, so it is passed over,
with a log line and a metric, instead of refusing the load and costing the call a retry.
Then `mirador status` shows each host's models with their tier there (and where usage made one
hot), and a host whose budget is shrunk below what it has pinned keeps serving (more loaded
than the budget is no nonsense). Last, hot models are pinned on their placement targets only,
unless a host has no other use for the memory (no budget) or is told to pin its own (`pin_hot`).

The two hosts run their own config files (A: the decoder is hot; B: warm), of the same fleet
(`pin_hot: everywhere`: each pins its own config's hot models, wherever their hash points).
Sizes come from the KV reserve (see test_placement_hosts.py): 64 MiB per KV head, counted before
any RSS is measured. Loopback only; every process is stopped by PID (Mesh.stop).
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import grpc
import pytest
import yaml
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from fault_scenarios import listing, models_of, wait_for, wait_ready
from placement_mesh import write_placement_config
from services.cli.supervisor import Mesh, write_config_variant
from services.common.config import load_config
from services.common.model_repository import ModelRepository
from services.common.placement_policy import hash_unit, placement_targets
from conftest import free_port_run
from test_placement_hosts import DECODER_KEYS, ask, ready_on, router_logged, start
from tiny_models import build_tiny_decoder, build_tiny_encoder

MB = 2**20
BUDGET_MB = 400
KV_HEADS = {"lm-pinned": 4, "lm-f1": 2, "lm-f2": 2}  # 256, 128 and 128 MiB of KV slots
NEW_KV_HEADS = 3  # 192 MiB: more than A has beside its pinned decoder, and than B has free


def preferring(first: str, second: str) -> str:
    """A model name whose hash prefers `first` over `second` even when `second` weighs 4 times more
    (weighted rendezvous: host h scores -w_h / ln u_h)."""
    return next(name for name in (f"lm-new-{i}" for i in range(1000))
                if math.log(hash_unit(name, second)) / math.log(hash_unit(name, first)) > 4)


def host_mesh(config, directory, name: str, port: int, hot: str = "") -> Mesh:
    variant = write_config_variant(config, directory / f"{name}.yaml", port=port, replicas=1)
    if hot:
        data = yaml.safe_load(variant.read_text())
        data["fleet"][hot]["tier"] = "hot"
        variant.write_text(yaml.safe_dump(data, sort_keys=False))
    mesh = Mesh(load_config(variant), log_dir=directory / f"logs-{name}", services=("model_host",),
                env={"XDG_CACHE_HOME": str(directory / "cache")})
    mesh.start(timeout_s=90)
    return mesh


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    directory = tmp_path_factory.mktemp("placement-pinned")
    port = free_port_run(2)
    a, b = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    new = preferring(a, b)
    fleet = {"tiny-embed": "{task: embedding, tier: hot}", **{name: DECODER_KEYS for name in (*KV_HEADS, new)}}
    # usage-driven tiering: a model called once is promoted (while it holds at most 3/4 of the budget)
    path = write_placement_config(directory, fleet, {"chat": "{primary: lm-pinned}"}, hosts=2, port=port,
                                  model_host={"memory_budget_mb": BUDGET_MB, "tier_policy": "usage",
                                              "promote_after_calls": 1, "pin_hot": "everywhere"})
    repository = ModelRepository(directory / "models")
    build_tiny_encoder(repository, "tiny-embed")
    for seed, (name, heads) in enumerate((*KV_HEADS.items(), (new, NEW_KV_HEADS))):
        build_tiny_decoder(repository, name, seed=seed, kv_heads=heads)
    config = load_config(path)
    meshes = []
    try:
        meshes.append(host_mesh(config, directory, "host-a", port, hot="lm-pinned"))
        meshes.append(host_mesh(config, directory, "host-b", port + 1))
        wait_ready(a, ["tiny-embed", "lm-pinned"])
        for filler in ("lm-f1", "lm-f2"):
            with grpc.insecure_channel(b) as channel:
                model_host_pb2_grpc.ModelHostStub(channel).LoadModel(model_host_pb2.LoadModelRequest(model=filler),
                                                                     timeout=60)
        router = start(config, directory, services=("router",))
        meshes.append(router)
        for address in (a, b):
            wait_for(lambda x=address: router_logged(router, "model host usable", x), 15, f"the router using {address}")
        time.sleep(2.5)  # one refresh after the fillers loaded: the router has seen B nearly full
        yield {"router": router, "config": config, "a": a, "b": b, "new": new, "host_a": meshes[0],
               "variant_a": directory / "host-a.yaml"}
    finally:
        for mesh in reversed(meshes):
            mesh.stop()


def test_a_host_whose_pinned_models_leave_no_room_is_passed_over(pinned):
    a, b, new, router = pinned["a"], pinned["b"], pinned["new"], pinned["router"]
    on_a, on_b = listing(a), listing(b)
    size = models_of(a)[new].load_bytes
    pinned_on_a = sum(m.memory_bytes for m in on_a.models if m.pinned)
    print(f"\n[placement] {new} needs {size / MB:.0f} MB; A: {pinned_on_a / MB:.0f} of {BUDGET_MB} MB pinned; "
          f"B: {on_b.memory_used_bytes / MB:.0f} MB used, none pinned but tiny-embed")
    # the scene: A could never hold it beside its pinned models; B could, by evicting an idle model
    assert on_a.memory_budget_bytes - pinned_on_a < size <= on_b.memory_budget_bytes - on_b.memory_used_bytes + 128 * MB
    assert ask(router.config.services.router.address, new) == "OK"
    assert new in ready_on(b) and new not in ready_on(a)
    # sent to B at once: A was never asked (it would have refused with RESOURCE_EXHAUSTED)
    assert not router_logged(router, "call sent to the next model host", new)
    assert router_logged(router, "model placed past hosts whose pinned models leave it no room", a) == 1
    assert models_of(a)[new].state == model_host_pb2.MODEL_STATE_UNLOADED
    evicted = [m.name for m in listing(b).models if f"evicted to make room for {new}" in m.detail]
    assert len(evicted) == 1, evicted
    for _ in range(2):  # used: usage-driven tiering promotes it on B
        assert ask(router.config.services.router.address, new) == "OK"


def status_of(config) -> dict[str, str]:
    status = subprocess.run([sys.executable, "-m", "services.cli", "--config", str(config.path), "status"],
                            check=False, capture_output=True, text=True, timeout=60).stdout
    print(status)
    return {line.split()[0]: line for line in status.splitlines() if line.strip()}


def test_status_shows_each_hosts_models_with_their_tier_and_where_usage_made_one_hot(pinned):
    a, b, new = pinned["a"], pinned["b"], pinned["new"]
    wait_for(lambda: models_of(b)[new].promoted, 10, f"{new} promoted on B")
    rows = status_of(pinned["config"])
    assert "lm-pinned [hot]" in rows[a] and "tiny-embed [hot]" in rows[a] and "pinned" in rows[a]
    assert f"{new} [hot, promoted]" in rows[b], rows[b]
    assert any(f"{filler} [warm]" in rows[b] for filler in ("lm-f1", "lm-f2")), rows[b]
    assert f"{b} (promoted)" in rows[new] and a not in rows[new]
    assert a in rows["lm-pinned"] and "(promoted)" not in rows["lm-pinned"]


def test_a_host_with_more_pinned_than_its_shrunk_budget_keeps_serving(pinned):
    """A reload shrinks A's budget below what it has pinned: loaded bytes over the budget are a
    fact, not nonsense, so the router keeps sending lm-pinned's calls there (it used to ignore
    the host, and B loaded a second copy)."""
    a, b, router = pinned["a"], pinned["b"], pinned["router"]
    variant = pinned["variant_a"]
    data = yaml.safe_load(variant.read_text())
    data["services"]["model_host"]["memory_budget_mb"] = 200
    variant.write_text(yaml.safe_dump(data, sort_keys=False))
    pinned["host_a"].processes["model_host"].process.send_signal(signal.SIGHUP)
    wait_for(lambda: listing(a).memory_budget_bytes == 200 * MB, 15, "A's budget shrunk by the reload")
    assert listing(a).memory_used_bytes > 200 * MB  # the scene: more loaded than its budget
    time.sleep(2.5)  # a refresh that reads it
    served_before = models_of(a)["lm-pinned"].requests_total
    for _ in range(3):
        assert ask(router.config.services.router.address, "lm-pinned") == "OK"
    assert models_of(a)["lm-pinned"].requests_total == served_before + 3
    assert "lm-pinned" not in ready_on(b)
    assert not router_logged(router, "model host ignored: its report makes no sense", a)
    assert "usable" in status_of(pinned["config"])[a]


# --------------------------------------------------------------------------- where hot models are pinned

HOT = {"lm-hot": 1, "lm-hot2": 2}  # name: copies


@pytest.mark.parametrize(("budget_mb", "pin_hot", "everywhere"), [
    (300, "targets", False),  # the fleet (3 x 128 MiB of KV slots besides) is more than a host holds
    (0, "targets", True),  # no budget: a host has no other use for the memory, so it pins them all
    (300, "everywhere", True),  # each host pins its config's hot models (hosts with their own configs)
])
def test_hot_models_are_pinned_on_their_placement_targets_only(tmp_path, budget_mb, pin_hot, everywhere):
    fleet = {"tiny-embed": "{task: embedding, tier: warm}",
             **{name: f"{{task: text-generation, tier: hot, copies: {n}}}" for name, n in HOT.items()},
             **{f"lm-warm-{i}": DECODER_KEYS for i in range(3)}}
    model_host = {"pin_hot": pin_hot, **({"memory_budget_mb": budget_mb} if budget_mb else {})}
    path = write_placement_config(tmp_path, fleet, {"chat": "{primary: lm-hot}"}, hosts=3, model_host=model_host)
    repository = ModelRepository(tmp_path / "models")
    build_tiny_encoder(repository, "tiny-embed")
    for seed, name in enumerate(HOT):
        build_tiny_decoder(repository, name, seed=seed)
    for i in range(3):
        build_tiny_decoder(repository, f"lm-warm-{i}", seed=10 + i, kv_heads=2)
    config = load_config(path)
    mesh = start(config, tmp_path)
    try:
        addresses = list(config.services.model_host_targets)
        targets = {name: set(placement_targets(name, addresses, copies)) for name, copies in HOT.items()}
        expected = {name: set(addresses) if everywhere else targets[name] for name in HOT}
        for name, hosts in expected.items():
            for address in hosts:
                wait_ready(address, [name])
        pinned = {name: {a for a in addresses if models_of(a)[name].pinned} for name in HOT}
        ready = {name: {a for a in addresses if models_of(a)[name].ready} for name in HOT}
        print(f"\n[placement] budget {budget_mb} MB, pin_hot {pin_hot}: targets {targets}; pinned {pinned}")
        assert pinned == expected and ready == expected
        if everywhere:
            return
        for name in HOT:  # elsewhere it is warm: not loaded, and evictable were it loaded
            for address in set(addresses) - targets[name]:
                status = models_of(address)[name]
                assert status.tier == model_host_pb2.MODEL_TIER_HOT and not status.pinned
                assert status.state == model_host_pb2.MODEL_STATE_UNLOADED
        logged = [p.log_path.read_text() for n, p in mesh.processes.items() if n.startswith("model_host")]
        assert all("hot models pinned on their placement targets only" in text for text in logged)
        # the router sends its calls to the host that pins it, once it knows every host (before, a
        # hash over the hosts it has seen so far may point elsewhere)
        for address in addresses:
            wait_for(lambda x=address: router_logged(mesh, "model host usable", x), 15, f"the router using {address}")
        (target,) = targets["lm-hot"]
        served = models_of(target)["lm-hot"].requests_total
        assert ask(config.services.router.address, "lm-hot") == "OK"
        assert models_of(target)["lm-hot"].requests_total == served + 1
        assert {a for a in addresses if models_of(a)["lm-hot"].ready} == {target}
        rows = status_of(config)
        assert "lm-hot [hot]" in rows[target]
        assert all("lm-hot2 [hot]" in rows[a] for a in targets["lm-hot2"])
    finally:
        mesh.stop()
