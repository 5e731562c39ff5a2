"""Model lifecycle policy, with the loader and the memory meter injected
(Ollama-style), so eviction, refusal and load sharing are tested exactly."""

import asyncio
import threading
import time

import pytest

from services.common.config import ModelSpec
from services.common.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.common.model_repository import ModelManifest
from services.model_host.registry import MB, ModelRegistry, State


class FakeRepository:
    """Every fleet model is built, with the given file size."""

    def __init__(self, sizes_mb: dict[str, int]):
        self.sizes_mb = sizes_mb

    def get(self, name, version=None):
        return ModelManifest(name=name, version="1", task="text-generation", files={"model": "model.onnx"},
                             size_bytes=self.sizes_mb[name] * MB)


class FakeRuntime:
    execution_provider = "CPUExecutionProvider"

    def __init__(self, name):
        self.name = name
        self.closed = False

    def close(self):
        self.closed = True


class MeteredLoader:
    """Loads by 'allocating' the model's size on a fake meter; can block or fail on demand."""

    def __init__(self, sizes_mb, fail=(), gate: threading.Event | None = None):
        self.sizes_mb = sizes_mb
        self.fail = set(fail)
        self.gate = gate
        self.resident = 0
        self.loads: list[str] = []

    def meter(self):
        return self.resident

    def __call__(self, manifest):
        self.loads.append(manifest.name)
        if self.gate is not None:
            assert self.gate.wait(5)
        if manifest.name in self.fail:
            raise ValueError("model.onnx is not a valid ONNX file")
        self.resident += self.sizes_mb[manifest.name] * MB
        return FakeRuntime(manifest.name)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_registry(tiers: dict[str, str], sizes_mb: dict[str, int], budget_mb=0, keep_alive_s=300.0, **loader_kwargs):
    fleet = {name: ModelSpec(name=name, task="text-generation", tier=tier, keep_alive_s=keep_alive_s) for name, tier in tiers.items()}
    loader = MeteredLoader(sizes_mb, **loader_kwargs)
    clock = Clock()
    registry = ModelRegistry(fleet, FakeRepository(sizes_mb), loader, budget_bytes=budget_mb * MB,
                             memory_meter=loader.meter, clock=clock)
    registry.refresh()
    return registry, loader, clock


def run(coro):
    return asyncio.run(coro)


def test_lru_unpinned_model_is_evicted_cold_before_warm():
    async def scenario():
        registry, loader, clock = make_registry(
            {"hot": "hot", "warm-a": "warm", "warm-b": "warm", "cold": "cold", "new": "warm"},
            {"hot": 100, "warm-a": 100, "warm-b": 100, "cold": 100, "new": 100}, budget_mb=500,
        )
        for name in ("hot", "warm-a", "warm-b", "cold"):
            clock.now += 1
            async with registry.use(name):
                pass
        # 400 of 500 MB used; `new` needs 120 (estimate = 1.2 x files) → one eviction. The cold model
        # goes first although it was used most recently (plain LRU would have taken warm-a).
        await registry.ensure_loaded("new")
        assert registry.record("cold").state == State.UNLOADED and "evicted to make room for new" in registry.record("cold").detail
        assert {n for n, r in registry.records.items() if r.state == State.READY} == {"hot", "warm-a", "warm-b", "new"}

    run(scenario())


def test_least_recently_used_warm_model_goes_first():
    async def scenario():
        registry, _, clock = make_registry(
            {"a": "warm", "b": "warm", "c": "warm"}, {"a": 100, "b": 100, "c": 100}, budget_mb=250,
        )
        for name in ("a", "b"):
            clock.now += 1
            async with registry.use(name):
                pass
        clock.now += 1
        async with registry.use("a"):  # a is now more recent than b
            pass
        await registry.ensure_loaded("c")
        assert registry.record("b").state == State.UNLOADED
        assert registry.record("a").state == State.READY

    run(scenario())


def test_model_that_cannot_fit_is_refused_with_numbers():
    async def scenario():
        registry, loader, _ = make_registry({"pinned": "hot", "big": "cold"}, {"pinned": 300, "big": 300}, budget_mb=500)
        await registry.ensure_loaded("pinned")
        with pytest.raises(ResourceExhausted) as caught:
            await registry.ensure_loaded("big")
        message = caught.value.message
        assert "needs 360 MB" in message and "budget is 500 MB" in message and "200 MB free" in message
        assert registry.record("pinned").state == State.READY  # pinned models are never evicted
        assert loader.loads == ["pinned"]

    run(scenario())


def busy_and_other(room_wait_s: float = 0.0) -> ModelRegistry:
    """Two 300 MB models and a 500 MB budget: one fits, so loading the other must evict the first."""
    registry, _, _ = make_registry({"busy": "cold", "other": "cold"}, {"busy": 300, "other": 300}, budget_mb=500)
    registry.room_wait_s = room_wait_s
    return registry


def test_model_with_calls_in_flight_is_never_evicted():
    async def scenario():
        registry = busy_and_other()
        async with registry.use("busy"):
            with pytest.raises(ResourceExhausted, match="0 MB held by idle models"):
                await registry.ensure_loaded("other")
            assert registry.record("busy").state == State.READY
        await registry.ensure_loaded("other")  # once idle, it can go
        assert registry.record("busy").state == State.UNLOADED

    run(scenario())


def test_a_load_kept_out_by_a_busy_model_waits_for_its_call_then_evicts_it():
    async def scenario():
        registry = busy_and_other(room_wait_s=5.0)
        async with registry.use("busy"):
            load = asyncio.create_task(registry.ensure_loaded("other"))
            await asyncio.sleep(0.2)
            assert not load.done()  # waiting for the call, not refused, and nothing evicted under it
            assert registry.record("busy").state == State.READY
        await asyncio.wait_for(load, 2)
        assert registry.record("other").state == State.READY
        assert registry.record("busy").detail == "evicted to make room for other"

    run(scenario())


def test_a_load_kept_out_by_a_busy_model_is_refused_when_the_wait_is_over():
    async def scenario():
        registry = busy_and_other(room_wait_s=0.3)
        async with registry.use("busy"):
            with pytest.raises(ResourceExhausted, match=r"300 MB by models serving calls \(after waiting 0\.3 s"):
                await registry.ensure_loaded("other")
            assert registry.record("busy").state == State.READY

    run(scenario())


def test_a_load_that_busy_models_could_not_make_room_for_is_refused_without_waiting():
    async def scenario():
        registry, _, _ = make_registry({"hot": "hot", "busy": "cold", "big": "cold"},
                                       {"hot": 300, "busy": 100, "big": 400}, budget_mb=500)
        registry.room_wait_s = 30.0
        await registry.ensure_loaded("hot")  # pinned: 300 of 500 MB for good
        async with registry.use("busy"):
            started = time.monotonic()
            with pytest.raises(ResourceExhausted, match="needs 480 MB"):
                await registry.ensure_loaded("big")
            assert time.monotonic() - started < 1

    run(scenario())


def test_concurrent_requests_for_a_cold_model_load_it_once():
    async def scenario():
        gate = threading.Event()
        registry, loader, _ = make_registry({"cold": "cold"}, {"cold": 10}, gate=gate)
        waiters = [asyncio.create_task(registry.ensure_loaded("cold")) for _ in range(5)]
        await asyncio.sleep(0.05)
        assert registry.record("cold").state == State.LOADING
        gate.set()
        await asyncio.gather(*waiters)
        assert loader.loads == ["cold"]

    run(scenario())


def test_a_caller_that_cancels_does_not_abort_the_shared_load():
    async def scenario():
        gate = threading.Event()
        registry, loader, _ = make_registry({"cold": "cold"}, {"cold": 10}, gate=gate)
        impatient = asyncio.create_task(registry.ensure_loaded("cold"))
        patient = asyncio.create_task(registry.ensure_loaded("cold"))
        await asyncio.sleep(0.05)
        impatient.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        await patient
        assert impatient.cancelled()
        assert registry.record("cold").state == State.READY and loader.loads == ["cold"]

    run(scenario())


def test_failed_load_marks_failed_with_reason_and_is_not_retried_by_every_call():
    async def scenario():
        registry, loader, clock = make_registry({"broken": "warm", "fine": "warm"}, {"broken": 10, "fine": 10}, fail={"broken"})
        with pytest.raises(Unavailable, match="not a valid ONNX file"):
            await registry.ensure_loaded("broken")
        record = registry.record("broken")
        assert record.state == State.FAILED and "not a valid ONNX file" in record.detail
        with pytest.raises(Unavailable, match="call LoadModel to retry"):
            await registry.ensure_loaded("broken")
        assert loader.loads == ["broken"]  # the second call did not re-read the files
        with pytest.raises(Unavailable):
            await registry.ensure_loaded("broken", retry_failed=True)  # LoadModel retries at once
        assert loader.loads == ["broken", "broken"]
        await registry.ensure_loaded("fine")  # other models are unaffected
        assert registry.record("fine").state == State.READY

    run(scenario())


def test_keep_alive_unloads_idle_warm_models_but_not_pinned():
    async def scenario():
        registry, _, clock = make_registry({"hot": "hot", "warm": "warm"}, {"hot": 10, "warm": 10}, keep_alive_s=60)
        for name in ("hot", "warm"):
            async with registry.use(name):
                pass
        clock.now += 59
        assert registry.reap_idle() == []
        clock.now += 2
        assert registry.reap_idle() == ["warm"]
        assert registry.record("hot").state == State.READY
        assert registry.record("warm").runtime is None

    run(scenario())


def test_unload_refuses_while_serving_and_frees_memory_after():
    async def scenario():
        registry, _, _ = make_registry({"m": "warm"}, {"m": 50})
        async with registry.use("m") as record:
            runtime = record.runtime
            with pytest.raises(FailedPrecondition, match="serving 1 call"):
                await registry.unload("m")
        assert registry.used_bytes == 50 * MB
        await registry.unload("m")
        assert registry.used_bytes == 0 and runtime.closed

    run(scenario())


def test_measured_size_replaces_the_estimate_after_the_first_load():
    async def scenario():
        registry, loader, _ = make_registry({"m": "warm"}, {"m": 100})
        assert registry.record("m").needed_bytes == 120 * MB  # estimate: files x 1.2
        await registry.ensure_loaded("m")
        assert registry.record("m").needed_bytes == 100 * MB  # measured by the meter

    run(scenario())


def test_load_hooks_are_called():
    events = []

    class Hook:
        def on_model_load(self, record):
            events.append(("load", record.name))

        def on_model_unload(self, record):
            events.append(("unload", record.name))

    async def scenario():
        registry, _, _ = make_registry({"m": "warm"}, {"m": 1})
        registry.hooks.append(Hook())
        await registry.ensure_loaded("m")
        await registry.unload("m")

    run(scenario())
    assert events == [("load", "m"), ("unload", "m")]
