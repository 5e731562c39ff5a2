"""Wires the quantizer process."""

from __future__ import annotations

import grpc
from mirador.v1 import quantizer_pb2, quantizer_pb2_grpc

from services.common.config import MiradorConfig
from services.common.server import MiradorService, run_service_main
from services.quantizer.servicer import QuantizerServicer


class QuantizerService(MiradorService):
    name = "quantizer"

    def __init__(self, config: MiradorConfig):
        self.servicer = QuantizerServicer(config)

    @property
    def grpc_service_names(self) -> list[str]:
        return [quantizer_pb2.DESCRIPTOR.services_by_name["Quantizer"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        quantizer_pb2_grpc.add_QuantizerServicer_to_server(self.servicer, server)


def main(argv: list[str] | None = None) -> int:
    return run_service_main("quantizer", QuantizerService, argv)
