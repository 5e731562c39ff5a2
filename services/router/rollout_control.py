"""`mirador.v1.Rollouts` over gRPC, served by the router process: list rollouts,
promote or roll back one (an operator's decision, kept across restarts)."""

from __future__ import annotations

from mirador.v1 import rollouts_pb2, rollouts_pb2_grpc

from services.common.validation import require_text
from services.router.rollouts import MAX_REASON_CHARS, Rollouts


class RolloutControlServicer(rollouts_pb2_grpc.RolloutsServicer):
    def __init__(self, rollouts: Rollouts):
        self.rollouts = rollouts

    async def ListRollouts(self, request, context) -> rollouts_pb2.ListRolloutsResponse:
        return rollouts_pb2.ListRolloutsResponse(rollouts=[r.describe() for _, r in sorted(self.rollouts.by_model.items())])

    async def Promote(self, request: rollouts_pb2.RolloutActionRequest, context) -> rollouts_pb2.Rollout:
        return self.rollouts.promote(*self._target(request)).describe()

    async def Rollback(self, request: rollouts_pb2.RolloutActionRequest, context) -> rollouts_pb2.Rollout:
        return self.rollouts.rollback(*self._target(request)).describe()

    @staticmethod
    def _target(request: rollouts_pb2.RolloutActionRequest) -> tuple[str, str]:
        require_text(request.model, "model")
        if request.reason:
            require_text(request.reason, "reason", max_bytes=MAX_REASON_CHARS)
        return request.model, request.reason
