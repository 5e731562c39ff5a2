"""Wires the consensus process."""

from __future__ import annotations

import grpc
from mirador.v1 import consensus_pb2, consensus_pb2_grpc

from services.common.config import MiradorConfig
from services.common.server import MiradorService, run_service_main
from services.consensus.servicer import ConsensusServicer


class ConsensusService(MiradorService):
    name = "consensus"

    def __init__(self, config: MiradorConfig):
        self.servicer = ConsensusServicer(config)

    @property
    def grpc_service_names(self) -> list[str]:
        return [consensus_pb2.DESCRIPTOR.services_by_name["Consensus"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        consensus_pb2_grpc.add_ConsensusServicer_to_server(self.servicer, server)


def main(argv: list[str] | None = None) -> int:
    return run_service_main("consensus", ConsensusService, argv)
