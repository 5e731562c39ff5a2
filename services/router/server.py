"""Wires the router process: route table, servicer, channel to the model host."""

from __future__ import annotations


import grpc
import asyncio
import contextlib
import logging
from functools import partial

import numpy as np
from mirador.v1 import consensus_pb2_grpc, model_host_pb2, model_host_pb2_grpc, rollouts_pb2, rollouts_pb2_grpc
from mirador.v1 import router_pb2, router_pb2_grpc

from services.common.channels import model_host_channel, open_channel
from services.common.config import MiradorConfig
from services.common.logs import log_event
from services.common.server import MiradorService, run_service_main
from services.router.fallback import Breakers
from services.common.placement import ModelHosts, uses_placement
from services.router.identity import CallerIdentity
from services.router.rate_limit import RateLimiter, RedisRateLimiter
from services.router.redis_link import RedisLink
from services.router.rollout_control import RolloutControlServicer
from services.router.rollout_windows import SharedWindows
from services.router.rollouts import Rollouts
from services.router.routing import RouteTable, classified_routes
from services.router.servicer import RouterServicer
from services.router.sessions import RedisSessionStore, SessionStore

EMBED_TIMEOUT_S = 60.0
log = logging.getLogger("mirador.router")


class SessionWarningRouterServicer(RouterServicer):
    """The router's servicer, whose Ask summary also says when the session's history could not
    be read (`AskSummary.session_warning`; Redis unavailable). Kept out of the Ask path itself:
    `sessions.warning()` reads what `history()` noted in this call's context."""

    async def Ask(self, request: router_pb2.AskRequest, context):
        async with contextlib.aclosing(super().Ask(request, context)) as responses:
            async for response in responses:
                if request.session_id and response.HasField("summary"):
                    response.summary.session_warning = self.sessions.warning()
                yield response


class RouterService(MiradorService):
    name = "router"

    def __init__(self, config: MiradorConfig):
        self.config = config
        self.routes = self._route_table(config)
        self.rollouts = Rollouts.from_config(config)
        self.redis = RedisLink(config.state) if config.state.uses_redis else None
        if self.redis is not None:  # every router replica judges the same rollout windows
            self.rollouts.share_windows(SharedWindows(self.redis))
        self.servicer = SessionWarningRouterServicer(self.routes, self._sessions(), Breakers(), self.rollouts)
        self.servicer.rate_limiter = self._rate_limiter(config)
        # with a bearer token, callers are known by it; without one, by their address (identity.py)
        self.servicer.identify = CallerIdentity(config.security.bearer_token)
        self.servicer.fleet = config.fleet
        self.model_host_channel: grpc.aio.Channel | None = None
        self.model_hosts: ModelHosts | None = None  # with placement: every host, and what each holds
        self.consensus_channel: grpc.aio.Channel | None = None
        self.learning: asyncio.Task | None = None
        self.relearning: asyncio.Task | None = None  # a reloaded config's routes, learned before they serve
        self.rollout_sync: asyncio.Task | None = None  # adopts other replicas' rollout decisions (shared state)

    def _sessions(self) -> SessionStore:
        if self.redis is None:
            return SessionStore()
        log_event(log, "sessions in redis", url=self.redis.url, prefix=self.redis.prefix)
        return RedisSessionStore(self.redis)

    def _rate_limiter(self, config: MiradorConfig) -> RateLimiter:
        settings = config.services.router
        if self.redis is None:
            return RateLimiter.from_settings(settings)
        return RedisRateLimiter(self.redis, settings.rate_limit_per_client, settings.rate_limit_burst,
                                fail_open=config.state.rate_limit_without_redis == "open")

    def _route_table(self, config: MiradorConfig) -> RouteTable:
        # each table embeds with the embedding and feature models of its own config
        settings = config.services.router
        return RouteTable(config, embed_many=partial(self.embed_with, (settings.embedding_model, *settings.feature_models)))

    async def embed_with(self, models: tuple[str, ...], texts: list[str], timeout_s: float | None = None) -> list[np.ndarray]:
        """The texts' vectors from each of `models`, asked at once."""
        return list(await asyncio.gather(*(self.embed(texts, model, timeout_s) for model in models)))

    async def embed(self, texts: list[str], model: str | None = None, timeout_s: float | None = None) -> np.ndarray:
        """Embeds with the router's embedding model; `timeout_s` (what the caller has left) caps
        EMBED_TIMEOUT_S, which only bounds learning the routes."""
        reply = await self.servicer.model_host.Embed(
            model_host_pb2.EmbedRequest(model=model or self.config.services.router.embedding_model, texts=texts),
            timeout=EMBED_TIMEOUT_S if timeout_s is None else min(timeout_s, EMBED_TIMEOUT_S),
        )
        return np.array([e.values for e in reply.embeddings], dtype=np.float32)

    @property
    def grpc_service_names(self) -> list[str]:
        return [router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,
                rollouts_pb2.DESCRIPTOR.services_by_name["Rollouts"].full_name]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)
        rollouts_pb2_grpc.add_RolloutsServicer_to_server(RolloutControlServicer(self.rollouts), server)

    async def on_start(self) -> None:
        if uses_placement(self.config):
            self.model_hosts = ModelHosts(self.config.services.model_host_targets, self.config.fleet, self.config.security)
            await self.model_hosts.start()
            self.servicer.model_host = self.model_hosts
            log_event(log, "models placed across model hosts", hosts=self.model_hosts.describe())
        else:
            self.model_host_channel = model_host_channel(self.config.services.model_host_targets, self.config.security)
            self.servicer.model_host = model_host_pb2_grpc.ModelHostStub(self.model_host_channel)
        self.consensus_channel = open_channel(self.config.security, self.config.services.consensus.client_target, aio=True,
                                              service="consensus")
        self.servicer.consensus = consensus_pb2_grpc.ConsensusStub(self.consensus_channel)
        # Learning the routes needs the embedding model; it happens in the background
        # so the router answers health checks (and explicit routes) at once.
        self.learning = asyncio.create_task(self.routes.keep_learning(self.config), name="learn routes")
        if self.rollouts.shared:
            self.rollout_sync = asyncio.create_task(self._adopt_rollout_decisions(), name="adopt rollout decisions")

    async def _adopt_rollout_decisions(self) -> None:
        """Every REFRESH_S: the rollback or promotion another router replica saved holds here too."""
        from services.router.rollout_store_pg import REFRESH_S

        while True:
            await asyncio.sleep(REFRESH_S)
            if self.rollouts.by_model:
                saved = await asyncio.to_thread(self.rollouts.state_file.load)  # logs, and is {}, when it cannot
                self.rollouts.adopt(saved)

    async def on_config_reload(self, new_config: MiradorConfig) -> None:
        """Applies routes, fallbacks, thresholds, the default route and rate limits. Routes whose
        examples changed are learned again first; the old table serves until then."""
        old = self.config
        restart = [key for key, before, after in (
            ("services.router.model_host_targets", old.services.model_host_targets, new_config.services.model_host_targets),
            ("services.router.model_host_balancing", old.services.router.model_host_balancing,
             new_config.services.router.model_host_balancing),
            ("services.consensus address", old.services.consensus.client_target, new_config.services.consensus.client_target),
        ) if before != after]
        if restart:
            log_event(log, "config reload: restart the router to apply these changes", logging.WARNING, keys=restart)
        settings = new_config.services.router
        self.servicer.rate_limiter.configure(settings.rate_limit_per_client, settings.rate_limit_burst)
        self.rollouts.configure(new_config)  # unchanged rollouts keep their window and state
        table = self._route_table(new_config)
        if self.relearning is not None:  # an earlier reload still learning: this one supersedes it
            self.relearning.cancel()
            self.relearning = None
        current = self.routes
        same_examples = (_examples(old) == _examples(new_config)
                         and old.services.router.embedding_model == settings.embedding_model
                         and old.services.router.feature_models == settings.feature_models)
        if same_examples and current.classifier is not None:
            table.classifier = current.classifier
            table.learned.set()
        elif current.classifier is not None and table.classifiable:
            log_event(log, "config reload: route examples changed, learning them before the new routes serve")
            self.relearning = asyncio.create_task(self._learn_then_swap(new_config, table), name="relearn routes")
            return
        self._swap(new_config, table)
        if not table.learned.is_set():
            await self._stop_learning()
            self.learning = asyncio.create_task(table.keep_learning(new_config), name="learn routes")

    async def _learn_then_swap(self, config: MiradorConfig, table: RouteTable) -> None:
        await table.keep_learning(config)
        await self._stop_learning()
        self._swap(config, table)

    def _swap(self, config: MiradorConfig, table: RouteTable) -> None:
        self.config, self.routes, self.servicer.routes = config, table, table
        self.servicer.fleet = config.fleet
        if self.model_hosts is not None:
            self.model_hosts.fleet = config.fleet
        log_event(log, "routes applied", routes=list(table.routes), default_route=table.default_route,
                  min_confidence=table.min_confidence, classifier=table.classifier.routes if table.classifier else None,
                  rate_limit_per_client=config.services.router.rate_limit_per_client)

    async def _stop_learning(self) -> None:
        for task in (self.learning,):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.learning = None

    async def on_stop(self) -> None:
        await self.servicer.stop_mirrors()
        if self.relearning is not None:
            self.relearning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relearning
        if self.learning is not None:
            self.learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.learning
        for channel in (self.model_host_channel, self.consensus_channel):
            if channel is not None:
                await channel.close()
        if self.model_hosts is not None:
            await self.model_hosts.close()
        if self.redis is not None:
            self.redis.close()
        if self.rollout_sync is not None:
            self.rollout_sync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.rollout_sync
        if self.rollouts.shared:
            self.rollouts.state_file.close()


def _examples(config: MiradorConfig) -> dict[str, tuple[str, ...]]:
    return {name: route.examples for name, route in classified_routes(config).items()}


def main(argv: list[str] | None = None) -> int:
    return run_service_main("router", RouterService, argv)
