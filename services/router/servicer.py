"""`mirador.v1.Router` over gRPC: validate, route, relay the model host's stream."""

from __future__ import annotations

import uuid

import grpc

from mirador.v1 import common_pb2, model_host_pb2, router_pb2
from mirador.v1 import model_host_pb2_grpc, router_pb2_grpc

from services.common.errors import DeadlineExceeded, ServiceError, Unimplemented
from services.common.validation import require_sampling, require_text
from services.router.routing import RouteTable


def downstream_timeout_s(context, route_timeout_ms: int) -> float:
    """The route's budget, or less if the caller's deadline is nearer."""
    budget = route_timeout_ms / 1000.0
    remaining = context.time_remaining()
    if remaining is not None:
        budget = min(budget, remaining)
    if budget <= 0:
        raise DeadlineExceeded("the call's deadline passed before a model could be asked; allow more time")
    return budget


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, routes: RouteTable):
        self.routes = routes
        self.model_host: model_host_pb2_grpc.ModelHostStub | None = None  # set on start

    async def Route(self, request: router_pb2.RouteRequest, context) -> router_pb2.RouteDecision:
        require_text(request.text, "text")
        return self.routes.decide(request.text, request.route)

    async def Ask(self, request: router_pb2.AskRequest, context):
        require_text(request.text, "text")
        require_sampling(request.sampling)
        request_id = request.request_id or uuid.uuid4().hex
        decision = self.routes.decide(request.text, request.route)
        if decision.validators:
            raise Unimplemented(f"route `{decision.route}` asks for consensus, which arrives with the consensus milestone")
        if request.session_id:
            raise Unimplemented("sessions arrive with the router milestone; send the request without `session_id`")
        yield router_pb2.AskResponse(route=decision)

        generate = model_host_pb2.GenerateRequest(
            request_id=request_id,
            model=decision.model,
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=request.text)],
            sampling=request.sampling,
        )
        stream = self.model_host.Generate(generate, timeout=downstream_timeout_s(context, decision.timeout_ms))
        try:
            async for response in self._relay(stream, decision):
                yield response
        except grpc.aio.AioRpcError as exc:
            raise ServiceError(f"model `{decision.model}` on the model host: {exc.details()}", exc.code()) from None

    async def _relay(self, stream, decision: router_pb2.RouteDecision):
        async for chunk in stream:
            if chunk.HasField("token"):
                yield router_pb2.AskResponse(token=chunk.token)
            else:
                s = chunk.summary
                yield router_pb2.AskResponse(
                    summary=router_pb2.AskSummary(
                        route=decision.route,
                        model=s.model,
                        attempted_models=[decision.model],
                        finish_reason=s.finish_reason,
                        text=s.text,
                        usage=s.usage,
                        timings=s.timings,
                        confidence=s.confidence,
                    )
                )
