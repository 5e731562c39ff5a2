"""`mirador.v1.Consensus` over gRPC: validates, then converts between messages and the
plain values of `fanout` (asking the models), `voting` (the maths) and `escalations`
(the SQLite review queue and counters)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid

from google.protobuf import json_format, timestamp_pb2
from mirador.v1 import common_pb2, consensus_pb2_grpc, model_host_pb2_grpc
from mirador.v1 import consensus_pb2 as pb

from services.common.config import MiradorConfig
from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound
from services.common.faults import CrashPoints
from services.common.validation import require_messages, require_model, require_options, require_sampling
from services.common.decision_prompt import decision_messages
from services.consensus import fanout, voting
from services.consensus.escalations import (
    PENDING,
    RESOLVED,
    AlreadyResolved,
    DecisionTally,
    EscalationRecord,
    EscalationStore,
    InvalidResolution,
    ModelTally,
    UnknownEscalation,
)

MAX_MODELS = 16
MAX_LIST_LIMIT = 1000
DEFAULT_LIST_LIMIT = 50
# Free text: the part of the models' budget kept back for embedding their answers.
EMBED_RESERVE_FRACTION = 0.2
MAX_EMBED_RESERVE_S = 1.0

_STATE_NAMES = {pb.ESCALATION_STATE_PENDING: PENDING, pb.ESCALATION_STATE_RESOLVED: RESOLVED}
_STATE_ENUMS = {v: k for k, v in _STATE_NAMES.items()}
# Where MIRADOR_INJECT_CRASH may kill this service (services/common/faults.py).
CRASH_AFTER_ESCALATION_COMMIT = "after-escalation-commit"
CRASH_POINTS = (CRASH_AFTER_ESCALATION_COMMIT,)


class ConsensusServicer(consensus_pb2_grpc.ConsensusServicer):
    def __init__(self, config: MiradorConfig, store: EscalationStore | None = None,
                 crash_points: CrashPoints | None = None):
        self.config = config
        self.store = store  # opened on start
        self.crash_points = crash_points or CrashPoints("consensus")
        self.model_host: model_host_pb2_grpc.ModelHostStub | None = None  # set on start

    @property
    def embedding_model(self) -> str:
        return self.config.services.consensus.embedding_model

    # ------------------------------------------------------------------ Decide

    async def Decide(self, request: pb.DecideRequest, context):
        self._validate_decide(request)
        if request.request_id:
            stored = await asyncio.to_thread(self.store.find_request, request.route, request.request_id)
            if stored is not None:  # a retry of a request that escalated (its caller may never have heard)
                escalation = _escalation(stored)
                for vote in escalation.votes:
                    yield pb.DecideResponse(vote=vote)
                yield pb.DecideResponse(verdict=escalation.verdict)
                return
        request_id = request.request_id or uuid.uuid4().hex
        models = list(request.models)
        options = list(request.options)
        route = self.config.routes.get(request.route)
        total = fanout.downstream_budget(context.time_remaining(), route.timeout_ms / 1000.0 if route else None)
        budget = total
        if not options:  # keep time back to embed the answers
            budget -= min(MAX_EMBED_RESERVE_S, EMBED_RESERVE_FRACTION * total)
        if budget <= 0:
            raise DeadlineExceeded("the call's deadline leaves no time to ask the models; allow more time")
        embed_deadline = time.monotonic() + total

        if options:
            asked = decision_messages(request.messages, options)

            def call(model: str, timeout_s: float):
                return fanout.score(self.model_host, request_id, model, asked, options, timeout_s)
        else:
            def call(model: str, timeout_s: float):
                return fanout.generate(self.model_host, request_id, model, request.messages, request.sampling,
                                       timeout_s)

        answers: list[fanout.Answer | None] = [None] * len(models)
        async with contextlib.aclosing(fanout.fan_out(models, call, budget)) as answered:  # closing cancels the rest
            async for answer in answered:
                answers[answer.index] = answer
                yield pb.DecideResponse(vote=_vote(answer))

        ballots = [_ballot(a, options) for a in answers]
        if options:
            outcome = voting.label_vote(ballots, options)
        else:
            outcome = await self._medoid(ballots, request_id, embed_deadline)
        escalated = outcome.escalates(request.consensus_threshold)
        verdict = pb.ConsensusVerdict(
            answer=outcome.answer, consistency=outcome.consistency,
            consensus_threshold=request.consensus_threshold,
            combined_distribution=[common_pb2.LabelProbability(label=o, probability=p) for o, p in outcome.combined],
            method=outcome.method, escalated=escalated, primary_overturned=outcome.primary_overturned,
        )
        votes = [_vote(a) for a in answers]
        tally = DecisionTally(
            route=request.route,
            models=[ModelTally(b.model, b.answered, b.primary, g) for b, g in zip(ballots, outcome.agreement)],
            escalated=escalated,
            primary_answered=ballots[0].answered,
            primary_overturned=outcome.primary_overturned,
            no_answer=outcome.answered == 0,
        )
        case = None
        if escalated:
            case = {
                "route": request.route, "request_id": request_id,
                "messages": [_dict(m) for m in request.messages], "options": options,
                "votes": [_dict(v) for v in votes], "verdict": _dict(verdict),
            }
        # Committed (fsync'd) before the verdict leaves: an escalation id a client sees is durable.
        # The thread finishes even if the caller cancels meanwhile, so no decision is half-counted.
        record = await asyncio.to_thread(self.store.record_decision, tally, case)
        if record is not None:
            verdict.escalation_id = record.id
            self.crash_points.reached(CRASH_AFTER_ESCALATION_COMMIT)
        yield pb.DecideResponse(verdict=verdict)

    async def _medoid(self, ballots: list[voting.Ballot], request_id: str, deadline: float) -> voting.Outcome:
        """Embeds the non-empty answers (by `deadline`) and picks the weighted medoid."""
        if not any(b.answered for b in ballots):
            return voting.no_answer(ballots)
        answering = [i for i, b in enumerate(ballots) if b.answered and b.answer.strip()]
        embeddings: list[list[float] | None] = [None] * len(ballots)
        if answering:
            timeout_s = deadline - time.monotonic()
            if timeout_s <= 0:
                return voting.unembedded_vote(ballots, "no time was left to embed them")
            try:
                vectors = await asyncio.wait_for(
                    fanout.embed(self.model_host, request_id, self.embedding_model,
                                 [ballots[i].answer for i in answering], timeout_s), timeout_s)
            except Exception as exc:  # noqa: BLE001 - the decision escalates, saying why
                reason = f"embedding model `{self.embedding_model}` failed ({fanout.describe_error(exc, timeout_s)})"
                return voting.unembedded_vote(ballots, reason)
            for i, vector in zip(answering, vectors):
                embeddings[i] = vector
        return voting.medoid_vote(ballots, embeddings, self.embedding_model)

    def _validate_decide(self, request: pb.DecideRequest) -> None:
        if not 2 <= len(request.models) <= MAX_MODELS:
            raise InvalidArgument(f"{len(request.models)} models given; send the primary and 1 to {MAX_MODELS - 1} validators")
        if len(set(request.models)) != len(request.models):
            raise InvalidArgument("`models` names a model twice; list each model once, primary first")
        for i, model in enumerate(request.models):
            spec = require_model(self.config, model, f"models[{i}]")
            if spec.task not in ("text-generation", "classification"):
                raise InvalidArgument(f"`models[{i}]` is `{model}`, a {spec.task} model; consensus asks "
                                      "text-generation models, and classifiers on label decisions")
            if spec.task == "classification" and not request.options:
                raise InvalidArgument(f"`models[{i}]` is `{model}`, a classifier: it votes only on label decisions; "
                                      "send `options` (some of its labels)")
        require_messages(request.messages, allow_prompt=False)
        if request.options:
            require_options(request.options)
        if not 0.0 < request.consensus_threshold <= 1.0:
            raise InvalidArgument(
                f"`consensus_threshold` is {request.consensus_threshold:g}; send a value in (0, 1], e.g. the route's 0.8"
            )
        require_sampling(request.sampling)
        if not request.options:
            spec = self.config.fleet.get(self.embedding_model)
            if spec is None or spec.task != "embedding":
                what = "is not in the fleet" if spec is None else f"is a {spec.task} model"
                raise FailedPrecondition(
                    f"free-text decisions compare answers with the embedding model `{self.embedding_model}`, which "
                    f"{what}; set services.consensus.embedding_model to an embedding model of the fleet, "
                    "or send `options` for a label decision")

    # ------------------------------------------------------------------ review queue

    async def ListEscalations(self, request: pb.ListEscalationsRequest, context) -> pb.ListEscalationsResponse:
        if request.limit > MAX_LIST_LIMIT:
            raise InvalidArgument(f"`limit` is {request.limit}; ask for at most {MAX_LIST_LIMIT}")
        if request.state not in (pb.ESCALATION_STATE_UNSPECIFIED, *_STATE_NAMES):
            raise InvalidArgument(f"`state` is {request.state}; use ESCALATION_STATE_PENDING, "
                                  "ESCALATION_STATE_RESOLVED or UNSPECIFIED for all")
        records = await asyncio.to_thread(self.store.list, _STATE_NAMES.get(request.state),
                                          request.limit or DEFAULT_LIST_LIMIT)
        return pb.ListEscalationsResponse(escalations=[_escalation(r) for r in records])

    async def GetEscalation(self, request: pb.GetEscalationRequest, context) -> pb.Escalation:
        if not request.id.strip():
            raise InvalidArgument("`id` is empty; send an escalation id from ListEscalations")
        try:
            return _escalation(await asyncio.to_thread(self.store.get, request.id))
        except UnknownEscalation:
            raise NotFound(f"no escalation `{request.id}`; ListEscalations shows the ids") from None

    async def ResolveEscalation(self, request: pb.ResolveEscalationRequest, context) -> pb.Escalation:
        if not request.id.strip():
            raise InvalidArgument("`id` is empty; send an escalation id from ListEscalations")
        if not request.resolution.strip():
            raise InvalidArgument("`resolution` is empty; send the reviewer's answer")
        if not request.reviewer.strip():
            raise InvalidArgument("`reviewer` is empty; say who decides")
        try:
            record = await asyncio.to_thread(self.store.resolve, request.id, request.resolution,
                                             request.reviewer.strip(), request.note)
        except UnknownEscalation:
            raise NotFound(f"no escalation `{request.id}`; ListEscalations shows the ids") from None
        except AlreadyResolved as exc:
            done = exc.record
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(done.resolved_at or 0))
            raise FailedPrecondition(f"escalation `{done.id}` was resolved already by {done.reviewer} at {when} "
                                     f"as {done.resolution!r}; a case is resolved once") from None
        except InvalidResolution as exc:
            raise InvalidArgument(f"resolution {exc.resolution!r} is not one of the case's options: "
                                  f"{', '.join(repr(o) for o in exc.options)}") from None
        return _escalation(record)

    async def GetStats(self, request: pb.GetStatsRequest, context) -> pb.ConsensusStats:
        stats = await asyncio.to_thread(self.store.stats, request.route)
        return pb.ConsensusStats(
            route=stats.route, decisions=stats.decisions, escalations=stats.escalations, resolved=stats.resolved,
            reviewer_overrides=stats.reviewer_overrides, primary_answered=stats.primary_answered,
            primary_overturned=stats.primary_overturned, overturn_rate=stats.overturn_rate,
            no_answer=stats.no_answer,
            models=[pb.ModelStats(model=m.model, asked=m.asked, answered=m.answered, failed=m.failed,
                                  as_primary=m.as_primary, agreement=m.agreement, agreement_rate=m.agreement_rate)
                    for m in stats.models],
            since=_timestamp(stats.since),
        )


# --------------------------------------------------------------------------- conversions


def _vote(answer: fanout.Answer) -> pb.ModelVote:
    vote = pb.ModelVote(model=answer.model, primary=answer.index == 0, error=answer.error,
                        latency_ms=answer.latency_ms)
    if answer.value is not None:
        reply = answer.value
        vote.answer = reply.best_option if hasattr(reply, "best_option") else reply.text
        vote.confidence.CopyFrom(reply.confidence)
        vote.weight = voting.weight_of(voting.Ballot(answer.model, confidence=reply.confidence.calibrated_confidence))
    return vote


def _ballot(answer: fanout.Answer, options: list[str]) -> voting.Ballot:
    if answer.value is None:
        return voting.Ballot(answer.model, primary=answer.index == 0, error=answer.error or "no answer")
    reply = answer.value
    confidence = reply.confidence
    if options:
        # The host's distribution is softmax(log-likelihoods) at T = 1; the vote uses the model's
        # calibrated one (voting.calibrated_distribution: tempered to the calibrated confidence).
        labels = [p.label for p in confidence.label_distribution]
        log_p = [math.log(max(float(p.probability), 1e-45)) for p in confidence.label_distribution]
        calibrated = voting.calibrated_distribution(log_p, confidence.calibrated_confidence)
        return voting.Ballot(
            answer.model, primary=answer.index == 0, answer=reply.best_option,
            confidence=confidence.calibrated_confidence,
            distribution=dict(zip(labels, calibrated)),
        )
    return voting.Ballot(answer.model, primary=answer.index == 0, answer=reply.text,
                         confidence=confidence.calibrated_confidence)


def _dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if seconds:
        stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _escalation(record: EscalationRecord) -> pb.Escalation:
    escalation = pb.Escalation(
        id=record.id, created_at=_timestamp(record.created_at), route=record.route, request_id=record.request_id,
        messages=[json_format.ParseDict(m, common_pb2.ChatMessage()) for m in record.messages],
        options=record.options,
        votes=[json_format.ParseDict(v, pb.ModelVote(), ignore_unknown_fields=True) for v in record.votes],
        verdict=json_format.ParseDict(record.verdict, pb.ConsensusVerdict(), ignore_unknown_fields=True),
        state=_STATE_ENUMS[record.state], resolution=record.resolution, reviewer=record.reviewer, note=record.note,
    )
    if record.resolved_at:
        escalation.resolved_at.CopyFrom(_timestamp(record.resolved_at))
    return escalation
