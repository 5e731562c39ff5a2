"""Wires the model host process: repository → registry (+ hooks) → data plane → servicer."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from services.common.config import ConfigError, ConfigProblem, MiradorConfig
from services.common.logs import log_event
from services.common.model_repository import ModelRepository
from services.common.server import MiradorService, run_service_main
from services.model_host import observability
from services.model_host.dataplane import BatchingHook, DataPlane
from services.model_host.engine import EngineHook, EngineSettings
from services.model_host.faults import InjectedDelays
from services.model_host.hot_placement import HotPins
from services.model_host.loader import SessionSettings, default_optimized_cache, load_runtime
from services.model_host.observability import ObservabilityHook
from services.model_host.registry import MB, ModelRegistry
from services.model_host.runtimes.tokenizer_files import SharedTokenizers
from services.model_host.servicer import ModelHostServicer
from services.model_host.tiering import tier_policy

# Encoder and classifier work runs in these threads (ONNX Runtime releases the GIL while it runs);
# each decoder runs on its own engine thread.
INFERENCE_THREADS = 4
log = logging.getLogger("mirador.model_host")
# What a reload changes in a running host: of existing models, tier and keep_alive; of the host,
# the memory budget, the per-model queue limit and where hot models are pinned. The rest needs a restart.
RELOADABLE_MODEL_FIELDS = ("tier", "keep_alive_s", "rollout")  # the router acts on rollouts
RELOADABLE_HOST_SETTINGS = ("memory_budget_mb", "room_wait_s", "max_queue_per_model", "reaper_interval_s", "pin_hot")


class ModelHostService(MiradorService):
    name = "model_host"

    def __init__(self, config: MiradorConfig):
        settings = config.services.model_host
        require_available_providers(config)
        self.settings = settings
        self.executor = ThreadPoolExecutor(INFERENCE_THREADS, thread_name_prefix="inference")
        faults = InjectedDelays.from_environment()  # tests only; empty unless MIRADOR_INJECT_* is set
        session_settings = SessionSettings(
            providers=settings.execution_providers,
            intra_op_threads=settings.intra_op_threads,
            thread_spinning=settings.thread_spinning,
            optimized_cache=default_optimized_cache(),
            tokenizers=SharedTokenizers(),
            during_load=faults.during_load if faults.load_delays else None,
        )
        self.batching = BatchingHook(self.executor, settings.max_batch_size, settings.max_queue_delay_ms / 1000)

        def engine_settings(record) -> EngineSettings:
            return EngineSettings(max_num_seqs=record.spec.max_num_seqs, max_context=record.spec.max_context,
                                  prefill_chunk_tokens=self.settings.prefill_chunk_tokens,
                                  step_delay_s=faults.token_delays.get(record.name, 0.0))

        self.engines = EngineHook(engine_settings, on_step=observability.decode_step,
                                  on_prefix_reuse=observability.prefix_reused)
        self.registry = ModelRegistry(
            fleet=config.fleet,
            repository=ModelRepository(config.model_repository),
            loader=partial(load_runtime, settings=session_settings),
            budget_bytes=settings.memory_budget_mb * MB,
            room_wait_s=settings.room_wait_s,
            hooks=[self.batching, self.engines],
            tiers=tier_policy(settings),
        )
        self.registry.hooks.append(ObservabilityHook(self.registry, self.batching))  # after batching
        dataplane = DataPlane(self.registry, self.executor, self.batching, faults, self.engines)
        self.servicer = ModelHostServicer(config, self.registry, dataplane)
        self._background: list[asyncio.Task] = []
        # hot models pinned on their placement targets over the hosts that are up, kept so as hosts come and go
        self.hot_pins = HotPins(lambda: self.servicer.config, settings.port, self.registry, bound_to=settings.host)

    @property
    def grpc_service_names(self) -> list[str]:
        return [model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        model_host_pb2_grpc.add_ModelHostServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        self.registry.refresh()
        await self.hot_pins.update()
        self.hot_pins.start()
        # Pinned models load in the background: the host answers health checks at
        # once and ListModels shows each model's readiness; calls wait for their model.
        self._background = [
            asyncio.create_task(self.registry.load_pinned(), name="load pinned models"),
            asyncio.create_task(self.registry.run_reaper(self.settings.reaper_interval_s), name="keep-alive reaper"),
        ]

    async def on_config_reload(self, new_config: MiradorConfig) -> None:
        old_fleet = self.servicer.config.fleet
        restart = [f"fleet.{name} (removed)" for name in old_fleet if name not in new_config.fleet]
        fleet, changed = {}, []
        for name, spec in new_config.fleet.items():
            if name not in old_fleet:  # added models (a rollout's candidate, say) are served at once
                self.registry.add(spec)
                fleet[name] = spec
                changed.append(name)
        for name, old_spec in old_fleet.items():
            new_spec = new_config.fleet.get(name)
            if new_spec is None:
                fleet[name] = old_spec  # still served until a restart
                continue
            applied = dataclasses.replace(old_spec, **{f: getattr(new_spec, f) for f in RELOADABLE_MODEL_FIELDS})
            restart += [f"fleet.{name}.{f.name}" for f in dataclasses.fields(new_spec)
                        if f.name not in RELOADABLE_MODEL_FIELDS and getattr(new_spec, f.name) != getattr(old_spec, f.name)]
            if applied != old_spec:
                changed.append(name)
                self.registry.record(name).spec = applied
            fleet[name] = applied
        old, new = self.settings, new_config.services.model_host
        restart += [f"services.model_host.{f.name}" for f in dataclasses.fields(new)
                    if f.name not in (*RELOADABLE_HOST_SETTINGS, "host", "port", "max_concurrent_rpcs", "metrics_port")
                    and getattr(new, f.name) != getattr(old, f.name)]
        self.registry.budget_bytes = new.memory_budget_mb * MB
        self.registry.room_wait_s = new.room_wait_s
        self.servicer.admission.set_limit(new.max_queue_per_model)
        if new.reaper_interval_s != old.reaper_interval_s:
            reaper = next((t for t in self._background if t.get_name() == "keep-alive reaper"), None)
            if reaper is not None:
                reaper.cancel()
                self._background.remove(reaper)
            self._background.append(asyncio.create_task(self.registry.run_reaper(new.reaper_interval_s),
                                                        name="keep-alive reaper"))
        self.settings = dataclasses.replace(old, **{k: getattr(new, k) for k in RELOADABLE_HOST_SETTINGS})
        # the servicer validates against the fleet the registry serves: the old models, new tiers and keep_alive
        self.servicer.config = dataclasses.replace(new_config, fleet=fleet)
        # pins follow the new tiers, budget and targets (hot models pinned on their placement targets only)
        await self.hot_pins.update(reloaded=True)
        if restart:
            log_event(log, "config reload: restart the model host to apply these changes", logging.WARNING,
                      keys=restart)
        log_event(log, "model settings applied", models=changed, memory_budget_mb=new.memory_budget_mb,
                  max_queue_per_model=new.max_queue_per_model)
        if any(self.registry.record(name).pinned for name in changed):  # a model made hot loads now
            self._background.append(asyncio.create_task(self.registry.load_pinned(), name="load pinned models"))

    async def on_stop(self) -> None:
        await self.hot_pins.close()
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def require_available_providers(config: MiradorConfig) -> None:
    """A provider named in the config that this onnxruntime build lacks is an error at start, not a
    silent fall back to the CPU (a GPU host serving at CPU speed looks healthy and is not)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in config.services.model_host.execution_providers if p not in available]
    if missing:
        raise ConfigError([ConfigProblem(
            str(config.path), 0, "services.model_host.execution_providers",
            f"{', '.join(missing)} not available in this onnxruntime build (it has {', '.join(available)}): install "
            "the [gpu] extra on a machine with the GPU and its drivers, or remove them from the list")])


def main(argv: list[str] | None = None) -> int:
    return run_service_main("model_host", ModelHostService, argv)
