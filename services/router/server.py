"""Wires the router process: route table, servicer, channel to the model host."""

from __future__ import annotations

import json

import grpc
import asyncio
import contextlib

import numpy as np
from mirador.v1 import consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc, router_pb2, router_pb2_grpc

from services.common.channels import open_channel
from services.common.config import MiradorConfig, SecurityConfig
from services.common.server import MiradorService, run_service_main
from services.router.fallback import Breakers
from services.router.routing import RouteTable
from services.router.servicer import RouterServicer
from services.router.sessions import SessionStore

EMBED_TIMEOUT_S = 60.0


def model_host_channel(targets: tuple[str, ...], security: SecurityConfig | None = None) -> grpc.aio.Channel:
    """One channel to the model hosts. Several `ip:port` targets (or one `dns:///` name, which
    may resolve to several pods) are balanced per call with gRPC's round_robin policy, which
    sends nothing to a replica whose grpc.health.v1 status for mirador.v1.ModelHost is not SERVING."""
    if len(targets) == 1 and not targets[0].startswith("dns:"):
        return open_channel(security, targets[0], aio=True, service="model_host")
    if len(targets) == 1:
        target = targets[0]
    else:
        scheme = "ipv6" if targets[0].startswith("[") else "ipv4"
        target = f"{scheme}:{','.join(targets)}"
    service = model_host_pb2.DESCRIPTOR.services_by_name["ModelHost"].full_name
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": service},
        # Idempotent calls that found a replica gone are sent again (round_robin picks the next one).
        "methodConfig": [{
            "name": [{"service": service, "method": "ListModels"}],
            "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.01s", "maxBackoff": "0.1s",
                            "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
        }],
    }
    return open_channel(security, target, aio=True, service="model_host",
                        options=[("grpc.service_config", json.dumps(service_config))])


class RouterService(MiradorService):
    name = "router"

    def __init__(self, config: MiradorConfig):
        self.config = config
        self.routes = RouteTable(config, embed_many=self.embed)
        self.servicer = RouterServicer(self.routes, SessionStore(), Breakers())
        self.model_host_channel: grpc.aio.Channel | None = None
        self.consensus_channel: grpc.aio.Channel | None = None
        self.learning: asyncio.Task | None = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        reply = await self.servicer.model_host.Embed(
            model_host_pb2.EmbedRequest(model=self.config.services.router.embedding_model, texts=texts),
            timeout=EMBED_TIMEOUT_S,
        )
        return np.array([e.values for e in reply.embeddings], dtype=np.float32)

    @property
    def grpc_service_names(self) -> list[str]:
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)

    async def on_start(self) -> None:
        self.model_host_channel = model_host_channel(self.config.services.model_host_targets, self.config.security)
        self.servicer.model_host = model_host_pb2_grpc.ModelHostStub(self.model_host_channel)
        self.consensus_channel = open_channel(self.config.security, self.config.services.consensus.address, aio=True,
                                              service="consensus")
        self.servicer.consensus = consensus_pb2_grpc.ConsensusStub(self.consensus_channel)
        # Learning the routes needs the embedding model; it happens in the background
        # so the router answers health checks (and explicit routes) at once.
        self.learning = asyncio.create_task(self.routes.keep_learning(self.config), name="learn routes")

    async def on_stop(self) -> None:
        if self.learning is not None:
            self.learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.learning
        for channel in (self.model_host_channel, self.consensus_channel):
            if channel is not None:
                await channel.close()


def main(argv: list[str] | None = None) -> int:
    return run_service_main("router", RouterService, argv)
