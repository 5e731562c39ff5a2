"""The models this host knows, and their lifecycle within a memory budget.

- Tiers (the article's): hot models are pinned — loaded at start, never evicted;
  warm and cold models load on demand and are unloaded `keep_alive` after their
  last use. When memory is short, idle cold models are evicted before warm ones,
  least recently used first. A model with calls in flight is never evicted.
- The budget is checked before every load with the model's measured size (or,
  before its first load, an estimate from its files); a model that cannot fit
  even after evicting everything evictable is refused, saying how much it needs.
- One load at a time: concurrent calls for a cold model share one load, and a
  caller that gives up does not abort the load others wait for.
- Which idle model a load evicts is the tier policy's choice (services/model_host/tiering.py):
  the configured tiers, or usage-driven promotion.
- Hooks (`RegistryHook`) let batching and metrics follow loads and unloads
  without being wired into this class.
- A classifier declared as a head on an encoder (`fleet.NAME.encoder`) loads that encoder first
  and runs on its session; the encoder is counted once, and is held (pinned: never evicted nor
  reaped) while any of its heads is loading or loaded.

The loader and the memory meter are injected, so the policy is testable
without real models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import AsyncIterator, Callable, Protocol

from services.common.config import ModelSpec
from services.common.errors import FailedPrecondition, ResourceExhausted, Unavailable
from services.common.logs import log_event
from services.common.model_repository import ModelManifest, ModelNotFoundError, ModelRepository, ModelRepositoryError
from services.model_host.runtimes import ModelRuntime
from services.model_host.tiering import StaticTiers, UsageTiers

log = logging.getLogger("mirador.model_host.registry")

MB = 1024 * 1024
# A model whose load failed is not retried by every call (each try may read
# hundreds of MB); LoadModel retries at once.
RETRY_FAILED_AFTER_S = 30.0
# Before a model's first load its size is estimated from its files; sessions
# hold a little more than the weights (FACTS.md: ~1.2x for quantized models).
ESTIMATE_FACTOR = 1.2


class State:
    NOT_BUILT = "not_built"
    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ModelRecord:
    spec: ModelSpec
    manifest: ModelManifest | None = None
    state: str = State.NOT_BUILT
    detail: str = ""
    runtime: ModelRuntime | None = None
    load_task: asyncio.Task | None = None
    measured_bytes: int = 0  # resident size measured at the last load
    last_used_wall: float = 0.0
    last_used: float = 0.0  # monotonic
    requests_total: int = 0
    in_flight: int = 0
    waiting: int = 0  # calls waiting for its load: once loaded, it is theirs before the next load's eviction
    load_ms: float = 0.0
    failed_at: float | None = None  # monotonic time of the last failed load
    pinned: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def needed_bytes(self) -> int:
        if self.measured_bytes:
            return self.measured_bytes
        size = self.manifest.size_bytes if self.manifest else 0
        if self.spec.encoder and self.manifest and "head" in self.manifest.files:  # the head, not the whole graph
            with contextlib.suppress(OSError):  # a missing file: its load will say so; estimate from the manifest
                size = sum(self.manifest.path_of(role).stat().st_size for role in ("head", "tokenizer")
                           if role in self.manifest.files)
        return int(size * ESTIMATE_FACTOR)

    @property
    def loaded_bytes(self) -> int:
        return self.measured_bytes if self.state == State.READY else 0


class RegistryHook(Protocol):
    def on_model_load(self, record: ModelRecord) -> None: ...

    def on_model_unload(self, record: ModelRecord) -> None: ...

    # Optional: memory a hook holds for a loaded model outside what its load measures (a decoder
    # engine's KV slots), known before the load: counted in the model's size against the budget.
    # def reserved_bytes(self, record: ModelRecord) -> int: ...


Loader = Callable[[ModelManifest], ModelRuntime]
MemoryMeter = Callable[[], int]  # resident bytes of this process now


def process_rss_bytes() -> int:
    """Resident bytes, after handing freed heap back to the OS: a first load optimises the graph
    in scratch memory that glibc would otherwise keep, and counting it would make the model
    look hundreds of MB bigger than it stays."""
    import psutil

    _trim_heap()
    return psutil.Process().memory_info().rss


def _trim_heap() -> None:
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


@dataclass
class ModelRegistry:
    fleet: dict[str, ModelSpec]
    repository: ModelRepository
    loader: Loader
    budget_bytes: int = 0  # 0 = unlimited
    memory_meter: MemoryMeter = process_rss_bytes
    clock: Callable[[], float] = time.monotonic
    hooks: list[RegistryHook] = field(default_factory=list)
    tiers: StaticTiers | UsageTiers = field(default_factory=StaticTiers)
    # hot models another host pins (placement across hosts: services/model_host/hot_placement.py); warm here
    hot_elsewhere: set[str] = field(default_factory=set)
    # How long a load that only calls in flight keep out waits for them to end before it is refused.
    room_wait_s: float = 0.0
    records: dict[str, ModelRecord] = field(init=False)

    def __post_init__(self):
        self.records = {name: ModelRecord(spec, pinned=self.pins(spec)) for name, spec in self.fleet.items()}
        self._load_lock = asyncio.Lock()
        # Loads run one at a time, always on this one thread: a thread's first allocations (its stack,
        # a malloc arena) would otherwise be charged to whichever load ran first on a new pool thread
        # (a 0.2 MB classifier head measured 6.3 MB that way in a busy test run).
        self._loading = ThreadPoolExecutor(1, thread_name_prefix="model-load")
        self._calls_ended = asyncio.Event()  # set whenever a model's last call in flight ends

    def pins(self, spec: ModelSpec) -> bool:
        """Whether this host pins `spec` for its tier: hot, and not pinned by another host instead."""
        return spec.tier == "hot" and spec.name not in self.hot_elsewhere

    def place_hot(self, elsewhere: set[str]) -> None:
        """Pins the hot models but `elsewhere` (another host's to pin): those act as warm here."""
        self.hot_elsewhere = set(elsewhere)
        for record in self.records.values():
            record.pinned = self.pins(record.spec) or bool(self.heads_of(record))

    def fleet_fits(self) -> bool:
        """Whether the budget holds every built model of the fleet at once (or there is none)."""
        if not self.budget_bytes:
            return True
        total = 0
        for record in self.records.values():
            if record.manifest is None:
                continue
            try:
                total += record.measured_bytes or record.needed_bytes + self.reserved_bytes(record)
            except (KeyError, TypeError, ValueError, OSError):  # facts a size needs are missing: its load will say
                continue
        return total <= self.budget_bytes

    # ------------------------------------------------------------------ state

    def refresh(self) -> None:
        """Re-reads the repository for models that are not in memory."""
        for record in self.records.values():
            if record.state in (State.READY, State.LOADING):
                continue
            try:
                record.manifest = self.repository.get(record.spec.artifact, record.spec.version)
            except ModelNotFoundError:
                record.manifest, record.state = None, State.NOT_BUILT
                record.detail = "not in the model repository; build it with `mirador fleet build`"
            except ModelRepositoryError as exc:
                record.manifest, record.state, record.detail = None, State.FAILED, str(exc)
            else:
                if record.state == State.NOT_BUILT:  # an unloaded model keeps saying why (evicted, idle, ...)
                    record.state, record.detail = State.UNLOADED, "built, not loaded"

    def reserved_bytes(self, record: ModelRecord) -> int:
        return sum(hook.reserved_bytes(record) for hook in self.hooks if hasattr(hook, "reserved_bytes"))

    def needed_bytes(self, record: ModelRecord) -> int:
        """What loading `record` will take: measured at its last load, else estimated from its files
        plus what the hooks reserve for it; for a head, plus its encoder's when that is not loaded."""
        own = record.measured_bytes or record.needed_bytes + self.reserved_bytes(record)
        encoder = self.records.get(record.spec.encoder) if record.spec.encoder else None
        if encoder is not None and encoder.state != State.READY:
            own += self.needed_bytes(encoder)
        return own

    @property
    def used_bytes(self) -> int:
        return sum(r.loaded_bytes for r in self.records.values())

    def promoted(self) -> set[str]:
        """Models the tier policy treats as hot now because they are used most (none with `static`)."""
        return self.tiers.promoted(self._in_memory(), self.needed_bytes, self.budget_bytes, self.clock())

    def _in_memory(self) -> list[ModelRecord]:
        return [r for r in self.records.values() if r.state in (State.READY, State.LOADING)]

    def record(self, name: str) -> ModelRecord:
        return self.records[name]

    def add(self, spec: ModelSpec) -> ModelRecord:
        """Serves a model added to the fleet (a reloaded config), found in the repository as usual."""
        record = self.records[spec.name] = ModelRecord(spec, pinned=self.pins(spec))
        self.fleet[spec.name] = spec
        self.refresh()
        return record

    # ------------------------------------------------------------------ loading

    async def ensure_loaded(self, name: str, retry_failed: bool = False) -> ModelRecord:
        """Returns once `name` is READY; shares a load already in progress."""
        record = self.records[name]
        if record.state == State.READY:
            return record
        recently_failed = record.failed_at is not None and self.clock() - record.failed_at < RETRY_FAILED_AFTER_S
        if record.state == State.FAILED and recently_failed and not retry_failed:
            raise Unavailable(f"model `{name}` {record.detail}; fix it and call LoadModel to retry")
        if record.load_task is None or record.load_task.done():
            if record.state in (State.NOT_BUILT, State.UNLOADED, State.FAILED):
                self.refresh()
            if record.state == State.NOT_BUILT:
                raise FailedPrecondition(f"model `{name}` is {record.detail}")
            record.load_task = asyncio.create_task(self._load(record), name=f"load {name}")
        # shield: a caller that cancels stops waiting; the load goes on for the others
        await asyncio.shield(record.load_task)
        return record

    async def _load(self, record: ModelRecord) -> None:
        encoder = await self._hold_encoder(record) if record.spec.encoder else None
        try:
            await self._load_alone(record, encoder)
        finally:
            if encoder is not None and record.state != State.READY:
                self._release_encoder(record)

    async def _hold_encoder(self, head: ModelRecord) -> ModelRecord:
        """Loads a head's encoder and pins it until no head of it is loading or loaded."""
        if head.spec.encoder not in self.records:
            raise FailedPrecondition(f"model `{head.name}` is a head on `{head.spec.encoder}`, which this host's "
                                     "fleet does not have; add it under `fleet:`")
        encoder = await self.ensure_loaded(head.spec.encoder)
        encoder.pinned = True  # no await since it became READY: nothing can have evicted it
        return encoder

    def heads_of(self, encoder: ModelRecord) -> list[ModelRecord]:
        """The heads of `encoder` that are loading or loaded (what holds it in memory)."""
        return [r for r in self.records.values()
                if r.spec.encoder == encoder.name and r.state in (State.LOADING, State.READY)]

    def _release_encoder(self, head: ModelRecord) -> None:
        encoder = self.records[head.spec.encoder]
        encoder.pinned = self.pins(encoder.spec) or any(h is not head for h in self.heads_of(encoder))

    async def _load_alone(self, record: ModelRecord, encoder: ModelRecord | None) -> None:
        async with self._load_lock:
            if record.state == State.READY:
                return
            await self._make_room(record)
            record.state, record.detail = State.LOADING, "loading"
            started = time.perf_counter()
            try:
                load = partial(self.loader, record.manifest, encoder=encoder.runtime) if encoder else \
                    partial(self.loader, record.manifest)
                # measured on the loading thread too: trimming a heap of a big graph's scratch memory took
                # 0.12-0.14 s per reading on the event loop, time the host's health checks waited for
                runtime, grown = await asyncio.get_running_loop().run_in_executor(self._loading, self._measured, load)
            except Exception as exc:  # noqa: BLE001 - a broken model must not take the host down
                record.state, record.detail = State.FAILED, f"failed to load: {exc}"
                record.failed_at = self.clock()
                log_event(log, "model load failed", logging.ERROR, model=record.name, error=str(exc))
                raise Unavailable(f"model `{record.name}` failed to load: {exc}; fix it and call LoadModel to retry") from None
            record.load_ms = (time.perf_counter() - started) * 1000
            # A reload can reuse memory the process kept after the last unload, which makes
            # the difference look small: never let a reload shrink what the first load measured.
            measured = grown + self.reserved_bytes(record)
            record.measured_bytes = max(measured, record.measured_bytes, 1)
            record.runtime, record.state, record.failed_at = runtime, State.READY, None
            record.detail = f"loaded in {record.load_ms:.0f} ms"
            record.last_used = self.clock()
            for hook in self.hooks:
                hook.on_model_load(record)
            log_event(log, "model loaded", model=record.name, load_ms=round(record.load_ms),
                      memory_mb=round(record.measured_bytes / MB, 1), provider=runtime.execution_provider)
            self._trim_to_budget(record)

    def _measured(self, load: Callable[[], ModelRuntime]) -> tuple[ModelRuntime, int]:
        """Runs `load` and returns its runtime with the resident bytes it added (off the event loop)."""
        before = self.memory_meter()
        runtime = load()
        return runtime, self.memory_meter() - before

    async def _make_room(self, record: ModelRecord) -> None:
        """Evicts idle unpinned models until `record` fits. Where unpinned models busy with calls hold
        the room it lacks, waits up to room_wait_s for those calls to end (a model in use is never
        evicted); refuses at once where even they could not make room, or when the wait is over."""
        if not self.budget_bytes:
            return
        give_up_at = asyncio.get_running_loop().time() + self.room_wait_s
        while True:
            needed = self.needed_bytes(record)
            free = self.budget_bytes - self.used_bytes
            if needed <= free:
                return
            idle, busy = [], 0
            for r in self.records.values():
                if r.state == State.READY and not r.pinned:
                    if r.in_flight or r.waiting:
                        busy += r.loaded_bytes
                    else:
                        idle.append(r)
            candidates = self.tiers.eviction_order(idle, self._in_memory(), self.needed_bytes, self.budget_bytes,
                                                   self.clock())
            reclaimable = sum(r.loaded_bytes for r in candidates)
            if needed <= free + reclaimable:
                break
            waited = self.room_wait_s - (give_up_at - asyncio.get_running_loop().time())
            if needed > free + reclaimable + busy or waited >= self.room_wait_s:
                after = f" (after waiting {waited:.1f} s for calls to end)" if waited > 0 else ""
                raise ResourceExhausted(
                    f"model `{record.name}` needs {needed / MB:.0f} MB; the budget is {self.budget_bytes / MB:.0f} MB "
                    f"with {free / MB:.0f} MB free, {reclaimable / MB:.0f} MB held by idle models that could be "
                    f"evicted and {busy / MB:.0f} MB by models serving calls{after}. Raise "
                    "services.model_host.memory_budget_mb, unload a pinned model, or wait for calls to finish."
                )
            self._calls_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._calls_ended.wait(), give_up_at - asyncio.get_running_loop().time())
        for victim in candidates:
            if needed <= self.budget_bytes - self.used_bytes:
                break
            self._unload(victim, reason=f"evicted to make room for {record.name}")

    def _trim_to_budget(self, loaded: ModelRecord) -> None:
        """A first load can measure more than its estimate: evicts idle models until the budget holds
        again (pinned ones stay, so a host can report more used than its budget; placement believes it)."""
        if not self.budget_bytes or self.used_bytes <= self.budget_bytes:
            return
        candidates = self.tiers.eviction_order(
            (r for r in self.records.values()
             if r.state == State.READY and not r.pinned and r.in_flight == 0 and not r.waiting and r is not loaded),
            self._in_memory(), self.needed_bytes, self.budget_bytes, self.clock())
        for victim in candidates:
            if self.used_bytes <= self.budget_bytes:
                break
            self._unload(victim, reason=f"evicted to make room for {loaded.name} (it measured "
                                        f"{loaded.measured_bytes / MB:.0f} MB, more than estimated)")

    # ------------------------------------------------------------------ unloading

    def _unload(self, record: ModelRecord, reason: str) -> None:
        for hook in self.hooks:
            hook.on_model_unload(record)
        if record.runtime is not None:
            record.runtime.close()
        record.runtime = None
        record.state, record.detail = State.UNLOADED, reason
        if record.spec.encoder in self.records:
            self._release_encoder(record)
        log_event(log, "model unloaded", model=record.name, reason=reason)

    async def unload(self, name: str) -> ModelRecord:
        record = self.records[name]
        async with self._load_lock:
            heads = [h.name for h in self.heads_of(record)]
            if heads and record.state == State.READY:
                raise FailedPrecondition(
                    f"model `{name}` is the encoder of loaded head(s) {', '.join(heads)}; unload them first"
                )
            if record.in_flight:
                raise FailedPrecondition(
                    f"model `{name}` is serving {record.in_flight} call(s); unload it when they have finished"
                )
            if record.state == State.READY:
                self._unload(record, reason="unloaded on request")
        return record

    def reap_idle(self) -> list[str]:
        """Unloads warm and cold models idle for longer than their keep_alive."""
        now = self.clock()
        reaped = []
        promoted = self.promoted()
        for record in self.records.values():
            idle_s = now - record.last_used
            if (record.state == State.READY and not record.pinned and record.in_flight == 0 and not record.waiting
                    and idle_s >= record.spec.keep_alive_s and record.name not in promoted):
                self._unload(record, reason=f"idle for {idle_s:.0f} s (keep_alive {record.spec.keep_alive_s:g} s)")
                reaped.append(record.name)
        return reaped

    async def run_reaper(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not self._load_lock.locked():
                self.reap_idle()

    async def load_pinned(self) -> None:
        """Loads the hot tier at start. A model that fails is marked FAILED; the host still serves."""
        self.refresh()
        for record in self.records.values():
            if record.pinned and record.state == State.UNLOADED:
                with contextlib.suppress(Exception):
                    await self.ensure_loaded(record.name)

    async def close(self) -> None:
        for record in self.records.values():
            if record.state == State.READY:
                self._unload(record, reason="host stopping")
        self._loading.shutdown(wait=False)

    # ------------------------------------------------------------------ use

    @contextlib.asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[ModelRecord]:
        """Marks a call in flight on a loaded model (so it is not evicted) for the block's duration."""
        # Counted before the load, so that a model loaded for this call does not look unused to
        # loads that follow while it waits for its turn.
        self.tiers.record_use(name, self.clock())
        record = self.records[name]
        record.waiting += 1  # a load for another model must not evict this one before our turn
        try:
            await self.ensure_loaded(name)
            while record.state != State.READY:  # unloaded on request between its load and our turn: load again
                await self.ensure_loaded(name)
        finally:
            record.waiting -= 1
        record.in_flight += 1
        record.requests_total += 1
        try:
            yield record
        finally:
            record.in_flight -= 1
            if not record.in_flight:
                self._calls_ended.set()
            record.last_used = self.clock()
            record.last_used_wall = time.time()
