"""Usage-driven promotion (services/model_host/tiering.py) in the registry, with the loader and the
memory meter injected: a frequently used model becomes hot by itself and outlives a burst of
one-off loads that plain LRU lets push it out; a rarely used one is not promoted."""

import asyncio

from services.common.config import ModelSpec
from services.model_host.registry import MB, ModelRegistry, State
from services.model_host.tiering import StaticTiers, UsageTiers
from test_registry import FakeRepository, MeteredLoader, make_registry

SIZES = {"busy": 100, "rare": 100, "one-a": 100, "one-b": 100, "one-c": 100}


def scenario(tiers) -> tuple[dict[str, str], set[str]]:
    """`busy` used 5 times, `rare` once, then three one-off models, each used once, in a budget
    of three models (each needs 120 MB: 1.2 x its files). Returns every state and the promoted set."""

    async def run():
        registry, _, clock = make_registry({name: "warm" for name in SIZES}, SIZES, budget_mb=370)
        registry.tiers = tiers
        for _ in range(5):
            clock.now += 1
            async with registry.use("busy"):
                pass
        for name in ("rare", "one-a", "one-b", "one-c"):
            clock.now += 1
            async with registry.use(name):
                pass
        return {n: r.state for n, r in registry.records.items()}, registry.promoted()

    return asyncio.run(run())


def test_a_frequently_used_model_is_promoted_and_survives_one_off_loads():
    states, promoted = scenario(UsageTiers(half_life_s=600, promote_after_calls=3, promote_share=0.75))
    assert promoted == {"busy"}  # `rare` (1 call) and the one-offs are not promoted
    assert states["busy"] == State.READY
    assert sum(s == State.READY for s in states.values()) == 3


def test_plain_lru_lets_the_same_one_off_loads_evict_it():  # the negative control: the check can fail
    states, promoted = scenario(StaticTiers())
    assert promoted == set()
    assert states["busy"] == State.UNLOADED


def test_promotion_decays_and_keeps_to_its_share_of_the_budget():
    tiers = UsageTiers(half_life_s=60, promote_after_calls=3, promote_share=0.5)

    class Rec:
        def __init__(self, name):
            self.name, self.pinned, self.last_used = name, False, 0.0

    records = [Rec(n) for n in ("a", "b", "c")]
    for name, calls in (("a", 10), ("b", 8), ("c", 6)):
        for _ in range(calls):
            tiers.record_use(name, now=0.0)
    size = lambda r: 100 * MB  # noqa: E731
    # 300 MB budget, half of it for promoted models: the two most used
    assert tiers.promoted(records, size, 300 * MB, now=0.0) == {"a"}  # 150 MB holds one model of 100 MB
    assert tiers.promoted(records, size, 400 * MB, now=0.0) == {"a", "b"}
    # two half-lives later a has 2.5 calls, below 3: nothing is hot any more
    assert tiers.promoted(records, size, 400 * MB, now=120.0) == set()


def test_a_promoted_model_is_not_reaped_for_idleness():
    async def run():
        registry, _, clock = make_registry({"busy": "warm", "rare": "warm"}, {"busy": 100, "rare": 100},
                                           budget_mb=1000, keep_alive_s=10)
        registry.tiers = UsageTiers(half_life_s=600, promote_after_calls=3)
        for name, calls in (("busy", 4), ("rare", 1)):
            for _ in range(calls):
                async with registry.use(name):
                    pass
        clock.now += 30
        assert registry.reap_idle() == ["rare"]
        assert registry.record("busy").state == State.READY

    asyncio.run(run())


def test_a_load_that_measures_more_than_its_estimate_evicts_until_the_budget_holds():
    async def run():
        files = {"a": 100, "b": 100, "big": 50}  # `big` is estimated at 60 MB from its files ...
        loader = MeteredLoader({"a": 100, "b": 100, "big": 200})  # ... and takes 200 once loaded
        fleet = {n: ModelSpec(name=n, task="text-generation", tier="warm") for n in files}
        registry = ModelRegistry(fleet, FakeRepository(files), loader, budget_bytes=300 * MB, memory_meter=loader.meter)
        registry.refresh()
        for name in ("a", "b", "big"):
            async with registry.use(name):
                pass
        assert registry.used_bytes <= registry.budget_bytes  # idle models go rather than the host staying over
        assert registry.record("a").state == State.UNLOADED and "more than estimated" in registry.record("a").detail
        assert registry.record("big").state == State.READY

    asyncio.run(run())


def test_a_model_loaded_for_waiting_calls_is_not_evicted_before_they_run():
    """Cold models are evicted first whatever their recency: without the waiting count, the next
    load took a cold model loaded a moment ago for calls still waiting for it, and they loaded it again."""

    async def run():
        registry, loader, clock = make_registry({"a": "cold", "b": "cold", "c": "cold"},
                                                {"a": 100, "b": 100, "c": 100}, budget_mb=250)
        for name in ("a", "b"):
            clock.now += 1
            async with registry.use(name):
                pass
        registry.record("a").waiting = 1  # a call for `a` has seen its load finish, not yet run
        await registry.ensure_loaded("c")
        assert registry.record("a").state == State.READY and registry.record("b").state == State.UNLOADED
        assert loader.loads == ["a", "b", "c"]

    asyncio.run(run())
