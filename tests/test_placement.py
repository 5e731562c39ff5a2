"""The placement maths (services/common/placement_policy.py): weighted rendezvous hashing, the choice
of a host per call, and what a host's report must say to be believed. Pure functions, no
processes (tests/test_placement_hosts.py runs real model hosts)."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from mirador.v1 import model_host_pb2

from services.common.config import ModelSpec
from services.common.errors import ResourceExhausted, Unavailable
from services.common.placement_policy import (
    HostView,
    ModelOnHost,
    choose,
    dns_name,
    hosts_table,
    nonsense,
    placement_order,
    placement_targets,
    resolve,
)

MB = 2**20
READY, LOADING, UNLOADED = (model_host_pb2.MODEL_STATE_READY, model_host_pb2.MODEL_STATE_LOADING,
                            model_host_pb2.MODEL_STATE_UNLOADED)
MODELS = [f"model-{i}" for i in range(3000)]


def host(address: str, budget_mb: int = 0, used_mb: int = 0, **models: ModelOnHost) -> HostView:
    return HostView(address, healthy=True, budget_bytes=budget_mb * MB, used_bytes=used_mb * MB,
                    models={name.replace("_", "-"): status for name, status in models.items()})


def targets(hosts: list[HostView]) -> dict[str, str]:
    return {m: placement_order(m, hosts)[0].address for m in MODELS}


def test_equal_hosts_share_models_evenly():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(4)]
    shares = Counter(targets(hosts).values())
    assert all(abs(count / len(MODELS) - 0.25) < 0.03 for count in shares.values()), shares


def test_a_host_that_leaves_hands_only_its_own_models_on():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(4)]
    before = targets(hosts)
    hosts[2].healthy = False  # dies, or stops serving
    after = targets(hosts)
    moved = {m for m in MODELS if before[m] != after[m]}
    assert moved == {m for m in MODELS if before[m] == hosts[2].address}
    # each goes to its own next host in hash order, so the three survivors share them
    assert all(abs(n / len(moved) - 1 / 3) < 0.06 for n in Counter(after[m] for m in moved).values())


def test_a_host_that_joins_takes_only_its_share():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(3)]
    before = targets(hosts)
    joined = host("10.0.0.9:50061")
    after = targets([*hosts, joined])
    moved = {m for m in MODELS if before[m] != after[m]}
    assert all(after[m] == joined.address for m in moved)  # models only move to the newcomer
    assert abs(len(moved) / len(MODELS) - 0.25) < 0.03


def test_weights_follow_free_memory():
    roomy, tight = host("10.0.0.1:50061", budget_mb=3000), host("10.0.0.2:50061", budget_mb=3000, used_mb=2000)
    shares = Counter(targets([roomy, tight]).values())
    assert abs(shares[roomy.address] / len(MODELS) - 0.75) < 0.03, shares  # 3000 MB free against 1000 MB
    # a full host keeps a little weight (it can evict idle models); one without a budget weighs the most
    full = host("h:1", budget_mb=1000, used_mb=1000)
    assert full.weight() == 20 * MB and host("h:2").weight() > roomy.weight()


def test_a_call_goes_where_the_model_is_ready_even_if_another_host_scores_higher():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(3)]
    model = "model-7"
    order = placement_order(model, hosts)
    order[-1].models[model] = ModelOnHost(READY)
    assert choose(model, hosts).host is order[-1]
    assert choose(model, hosts).load_also == ()


def test_ready_copies_share_calls_by_load_then_by_the_models_order():
    a = host("a:1", m=ModelOnHost(READY, in_flight=3))
    b = host("b:1", m=ModelOnHost(READY, in_flight=1))
    assert choose("m", [a, b]).host is b
    b.calls_here["m"] = 1  # this router's own calls since the refresh count too
    assert choose("m", [a, b]).host is b
    b.calls_here["m"] = 2
    # equally busy: the first in the model's order, so a spare copy idles when the load passes
    assert choose("m", [a, b]).host is placement_order("m", [a, b])[0]


def test_a_busy_model_gets_one_more_copy():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(3)]
    order = placement_order("m", hosts)
    order[0].models["m"] = ModelOnHost(READY, in_flight=7)
    assert choose("m", hosts, busy_at=8).load_also == ()
    order[0].models["m"] = ModelOnHost(READY, in_flight=8)  # every slot taken
    assert choose("m", hosts, busy_at=8).load_also == (order[1],)
    order[1].expected["m"] = 0.0  # asked for already: not twice
    assert choose("m", hosts, busy_at=8).load_also == ()
    order[1].expected.clear()
    order[1].models["m"] = ModelOnHost(READY, in_flight=2)
    chosen = choose("m", hosts, busy_at=8)
    assert chosen.host is order[1] and chosen.load_also == ()


def test_a_load_under_way_is_shared():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(3)]
    order = placement_order("model-1", hosts)
    order[2].expected["model-1"] = 0.0  # this router sent it there a moment ago
    assert choose("model-1", hosts).host is order[2]
    order[2].expected.clear()
    order[1].models["model-1"] = ModelOnHost(LOADING)
    assert choose("model-1", hosts).host is order[1]


def test_copies_load_on_the_next_hosts_in_order():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(4)]
    order = placement_order("hot", hosts)
    first = choose("hot", hosts, copies=3)
    assert first.host is order[0] and first.load_also == (order[1], order[2])
    order[0].models["hot"] = ModelOnHost(READY)
    order[1].expected["hot"] = 0.0  # one extra copy already asked for
    again = choose("hot", hosts, copies=3)
    assert again.host is order[0] and again.load_also == (order[2],)
    short = choose("hot", hosts[:2], copies=3)  # two hosts cannot hold three copies: degrade, say so
    assert short.short_by == 1


def test_a_host_whose_fleet_lacks_the_model_is_not_asked():
    old = host("old:1", other=ModelOnHost(UNLOADED))
    new = host("new:1", other=ModelOnHost(UNLOADED), added=ModelOnHost(UNLOADED))
    assert {choose("added", [old, new]).host.address for _ in range(3)} == {"new:1"}
    with pytest.raises(Unavailable, match=r"no model host can take a call for `added` now; hosts: old:1 \(its fleet "
                                          r"has no `added`\)"):
        choose("added", [old])


def test_excluded_and_down_hosts_are_skipped():
    hosts = [host(f"10.0.0.{i}:50061") for i in range(3)]
    order = placement_order("m", hosts)
    assert choose("m", hosts, exclude=frozenset({order[0].address})).host is order[1]
    for h in hosts:
        h.healthy = False
    with pytest.raises(Unavailable, match="no model host can take a call for `m`"):
        choose("m", hosts)


def test_a_model_larger_than_every_budget_is_refused_naming_sizes():
    hosts = [host("a:1", budget_mb=100, big=ModelOnHost(UNLOADED, load_bytes=300 * MB)), host("b:1", budget_mb=200)]
    with pytest.raises(ResourceExhausted) as refused:
        choose("big", hosts)
    assert "needs 300 MB" in refused.value.message and "the largest: 200 MB at b:1" in refused.value.message
    hosts.append(host("c:1", budget_mb=400))
    assert choose("big", hosts).host.address == "c:1"  # the only host that can hold it


def test_nonsense_reports_are_recognised():
    fleet = {"m": ModelSpec("m", "text-generation"), "n": ModelSpec("n", "text-generation")}

    def listing(used: int, budget: int = 10 * MB, **held: tuple[int, int]) -> model_host_pb2.ListModelsResponse:
        return model_host_pb2.ListModelsResponse(
            models=[model_host_pb2.ModelStatus(name=name, state=state, memory_bytes=size)
                    for name, (state, size) in held.items()], memory_budget_bytes=budget, memory_used_bytes=used)

    assert nonsense(listing(5 * MB, m=(READY, 5 * MB)), fleet) == ""
    # more loaded than the budget is believed: pinned models measured over their estimate, a shrunk budget
    assert nonsense(listing(30 * MB, m=(READY, 30 * MB)), fleet) == ""
    negative = listing(2**64 - 20 * MB, m=(READY, 2**64 - 20 * MB))
    assert nonsense(negative, fleet) == f"reports negative memory (memory_used_bytes {-20 * MB}, m.memory_bytes {-20 * MB})"
    assert nonsense(listing(9 * MB, m=(READY, 5 * MB)), fleet) == \
        f"reports {9 * MB} bytes used, but its models hold {5 * MB}"
    assert nonsense(listing(5 * MB, m=(READY, 2 * MB), n=(UNLOADED, 3 * MB)), fleet) == \
        "reports memory held by models that are not loaded (n)"
    unknown = model_host_pb2.ListModelsResponse(models=[model_host_pb2.ModelStatus(name="stranger")])
    assert "stranger" in nonsense(unknown, fleet)
    ignored = host("a:1")
    ignored.problem = nonsense(unknown, fleet)
    assert not ignored.usable and "ignored" in hosts_table([ignored])[0]
    # a host over its budget has no free memory, and a little weight (it can evict idle models)
    over = host("b:1", budget_mb=100, used_mb=150)
    assert over.usable and over.free_bytes == 0 and over.weight() == 2 * MB


def pinned_and_evictable(model: str, pinned: bool = True) -> list[HostView]:
    """Two hosts of 300 MB, neither with room for a 100 MB `model` without evicting: `pinned:1`
    holds 250 MB of a hot model, `evictable:1` 280 MB of idle warm ones."""
    size = {model: ModelOnHost(UNLOADED, load_bytes=100 * MB)}
    return [host("pinned:1", budget_mb=300, used_mb=250, hot=ModelOnHost(READY, memory_bytes=250 * MB, pinned=pinned),
                 **size),
            host("evictable:1", budget_mb=300, used_mb=280, idle=ModelOnHost(READY, memory_bytes=280 * MB), **size)]


def test_a_host_whose_pinned_models_leave_no_room_is_passed_over():
    chosen = {m: choose(m, pinned_and_evictable(m)) for m in MODELS[:200]}
    assert {c.host.address for c in chosen.values()} == {"evictable:1"}
    # the placement could not be met as the hash asked for the models whose first host is the pinned one: counted
    passed = [m for m, c in chosen.items() if c.passed_over]
    assert passed and all(chosen[m].passed_over[0].address == "pinned:1" for m in passed)
    assert 0.2 < len(passed) / len(chosen) < 0.8
    # the negative control: were the 250 MB evictable, the hash would send a share of them there
    unpinned = {choose(m, pinned_and_evictable(m, pinned=False)).host.address for m in MODELS[:200]}
    assert unpinned == {"pinned:1", "evictable:1"}
    # `copies` degrade to the hosts that can hold it
    two = choose("m", pinned_and_evictable("m"), copies=2)
    assert two.host.address == "evictable:1" and two.load_also == () and two.short_by == 1


def test_a_model_that_only_pinned_memory_keeps_out_is_refused_naming_it():
    hosts = pinned_and_evictable("m")
    hosts[1].models["idle"] = ModelOnHost(READY, memory_bytes=280 * MB, pinned=True)
    with pytest.raises(ResourceExhausted) as refused:
        choose("m", hosts)
    assert refused.value.message == (
        "model `m` needs 100 MB, and every model host whose budget could hold it has too much of it pinned by hot "
        "models: pinned:1 (300 MB budget, 250 MB pinned), evictable:1 (300 MB budget, 280 MB pinned); make some of "
        "them warm (fleet.NAME.tier), raise services.model_host.memory_budget_mb or shrink the model (mirador quantize)")


def test_a_host_busy_loading_comes_after_one_with_room_beside_its_pinned_models():
    def hosts_for(model: str) -> list[HostView]:
        size = {model: ModelOnHost(UNLOADED, load_bytes=100 * MB)}
        return [host("loading:1", budget_mb=300, used_mb=250, idle=ModelOnHost(READY, memory_bytes=250 * MB),
                     big=ModelOnHost(LOADING, load_bytes=250 * MB), **size),
                host("idle:1", budget_mb=300, used_mb=280, idle=ModelOnHost(READY, memory_bytes=280 * MB), **size)]

    # neither fits it without evicting; the first would wait for a 250 MB load to pass, the second need not
    assert {choose(m, hosts_for(m)).host.address for m in MODELS[:100]} == {"idle:1"}


def test_status_shows_each_hosts_models_with_their_tier_there():
    view = host("a:1", budget_mb=1000, used_mb=300,
                embed=ModelOnHost(READY, memory_bytes=50 * MB, pinned=True, tier="hot"),
                busy=ModelOnHost(READY, memory_bytes=150 * MB, tier="warm", promoted=True),
                idle=ModelOnHost(READY, memory_bytes=100 * MB, tier="cold"),
                coming=ModelOnHost(LOADING, tier="warm"), gone=ModelOnHost(UNLOADED, tier="warm"))
    line = hosts_table([view])[0]
    assert line.split()[:3] == ["a:1", "usable", "300/1000"]
    assert "50 pinned" in line
    assert line.endswith("busy [hot, promoted], coming [warm, loading], embed [hot], idle [cold]"), line


def test_dns_targets_are_resolved_to_every_address():
    assert dns_name("dns:///model-host.mirador.svc:50061") == ("model-host.mirador.svc", 50061)
    assert dns_name("dns://8.8.8.8/model-host:50061") == ("model-host", 50061)
    assert dns_name("127.0.0.1:50061") is None
    addresses = asyncio.run(resolve(["dns:///localhost:50061", "10.0.0.5:50061", "dns:///no-such-host.invalid:1"]))
    assert "10.0.0.5:50061" in addresses and any(a.endswith(":50061") and "10.0.0.5" not in a for a in addresses)
    assert not any("invalid" in a for a in addresses)


def test_config_check_refuses_a_model_larger_than_the_hosts_budget(tmp_path, capsys):
    from conftest import write_config
    from services.cli.main import main
    from services.common.model_repository import ModelRepository
    from tiny_models import build_tiny_decoder

    repository = ModelRepository(tmp_path / "models")
    build_tiny_decoder(repository, "tiny-lm")
    build_tiny_decoder(repository, "huge-lm", seed=1)
    body = """
    fleet:
      tiny-lm: {task: text-generation}
      huge-lm: {task: text-generation, max_num_seqs: 256, max_context: 2048}
    routes:
      chat: {primary: tiny-lm}
    """
    path = write_config(tmp_path, {"model_host": "memory_budget_mb: 50"}, body=body)
    assert main(["config", "check", str(path)]) == 2
    error = capsys.readouterr().err
    # 2 layers x (K, V) x 1 head x 8 dims x 4 bytes = 128 bytes a token, x 256 x 2048 = 64 MB
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("huge-lm:"))
    assert f"{path}:{line}: fleet.huge-lm: needs about 64 MB" in error, error
    assert "64 MB of KV slots (256 x 2048 tokens)" in error and "memory_budget_mb: 50 MB" in error
    assert "tiny-lm" not in error
    path = write_config(tmp_path, {"model_host": "memory_budget_mb: 100"}, body=body)
    assert main(["config", "check", str(path)]) == 0


def test_hosts_with_room_come_before_hosts_that_would_evict():
    def fleet_of_hosts(model: str) -> list[HostView]:
        full = [host(f"full:{i}", budget_mb=300, used_mb=250, **{model: ModelOnHost(UNLOADED, load_bytes=100 * MB)})
                for i in range(3)]
        return [*full, host("roomy:1", budget_mb=300, used_mb=150)]

    # 100 MB fits only where 150 MB are free: that host, whatever the hash says
    assert {choose(m, fleet_of_hosts(m)).host.address for m in MODELS[:50]} == {"roomy:1"}
    # size unknown: the hash alone, weighted by free memory (150 MB against 3 x 50 MB: half the models)
    unknown = Counter(placement_order(m, [host(f"full:{i}", 300, 250) for i in range(3)] + [host("roomy:1", 300, 150)])[0]
                      .address for m in MODELS)
    assert abs(unknown["roomy:1"] / len(MODELS) - 0.5) < 0.04, unknown


def test_loads_sent_since_the_refresh_count_against_a_host():
    size = 128 * MB
    hosts = [host(f"h:{i}", budget_mb=300, used_mb=8, **{m: ModelOnHost(UNLOADED, load_bytes=size)
                                                         for m in ("a", "b", "c", "d", "e", "f")}) for i in range(3)]
    placed = Counter()
    for model in ("a", "b", "c", "d", "e", "f"):  # one call each, all before the next refresh
        chosen = choose(model, hosts).host
        chosen.expected[model] = 0.0  # what ModelHosts.pick records
        placed[chosen.address] += 1
    assert sorted(placed.values()) == [2, 2, 2], placed  # not the hash's pile-up on one host
    # a refresh that finds a load under way: LOADING is not in the host's used bytes yet, but counts
    hosts[0].expected.clear()
    hosts[0].models["a"] = ModelOnHost(LOADING, load_bytes=size)
    assert hosts[0].free_bytes == (300 - 8 - 128) * MB


def test_a_first_load_goes_to_a_host_that_is_loading_nothing_else():
    def hosts_for(model: str, busy: bool = True) -> list[HostView]:
        size = {model: ModelOnHost(UNLOADED, load_bytes=100 * MB)}
        other = {"big": ModelOnHost(LOADING if busy else READY, load_bytes=500 * MB, memory_bytes=500 * MB)}
        return [host("busy:1", budget_mb=4000, used_mb=0 if busy else 500, **other, **size),
                *(host(f"idle:{i}", budget_mb=4000, used_mb=500, **size) for i in range(2))]

    # room everywhere: the hash would send about a third of the models to busy:1, behind a 500 MB load
    assert "busy:1" not in {choose(m, hosts_for(m)).host.address for m in MODELS[:300]}
    once_loaded = Counter(choose(m, hosts_for(m, busy=False)).host.address for m in MODELS[:300])
    assert once_loaded["busy:1"] > 60, once_loaded  # that load over, the hash alone again
    # a load of this very model under way there is joined, not avoided
    joined = hosts_for("m")
    joined[0].models["m"] = ModelOnHost(LOADING, load_bytes=100 * MB)
    assert choose("m", joined).host.address == "busy:1"


def test_a_burst_of_loads_splits_across_hosts_by_what_they_will_take():
    # a host died: its 12 models are called at once, each to load on one of the 3 hosts left
    sizes = {f"orphan-{i}": (200 if i < 3 else 20) * MB for i in range(12)}
    hosts = [host(f"h:{i}", budget_mb=4000, used_mb=100,
                  **{m: ModelOnHost(UNLOADED, load_bytes=size) for m, size in sizes.items()}) for i in range(3)]
    for model in sizes:
        choose(model, hosts).host.expected[model] = 0.0  # what ModelHosts.pick records
    queued = [sum(sizes[m] for m in h.expected) / MB for h in hosts]
    assert sorted(queued) == [260, 260, 260], queued  # one 200 MB load and three of 20 MB each


def test_an_answered_call_ends_the_load_it_waited_for_before_the_next_refresh():
    size = {"a": ModelOnHost(UNLOADED, load_bytes=100 * MB), "b": ModelOnHost(UNLOADED, load_bytes=100 * MB)}
    hosts = [host(f"h:{i}", budget_mb=4000, used_mb=100, **size) for i in range(2)]
    first = choose("a", hosts).host
    first.expected["a"] = 0.0  # what ModelHosts.pick records
    other = next(h for h in hosts if h is not first)
    assert choose("b", hosts).host is other  # away from the load under way
    first.answered("a")  # the call that loaded `a` got its answer: that load is over
    assert first.ready("a") and first.coming_bytes() == 0 and first.used_bytes == 200 * MB
    assert choose("a", hosts).host is first


def test_config_keys_and_their_mistakes():
    from services.common.config import ConfigError, parse_config
    from services.common.placement import uses_placement

    fleet = "fleet:\n  m: {task: text-generation, copies: 2}\nroutes:\n  r: {primary: m}\n"
    two = "services:\n  router: {model_host_targets: [127.0.0.1:1, 127.0.0.1:2]%s}\n"
    assert uses_placement(parse_config(two % "" + fleet))  # auto: several hosts
    assert not uses_placement(parse_config(two % ", model_host_balancing: round_robin" + fleet))
    assert not uses_placement(parse_config(fleet))  # one host
    assert uses_placement(parse_config("services:\n  router: {model_host_targets: dns:///hosts:50061}\n" + fleet))
    assert parse_config(fleet).fleet["m"].copies == 2
    with pytest.raises(ConfigError) as caught:
        parse_config(two % ", model_host_balancing: hash" + fleet.replace("copies: 2", "copies: 0"))
    messages = [str(p) for p in caught.value.problems]
    assert any("services.router.model_host_balancing: `hash` is not allowed; use one of: auto, placement, "
               "round_robin" in m for m in messages), messages
    assert any("fleet.m.copies: must be between 1 and 64, got 0" in m for m in messages), messages


def test_a_host_finds_itself_among_the_targets_by_port_and_a_local_address():
    from services.model_host.hot_placement import is_own_address

    assert is_own_address("127.0.0.1:50061", 50061) and is_own_address("localhost:50061", 50061)
    assert not is_own_address("127.0.0.1:50062", 50061)  # another replica on this machine
    assert not is_own_address("192.0.2.7:50061", 50061)  # TEST-NET-1: never an address of this machine
    assert not is_own_address("no-such-host.invalid:50061", 50061)


def test_pin_hot_and_its_mistakes():
    from services.common.config import ConfigError, parse_config

    fleet = "fleet:\n  m: {task: text-generation, tier: hot, copies: 2}\nroutes:\n  r: {primary: m}\n"
    assert parse_config(fleet).services.model_host.pin_hot == "targets"
    with pytest.raises(ConfigError) as caught:
        parse_config("services:\n  model_host: {pin_hot: sometimes}\n" + fleet)
    assert "services.model_host.pin_hot: `sometimes` is not allowed; use one of: targets, everywhere" in \
        str(caught.value.problems[0])
    addresses = [f"10.0.0.{i}:50061" for i in range(4)]
    two = placement_targets("m", addresses, copies=2)
    assert two == [h.address for h in placement_order("m", [HostView(a, healthy=True) for a in addresses])[:2]]
