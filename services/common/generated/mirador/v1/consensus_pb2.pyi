import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mirador.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EscalationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ESCALATION_STATE_UNSPECIFIED: _ClassVar[EscalationState]
    ESCALATION_STATE_PENDING: _ClassVar[EscalationState]
    ESCALATION_STATE_RESOLVED: _ClassVar[EscalationState]
ESCALATION_STATE_UNSPECIFIED: EscalationState
ESCALATION_STATE_PENDING: EscalationState
ESCALATION_STATE_RESOLVED: EscalationState

class DecideRequest(_message.Message):
    __slots__ = ("request_id", "route", "models", "messages", "options", "consensus_threshold", "sampling")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    route: str
    models: _containers.RepeatedScalarFieldContainer[str]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    options: _containers.RepeatedScalarFieldContainer[str]
    consensus_threshold: float
    sampling: _common_pb2.SamplingParams
    def __init__(self, request_id: _Optional[str] = ..., route: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., options: _Optional[_Iterable[str]] = ..., consensus_threshold: _Optional[float] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("vote", "verdict")
    VOTE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    vote: ModelVote
    verdict: ConsensusVerdict
    def __init__(self, vote: _Optional[_Union[ModelVote, _Mapping]] = ..., verdict: _Optional[_Union[ConsensusVerdict, _Mapping]] = ...) -> None: ...

class ModelVote(_message.Message):
    __slots__ = ("model", "primary", "answer", "confidence", "weight", "error", "latency_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    primary: bool
    answer: str
    confidence: _common_pb2.ConfidenceMetadata
    weight: float
    error: str
    latency_ms: float
    def __init__(self, model: _Optional[str] = ..., primary: _Optional[bool] = ..., answer: _Optional[str] = ..., confidence: _Optional[_Union[_common_pb2.ConfidenceMetadata, _Mapping]] = ..., weight: _Optional[float] = ..., error: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class ConsensusVerdict(_message.Message):
    __slots__ = ("answer", "consistency", "consensus_threshold", "combined_distribution", "method", "escalated", "escalation_id", "primary_overturned")
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COMBINED_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ESCALATED_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_OVERTURNED_FIELD_NUMBER: _ClassVar[int]
    answer: str
    consistency: float
    consensus_threshold: float
    combined_distribution: _containers.RepeatedCompositeFieldContainer[_common_pb2.LabelProbability]
    method: str
    escalated: bool
    escalation_id: str
    primary_overturned: bool
    def __init__(self, answer: _Optional[str] = ..., consistency: _Optional[float] = ..., consensus_threshold: _Optional[float] = ..., combined_distribution: _Optional[_Iterable[_Union[_common_pb2.LabelProbability, _Mapping]]] = ..., method: _Optional[str] = ..., escalated: _Optional[bool] = ..., escalation_id: _Optional[str] = ..., primary_overturned: _Optional[bool] = ...) -> None: ...

class Escalation(_message.Message):
    __slots__ = ("id", "created_at", "route", "request_id", "messages", "options", "votes", "verdict", "state", "resolution", "reviewer", "note", "resolved_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    created_at: _timestamp_pb2.Timestamp
    route: str
    request_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    options: _containers.RepeatedScalarFieldContainer[str]
    votes: _containers.RepeatedCompositeFieldContainer[ModelVote]
    verdict: ConsensusVerdict
    state: EscalationState
    resolution: str
    reviewer: str
    note: str
    resolved_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., route: _Optional[str] = ..., request_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., options: _Optional[_Iterable[str]] = ..., votes: _Optional[_Iterable[_Union[ModelVote, _Mapping]]] = ..., verdict: _Optional[_Union[ConsensusVerdict, _Mapping]] = ..., state: _Optional[_Union[EscalationState, str]] = ..., resolution: _Optional[str] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ..., resolved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEscalationsRequest(_message.Message):
    __slots__ = ("state", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: EscalationState
    limit: int
    def __init__(self, state: _Optional[_Union[EscalationState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEscalationsResponse(_message.Message):
    __slots__ = ("escalations",)
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    escalations: _containers.RepeatedCompositeFieldContainer[Escalation]
    def __init__(self, escalations: _Optional[_Iterable[_Union[Escalation, _Mapping]]] = ...) -> None: ...

class GetEscalationRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ResolveEscalationRequest(_message.Message):
    __slots__ = ("id", "resolution", "reviewer", "note")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    id: str
    resolution: str
    reviewer: str
    note: str
    def __init__(self, id: _Optional[str] = ..., resolution: _Optional[str] = ..., reviewer: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: str
    def __init__(self, route: _Optional[str] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("model", "asked", "answered", "failed", "as_primary", "agreement", "agreement_rate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ASKED_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    AS_PRIMARY_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_RATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    asked: int
    answered: int
    failed: int
    as_primary: int
    agreement: float
    agreement_rate: float
    def __init__(self, model: _Optional[str] = ..., asked: _Optional[int] = ..., answered: _Optional[int] = ..., failed: _Optional[int] = ..., as_primary: _Optional[int] = ..., agreement: _Optional[float] = ..., agreement_rate: _Optional[float] = ...) -> None: ...

class ConsensusStats(_message.Message):
    __slots__ = ("route", "decisions", "escalations", "resolved", "reviewer_overrides", "primary_answered", "primary_overturned", "overturn_rate", "no_answer", "models", "since")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    ESCALATIONS_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_OVERTURNED_FIELD_NUMBER: _ClassVar[int]
    OVERTURN_RATE_FIELD_NUMBER: _ClassVar[int]
    NO_ANSWER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    route: str
    decisions: int
    escalations: int
    resolved: int
    reviewer_overrides: int
    primary_answered: int
    primary_overturned: int
    overturn_rate: float
    no_answer: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStats]
    since: _timestamp_pb2.Timestamp
    def __init__(self, route: _Optional[str] = ..., decisions: _Optional[int] = ..., escalations: _Optional[int] = ..., resolved: _Optional[int] = ..., reviewer_overrides: _Optional[int] = ..., primary_answered: _Optional[int] = ..., primary_overturned: _Optional[int] = ..., overturn_rate: _Optional[float] = ..., no_answer: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStats, _Mapping]]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
