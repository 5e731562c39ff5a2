"""Wires the model host process: config → repository → registry → servicer."""

from __future__ import annotations

import grpc
from mirador.v1 import model_host_pb2, model_host_pb2_grpc

from services.common.config import MiradorConfig
from services.common.model_repository import ModelRepository
from services.common.server import MiradorService, run_service_main
from services.model_host.registry import ModelRegistry
from services.model_host.servicer import ModelHostServicer


class ModelHostService(MiradorService):
    name = "model_host"

    def __init__(self, config: MiradorConfig):
        self.registry = ModelRegistry(config, ModelRepository(config.model_repository))
        self.servicer = ModelHostServicer(config, self.registry)

    @property
    def grpc_service_names(self) -> list[str]:
        return [model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        model_host_pb2_grpc.add_ModelHostServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        self.registry.refresh()


def main(argv: list[str] | None = None) -> int:
    return run_service_main("model_host", ModelHostService, argv)
