"""`mirador.v1.ModelHost` over gRPC: validates requests, then asks the registry.

Inference (Generate, Score, Embed) and loading arrive with the model-host
milestone; until then those calls are validated and answered UNIMPLEMENTED.
"""

from __future__ import annotations

from mirador.v1 import model_host_pb2 as pb
from mirador.v1 import model_host_pb2_grpc

from services.common.config import MiradorConfig
from services.common.errors import InvalidArgument, Unimplemented
from services.common.validation import (
    require_messages,
    require_model,
    require_options,
    require_sampling,
    require_text,
)
from services.model_host.registry import ModelRegistry

MAX_EMBED_TEXTS = 256
_NOT_YET = "the model host does not run inference yet (it arrives with the model-host milestone)"


class ModelHostServicer(model_host_pb2_grpc.ModelHostServicer):
    def __init__(self, config: MiradorConfig, registry: ModelRegistry):
        self.config = config
        self.registry = registry

    def _require_task(self, model: str, task: str, rpc: str) -> None:
        spec = require_model(self.config, model)
        if spec.task != task:
            raise InvalidArgument(f"{rpc} needs a {task} model; `{model}` is a {spec.task} model")

    async def Generate(self, request: pb.GenerateRequest, context):
        self._require_task(request.model, "text-generation", "Generate")
        require_messages(request.messages, request.prompt)
        require_sampling(request.sampling)
        raise Unimplemented(f"Generate: {_NOT_YET}")
        yield  # an async generator: the answer is a stream

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        self._require_task(request.model, "text-generation", "Score")
        require_messages(request.messages, request.prompt)
        require_options(request.options)
        raise Unimplemented(f"Score: {_NOT_YET}")

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        self._require_task(request.model, "embedding", "Embed")
        if not 1 <= len(request.texts) <= MAX_EMBED_TEXTS:
            raise InvalidArgument(f"{len(request.texts)} texts given; send between 1 and {MAX_EMBED_TEXTS}")
        for i, text in enumerate(request.texts):
            require_text(text, f"texts[{i}]")
        raise Unimplemented(f"Embed: {_NOT_YET}")

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        require_model(self.config, request.model)
        raise Unimplemented(f"LoadModel: {_NOT_YET}")

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.ModelStatus:
        require_model(self.config, request.model)
        raise Unimplemented(f"UnloadModel: {_NOT_YET}")

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        self.registry.refresh()
        budget_mb = self.config.services.model_host.memory_budget_mb
        return pb.ListModelsResponse(
            models=self.registry.statuses(),
            memory_budget_bytes=budget_mb * 1024 * 1024,
            memory_used_bytes=0,
        )
