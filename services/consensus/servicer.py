"""`mirador.v1.Consensus` over gRPC. Requests are validated now; voting and the
review queue arrive with the consensus milestone and answer UNIMPLEMENTED."""

from __future__ import annotations

from mirador.v1 import consensus_pb2 as pb
from mirador.v1 import consensus_pb2_grpc

from services.common.config import MiradorConfig
from services.common.errors import InvalidArgument, Unimplemented
from services.common.validation import require_messages, require_model, require_options, require_sampling

MAX_MODELS = 16
MAX_LIST_LIMIT = 1000
_NOT_YET = "arrives with the consensus milestone"


class ConsensusServicer(consensus_pb2_grpc.ConsensusServicer):
    def __init__(self, config: MiradorConfig):
        self.config = config

    async def Decide(self, request: pb.DecideRequest, context):
        if not 2 <= len(request.models) <= MAX_MODELS:
            raise InvalidArgument(f"{len(request.models)} models given; send the primary and 1 to {MAX_MODELS - 1} validators")
        if len(set(request.models)) != len(request.models):
            raise InvalidArgument("`models` names a model twice; list each model once, primary first")
        for i, model in enumerate(request.models):
            require_model(self.config, model, f"models[{i}]")
        require_messages(request.messages, allow_prompt=False)
        if request.options:
            require_options(request.options)
        if not 0.0 < request.consensus_threshold <= 1.0:
            raise InvalidArgument(
                f"`consensus_threshold` is {request.consensus_threshold:g}; send a value in (0, 1], e.g. the route's 0.8"
            )
        require_sampling(request.sampling)
        raise Unimplemented(f"Decide: voting {_NOT_YET}")
        yield  # an async generator: votes stream as they arrive

    async def ListEscalations(self, request: pb.ListEscalationsRequest, context) -> pb.ListEscalationsResponse:
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"`limit` is {request.limit}; ask for at most {MAX_LIST_LIMIT}")
        raise Unimplemented(f"ListEscalations: the review queue {_NOT_YET}")

    async def GetEscalation(self, request: pb.GetEscalationRequest, context) -> pb.Escalation:
        if not request.id.strip():
            raise InvalidArgument("`id` is empty; send an escalation id from ListEscalations")
        raise Unimplemented(f"GetEscalation: the review queue {_NOT_YET}")

    async def ResolveEscalation(self, request: pb.ResolveEscalationRequest, context) -> pb.Escalation:
        if not request.id.strip():
            raise InvalidArgument("`id` is empty; send an escalation id from ListEscalations")
        if not request.resolution.strip():
            raise InvalidArgument("`resolution` is empty; send the reviewer's answer")
        if not request.reviewer.strip():
            raise InvalidArgument("`reviewer` is empty; say who decides")
        raise Unimplemented(f"ResolveEscalation: the review queue {_NOT_YET}")
