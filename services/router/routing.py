"""Turns a request into a RouteDecision: an explicit route wins; otherwise the
classifier scores every route that has examples, and a request it is unsure of
(below `min_confidence`) goes to the default route rather than to a guess."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

import grpc
import numpy as np
from mirador.v1 import router_pb2 as pb

from services.common.config import MiradorConfig, RouteSpec
from services.common.errors import DeadlineExceeded, FailedPrecondition, NotFound, ServiceError, Unavailable
from services.common.logs import log_event
from services.router.classifier import RouteClassifier

log = logging.getLogger("mirador.router.routing")

# (texts, timeout_s=None) -> per model (the embedding model, then each feature model) one vector per text
EmbedMany = Callable[..., Awaitable[list[np.ndarray]]]
EMBED_BATCH = 16
# Of the time the caller has left, the share classification may take: the router then answers with
# its own reason before the caller's deadline passes, and the rest is the model's.
CLASSIFY_SHARE = 0.8


def classified_routes(config: MiradorConfig) -> dict[str, RouteSpec]:
    """Routes the classifier chooses between: those with examples, except the default route."""
    default = config.services.router.default_route
    return {name: route for name, route in config.routes.items() if route.examples and name != default}


async def learn_routes(config: MiradorConfig, embed_many: EmbedMany) -> RouteClassifier:
    texts, labels = [], []
    for name, route in classified_routes(config).items():
        texts += route.examples
        labels += [name] * len(route.examples)
    batches = [await embed_many(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
    per_model = [np.concatenate(vectors) for vectors in zip(*batches)]
    widths = [vectors.shape[1] for vectors in per_model]
    # One model: its embedding and the lexical terms; several: their vectors alone (classifier.py).
    # Off the event loop: fitting takes a few seconds on 2 cores, and the old table serves meanwhile.
    return await asyncio.to_thread(RouteClassifier.train, np.hstack(per_model), labels,
                                   texts if len(per_model) == 1 else None, widths=widths if len(widths) > 1 else ())


class RouteTable:
    def __init__(self, config: MiradorConfig, embed_many: EmbedMany | None = None):
        self.routes = config.routes
        self.default_route = config.services.router.default_route
        self.min_confidence = config.services.router.min_confidence
        self.embed_many = embed_many
        self.classifier: RouteClassifier | None = None
        self.learned = asyncio.Event()
        self.classifiable = len(classified_routes(config)) >= 2

    def get(self, name: str) -> RouteSpec:
        try:
            return self.routes[name]
        except KeyError:
            raise NotFound(f"route `{name}` does not exist; known routes: {', '.join(self.routes)}") from None

    async def keep_learning(self, config: MiradorConfig, retry_s: float = 0.5) -> None:
        """Learns the routes from their examples, retrying until the embedding model answers."""
        if not self.classifiable:
            log_event(log, "no classification: fewer than two routes have examples")
            return
        while self.classifier is None:
            try:
                self.classifier = await learn_routes(config, self.embed_many)
            except Exception as exc:  # noqa: BLE001 - the model host may still be starting
                log_event(log, "learning routes failed, retrying", logging.WARNING, error=str(exc)[:300])
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 5.0)
        self.learned.set()
        log_event(log, "routes learned", routes=self.classifier.routes, features=self.classifier.features,
                  cv_accuracy=round(self.classifier.cv_accuracy, 4),
                  temperature=round(self.classifier.temperature, 3))

    def _decision(self, route: RouteSpec, reason: int, confidence: float, scores: dict[str, float]) -> pb.RouteDecision:
        ranked = sorted(scores.items(), key=lambda item: -item[1])
        return pb.RouteDecision(
            route=route.name, model=route.primary, fallbacks=list(route.fallback), validators=list(route.validators),
            consensus_threshold=route.consensus_threshold or 0.0, timeout_ms=route.timeout_ms, confidence=confidence,
            scores=[pb.RouteScore(route=name, score=score) for name, score in ranked], reason=reason,
        )

    async def decide(self, text: str, explicit_route: str = "", timeout_s: float | None = None) -> pb.RouteDecision:
        if explicit_route:
            return self._decision(self.get(explicit_route), pb.ROUTE_REASON_EXPLICIT, 1.0, {})
        if not self.classifiable or self.embed_many is None:
            raise FailedPrecondition(
                "this router cannot classify requests: fewer than two routes have `examples:` in the config; "
                f"name a route in `route` ({', '.join(self.routes)}) or add examples"
            )
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s * CLASSIFY_SHARE
        if not self.learned.is_set():
            try:
                # answer before the caller's own deadline does, with a reason
                await asyncio.wait_for(self.learned.wait(), None if deadline is None else deadline - loop.time())
            except asyncio.TimeoutError:
                raise Unavailable("the router is still learning its routes (the embedding model is not reachable yet); "
                                  f"retry shortly or name a route: {', '.join(self.routes)}") from None
        left = None if deadline is None else deadline - loop.time()
        if left is not None and left <= 0:
            raise DeadlineExceeded("no time was left to classify the request; allow more time or name a route")
        try:
            vector = np.concatenate([vectors[0] for vectors in await self.embed_many([text], timeout_s=left)])
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and left is not None:
                raise DeadlineExceeded(f"classifying the request took longer than the {left * 1000:.0f} ms the caller's "
                                       "deadline left for it (the embedding model answered too slowly); allow more time "
                                       "or name a route") from None
            raise ServiceError(f"classifying the request: the embedding models on the model host: {exc.details()}",
                               exc.code()) from None
        scores = self.classifier.scores(vector, text)
        best = max(scores, key=scores.get)
        if scores[best] >= self.min_confidence or not self.default_route:
            return self._decision(self.routes[best], pb.ROUTE_REASON_CLASSIFIED, scores[best], scores)
        return self._decision(self.routes[self.default_route], pb.ROUTE_REASON_LOW_CONFIDENCE, scores[best], scores)
