"""`mirador.v1.ModelHost` over gRPC: validate, convert messages to data-plane
calls and back. The decisions live in the data plane and the registry."""

from __future__ import annotations

import contextlib
import logging

from google.protobuf import timestamp_pb2
from mirador.v1 import common_pb2
from mirador.v1 import model_host_pb2 as pb
from mirador.v1 import model_host_pb2_grpc

from services.common.config import MiradorConfig
from services.common.errors import InvalidArgument
from services.common.logs import log_event
from services.common.validation import (
    require_messages,
    require_model,
    require_options,
    require_sampling,
    require_text,
)
from services.model_host import observability
from services.model_host.admission import Admission, is_hedge, priority_of
from services.model_host.dataplane import Confidence, DataPlane, GenerationSummary, SamplingSettings, Timings, TokenEvent
from services.model_host.registry import ModelRecord, ModelRegistry, State
from services.model_host.run_turns import PROCESS_TURNS

log = logging.getLogger("mirador.model_host")

MAX_EMBED_TEXTS = 256
ROLES = {common_pb2.ROLE_SYSTEM: "system", common_pb2.ROLE_USER: "user", common_pb2.ROLE_ASSISTANT: "assistant"}
FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop_string": common_pb2.FINISH_REASON_STOP_STRING,
    "context_length": common_pb2.FINISH_REASON_CONTEXT_LENGTH,
}
TASKS = {
    "text-generation": pb.MODEL_TASK_TEXT_GENERATION,
    "embedding": pb.MODEL_TASK_EMBEDDING,
    "classification": pb.MODEL_TASK_CLASSIFICATION,
}
TIERS = {"hot": pb.MODEL_TIER_HOT, "warm": pb.MODEL_TIER_WARM, "cold": pb.MODEL_TIER_COLD}
STATES = {
    State.NOT_BUILT: pb.MODEL_STATE_NOT_BUILT,
    State.UNLOADED: pb.MODEL_STATE_UNLOADED,
    State.LOADING: pb.MODEL_STATE_LOADING,
    State.READY: pb.MODEL_STATE_READY,
    State.FAILED: pb.MODEL_STATE_FAILED,
}


# --------------------------------------------------------------------------- conversions


def messages_of(request) -> list[tuple[str, str]]:
    return [(ROLES[m.role], m.content) for m in request.messages]


def sampling_of(params: common_pb2.SamplingParams) -> SamplingSettings:
    return SamplingSettings(
        max_tokens=params.max_tokens or SamplingSettings.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p or 1.0,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        top_logprobs=params.top_logprobs,
    )


def timings_pb(t: Timings) -> common_pb2.Timings:
    return common_pb2.Timings(queue_ms=t.queue_ms, load_ms=t.load_ms, prefill_ms=t.prefill_ms,
                              decode_ms=t.decode_ms, total_ms=t.total_ms, first_token_ms=t.first_token_ms)


def confidence_pb(c: Confidence) -> common_pb2.ConfidenceMetadata:
    return common_pb2.ConfidenceMetadata(
        token_logprobs=c.token_logprobs, mean_logprob=c.mean_logprob, min_logprob=c.min_logprob,
        mean_entropy=c.mean_entropy,
        label_distribution=[common_pb2.LabelProbability(label=l, probability=p, logprob=s) for l, p, s in c.labels],
        calibrated_confidence=c.calibrated, calibration_source=c.source,
    )


def status_pb(record: ModelRecord, load_bytes: int = 0, promoted: bool = False) -> pb.ModelStatus:
    status = pb.ModelStatus(
        name=record.name,
        version=record.manifest.version if record.manifest else "",
        task=TASKS[record.spec.task],
        tier=TIERS[record.spec.tier],
        state=STATES[record.state],
        ready=record.state == State.READY,
        memory_bytes=record.loaded_bytes,
        requests_total=record.requests_total,
        requests_in_flight=record.in_flight,
        execution_provider=record.runtime.execution_provider if record.runtime else "",
        load_ms=record.load_ms,
        detail=record.detail,
        load_bytes=load_bytes,
        pinned=record.pinned,
        promoted=promoted,
    )
    if record.last_used_wall:
        status.last_used.CopyFrom(timestamp_pb2.Timestamp(seconds=int(record.last_used_wall)))
    return status


# --------------------------------------------------------------------------- servicer


class ModelHostServicer(model_host_pb2_grpc.ModelHostServicer):
    def __init__(self, config: MiradorConfig, registry: ModelRegistry, dataplane: DataPlane,
                 admission: Admission | None = None):
        self.config = config
        self.registry = registry
        self.dataplane = dataplane
        # bounded queue per model: calls beyond it are shed with RESOURCE_EXHAUSTED (admission.py)
        # (with runs taking turns, the turns say how busy the cores are: hedges wait while they are saturated)
        busy_share = PROCESS_TURNS.busy_share if config.services.model_host.thread_spinning == "in_turn" else None
        self.admission = admission or Admission(config.services.model_host.max_queue_per_model, busy_share,
                                                observability.hedged)

    def _require_task(self, model: str, task: str | tuple[str, ...], rpc: str) -> None:
        spec = require_model(self.config, model)
        tasks = (task,) if isinstance(task, str) else task
        if spec.task not in tasks:
            raise InvalidArgument(f"{rpc} needs a {' or '.join(tasks)} model; `{model}` is a {spec.task} model")

    async def Generate(self, request: pb.GenerateRequest, context):
        self._require_task(request.model, "text-generation", "Generate")
        require_messages(request.messages, request.prompt)
        require_sampling(request.sampling)
        with self.admission.admit(request.model, priority_of(context), is_hedge(context)):
            events = self.dataplane.generate(request.model, messages_of(request), request.prompt, sampling_of(request.sampling))
            async with contextlib.aclosing(events):  # a cancelled call frees its sequence's slot now
                async for event in events:
                    yield _generate_response(event)

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        self._require_task(request.model, ("text-generation", "classification"), "Score")
        require_messages(request.messages, request.prompt)
        require_options(request.options)
        with self.admission.admit(request.model, priority_of(context)):
            result = await self.dataplane.score(request.model, messages_of(request), request.prompt, list(request.options))
        return pb.ScoreResponse(model=result.model, model_version=result.version, best_option=result.best_option,
                                confidence=confidence_pb(result.confidence), timings=timings_pb(result.timings))

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        self._require_task(request.model, "embedding", "Embed")
        if not 1 <= len(request.texts) <= MAX_EMBED_TEXTS:
            raise InvalidArgument(f"{len(request.texts)} texts given; send between 1 and {MAX_EMBED_TEXTS}")
        for i, text in enumerate(request.texts):
            require_text(text, f"texts[{i}]")
        with self.admission.admit(request.model, priority_of(context)):
            result = await self.dataplane.embed(request.model, list(request.texts))
        return pb.EmbedResponse(
            model=result.model, model_version=result.version, dimension=int(result.vectors.shape[1]),
            embeddings=[pb.Embedding(values=row.tolist()) for row in result.vectors], timings=timings_pb(result.timings),
        )

    async def LoadModel(self, request: pb.LoadModelRequest, context) -> pb.ModelStatus:
        require_model(self.config, request.model)
        record = await self.registry.ensure_loaded(request.model, retry_failed=True)
        return status_pb(record)

    async def UnloadModel(self, request: pb.UnloadModelRequest, context) -> pb.ModelStatus:
        require_model(self.config, request.model)
        return status_pb(await self.registry.unload(request.model))

    def _load_bytes(self, record: ModelRecord) -> int:
        """What loading `record` takes against the budget; 0 when not built, or when its manifest lacks
        the facts a size needs (its load says what is wrong; a listing never fails over it)."""
        if record.manifest is None:
            return 0
        try:
            return self.registry.needed_bytes(record)
        except (KeyError, TypeError, ValueError):
            return 0

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        log_event(log, "list models")  # one line per call: the load-balancing tests count them per replica
        self.registry.refresh()
        promoted = self.registry.promoted()
        return pb.ListModelsResponse(
            models=[status_pb(record, self._load_bytes(record), record.name in promoted)
                    for record in (self.registry.record(name) for name in sorted(self.registry.records))],
            memory_budget_bytes=self.registry.budget_bytes,
            memory_used_bytes=self.registry.used_bytes,
        )


def _generate_response(event: TokenEvent | GenerationSummary) -> pb.GenerateResponse:
    if isinstance(event, GenerationSummary):
        return pb.GenerateResponse(summary=pb.GenerateSummary(
            model=event.model, model_version=event.version, finish_reason=FINISH_REASONS[event.finish_reason],
            text=event.text,
            usage=common_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
            timings=timings_pb(event.timings), confidence=confidence_pb(event.confidence),
        ))
    return pb.GenerateResponse(token=common_pb2.TokenChunk(
        index=event.index, token_id=event.token_id, text=event.text, logprob=event.logprob, entropy=event.entropy,
        top_logprobs=[common_pb2.TokenAlternative(token_id=a.token_id, text=a.text, logprob=a.logprob)
                      for a in event.top_logprobs],
    ))
