"""Wires the router process: route table, servicer, channel to the model host."""

from __future__ import annotations

import grpc
from mirador.v1 import model_host_pb2_grpc, router_pb2, router_pb2_grpc

from services.common.config import MiradorConfig
from services.common.server import MiradorService, run_service_main
from services.router.routing import RouteTable
from services.router.servicer import RouterServicer


class RouterService(MiradorService):
    name = "router"

    def __init__(self, config: MiradorConfig):
        self.config = config
        self.servicer = RouterServicer(RouteTable(config))
        self.model_host_channel: grpc.aio.Channel | None = None

    @property
    def grpc_service_names(self) -> list[str]:
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        self.model_host_channel = grpc.aio.insecure_channel(self.config.services.model_host.address)
        self.servicer.model_host = model_host_pb2_grpc.ModelHostStub(self.model_host_channel)

    async def on_stop(self) -> None:
        if self.model_host_channel is not None:
            await self.model_host_channel.close()


def main(argv: list[str] | None = None) -> int:
    return run_service_main("router", RouterService, argv)
