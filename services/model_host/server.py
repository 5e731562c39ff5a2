"""Wires the model host process: repository → registry (+ hooks) → data plane → servicer."""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from services.common.config import MiradorConfig
from services.common.model_repository import ModelRepository
from services.common.server import MiradorService, run_service_main
from services.model_host.dataplane import BatchingHook, DataPlane
from services.model_host.faults import InjectedDelays
from services.model_host.loader import SessionSettings, default_optimized_cache, load_runtime
from services.model_host.observability import ObservabilityHook
from services.model_host.registry import MB, ModelRegistry
from services.model_host.servicer import ModelHostServicer

# Model work runs in these threads; ONNX Runtime releases the GIL while it runs.
INFERENCE_THREADS = 4


class ModelHostService(MiradorService):
    name = "model_host"

    def __init__(self, config: MiradorConfig):
        settings = config.services.model_host
        self.settings = settings
        self.executor = ThreadPoolExecutor(INFERENCE_THREADS, thread_name_prefix="inference")
        session_settings = SessionSettings(
            providers=settings.execution_providers,
            intra_op_threads=settings.intra_op_threads,
            optimized_cache=default_optimized_cache(),
        )
        self.batching = BatchingHook(self.executor, settings.max_batch_size, settings.max_queue_delay_ms / 1000)
        self.registry = ModelRegistry(
            fleet=config.fleet,
            repository=ModelRepository(config.model_repository),
            loader=partial(load_runtime, settings=session_settings),
            budget_bytes=settings.memory_budget_mb * MB,
            hooks=[self.batching],
        )
        self.registry.hooks.append(ObservabilityHook(self.registry, self.batching))  # after batching
        self.servicer = ModelHostServicer(config, self.registry, DataPlane(self.registry, self.executor, self.batching, InjectedDelays.from_environment()))
        self._background: list[asyncio.Task] = []

    @property
    def grpc_service_names(self) -> list[str]:
        return [model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        model_host_pb2_grpc.add_ModelHostServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        self.registry.refresh()
        # Pinned models load in the background: the host answers health checks at
        # once and ListModels shows each model's readiness; calls wait for their model.
        self._background = [
            asyncio.create_task(self.registry.load_pinned(), name="load pinned models"),
            asyncio.create_task(self.registry.run_reaper(self.settings.reaper_interval_s), name="keep-alive reaper"),
        ]

    async def on_stop(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.registry.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    return run_service_main("model_host", ModelHostService, argv)
