"""Turns a request into a RouteDecision from the route table.

An explicit route always wins. Classifying a request from the routes' examples
arrives with the router milestone; until then an unnamed route is UNIMPLEMENTED
rather than a guess.
"""

from __future__ import annotations

from mirador.v1 import router_pb2 as pb

from services.common.config import MiradorConfig, RouteSpec
from services.common.errors import NotFound, Unimplemented


class RouteTable:
    def __init__(self, config: MiradorConfig):
        self.routes = config.routes

    def get(self, name: str) -> RouteSpec:
        try:
            return self.routes[name]
        except KeyError:
            raise NotFound(f"route `{name}` does not exist; known routes: {', '.join(self.routes)}") from None

    def decide(self, text: str, explicit_route: str = "") -> pb.RouteDecision:
        if not explicit_route:
            raise Unimplemented(
                "the router cannot classify requests yet (it arrives with the router milestone); "
                f"name a route in `route`: {', '.join(self.routes)}"
            )
        route = self.get(explicit_route)
        return pb.RouteDecision(
            route=route.name,
            model=route.primary,
            fallbacks=list(route.fallback),
            validators=list(route.validators),
            consensus_threshold=route.consensus_threshold or 0.0,
            timeout_ms=route.timeout_ms,
            confidence=1.0,
            reason=pb.ROUTE_REASON_EXPLICIT,
        )
