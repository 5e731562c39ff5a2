from mirador.v1 import common_pb2 as _common_pb2
from mirador.v1 import consensus_pb2 as _consensus_pb2
from mirador.v1 import model_host_pb2 as _model_host_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_REASON_UNSPECIFIED: _ClassVar[RouteReason]
    ROUTE_REASON_EXPLICIT: _ClassVar[RouteReason]
    ROUTE_REASON_CLASSIFIED: _ClassVar[RouteReason]
    ROUTE_REASON_LOW_CONFIDENCE: _ClassVar[RouteReason]
ROUTE_REASON_UNSPECIFIED: RouteReason
ROUTE_REASON_EXPLICIT: RouteReason
ROUTE_REASON_CLASSIFIED: RouteReason
ROUTE_REASON_LOW_CONFIDENCE: RouteReason

class AskRequest(_message.Message):
    __slots__ = ("request_id", "text", "route", "session_id", "sampling", "messages", "model", "prompt")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    route: str
    session_id: str
    sampling: _common_pb2.SamplingParams
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    model: str
    prompt: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., route: _Optional[str] = ..., session_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ...) -> None: ...

class AskResponse(_message.Message):
    __slots__ = ("route", "token", "vote", "verdict", "summary")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VOTE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    route: RouteDecision
    token: _common_pb2.TokenChunk
    vote: _consensus_pb2.ModelVote
    verdict: _consensus_pb2.ConsensusVerdict
    summary: AskSummary
    def __init__(self, route: _Optional[_Union[RouteDecision, _Mapping]] = ..., token: _Optional[_Union[_common_pb2.TokenChunk, _Mapping]] = ..., vote: _Optional[_Union[_consensus_pb2.ModelVote, _Mapping]] = ..., verdict: _Optional[_Union[_consensus_pb2.ConsensusVerdict, _Mapping]] = ..., summary: _Optional[_Union[AskSummary, _Mapping]] = ...) -> None: ...

class AskSummary(_message.Message):
    __slots__ = ("route", "model", "fell_back", "attempted_models", "finish_reason", "text", "usage", "timings", "confidence", "escalation_id", "session_id", "session_warning")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FELL_BACK_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTED_MODELS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ESCALATION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_WARNING_FIELD_NUMBER: _ClassVar[int]
    route: str
    model: str
    fell_back: bool
    attempted_models: _containers.RepeatedScalarFieldContainer[str]
    finish_reason: _common_pb2.FinishReason
    text: str
    usage: _common_pb2.Usage
    timings: _common_pb2.Timings
    confidence: _common_pb2.ConfidenceMetadata
    escalation_id: str
    session_id: str
    session_warning: str
    def __init__(self, route: _Optional[str] = ..., model: _Optional[str] = ..., fell_back: _Optional[bool] = ..., attempted_models: _Optional[_Iterable[str]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., text: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., confidence: _Optional[_Union[_common_pb2.ConfidenceMetadata, _Mapping]] = ..., escalation_id: _Optional[str] = ..., session_id: _Optional[str] = ..., session_warning: _Optional[str] = ...) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "text", "route")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    route: str
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., route: _Optional[str] = ...) -> None: ...

class RouteScore(_message.Message):
    __slots__ = ("route", "score")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    route: str
    score: float
    def __init__(self, route: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RouteDecision(_message.Message):
    __slots__ = ("route", "model", "fallbacks", "validators", "consensus_threshold", "timeout_ms", "confidence", "scores", "reason")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    VALIDATORS_FIELD_NUMBER: _ClassVar[int]
    CONSENSUS_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    route: str
    model: str
    fallbacks: _containers.RepeatedScalarFieldContainer[str]
    validators: _containers.RepeatedScalarFieldContainer[str]
    consensus_threshold: float
    timeout_ms: int
    confidence: float
    scores: _containers.RepeatedCompositeFieldContainer[RouteScore]
    reason: RouteReason
    def __init__(self, route: _Optional[str] = ..., model: _Optional[str] = ..., fallbacks: _Optional[_Iterable[str]] = ..., validators: _Optional[_Iterable[str]] = ..., consensus_threshold: _Optional[float] = ..., timeout_ms: _Optional[int] = ..., confidence: _Optional[float] = ..., scores: _Optional[_Iterable[_Union[RouteScore, _Mapping]]] = ..., reason: _Optional[_Union[RouteReason, str]] = ...) -> None: ...
