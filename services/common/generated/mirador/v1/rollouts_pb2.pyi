import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RolloutMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_MODE_UNSPECIFIED: _ClassVar[RolloutMode]
    ROLLOUT_MODE_CANARY: _ClassVar[RolloutMode]
    ROLLOUT_MODE_SHADOW: _ClassVar[RolloutMode]

class RolloutState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLLOUT_STATE_UNSPECIFIED: _ClassVar[RolloutState]
    ROLLOUT_STATE_ACTIVE: _ClassVar[RolloutState]
    ROLLOUT_STATE_ROLLED_BACK: _ClassVar[RolloutState]
    ROLLOUT_STATE_PROMOTED: _ClassVar[RolloutState]
ROLLOUT_MODE_UNSPECIFIED: RolloutMode
ROLLOUT_MODE_CANARY: RolloutMode
ROLLOUT_MODE_SHADOW: RolloutMode
ROLLOUT_STATE_UNSPECIFIED: RolloutState
ROLLOUT_STATE_ACTIVE: RolloutState
ROLLOUT_STATE_ROLLED_BACK: RolloutState
ROLLOUT_STATE_PROMOTED: RolloutState

class ListRolloutsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRolloutsResponse(_message.Message):
    __slots__ = ("rollouts",)
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    rollouts: _containers.RepeatedCompositeFieldContainer[Rollout]
    def __init__(self, rollouts: _Optional[_Iterable[_Union[Rollout, _Mapping]]] = ...) -> None: ...

class RolloutActionRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Rollout(_message.Message):
    __slots__ = ("model", "stable_version", "candidate_version", "candidate_model", "mode", "state", "share", "reason", "changed_at", "window")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    model: str
    stable_version: str
    candidate_version: str
    candidate_model: str
    mode: RolloutMode
    state: RolloutState
    share: float
    reason: str
    changed_at: _timestamp_pb2.Timestamp
    window: RolloutWindow
    def __init__(self, model: _Optional[str] = ..., stable_version: _Optional[str] = ..., candidate_version: _Optional[str] = ..., candidate_model: _Optional[str] = ..., mode: _Optional[_Union[RolloutMode, str]] = ..., state: _Optional[_Union[RolloutState, str]] = ..., share: _Optional[float] = ..., reason: _Optional[str] = ..., changed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window: _Optional[_Union[RolloutWindow, _Mapping]] = ...) -> None: ...

class RolloutWindow(_message.Message):
    __slots__ = ("candidate_calls", "candidate_errors", "error_rate", "candidate_p50_ms", "stable_p50_ms", "latency_ratio", "compared", "disagreement", "min_calls", "max_error_rate", "max_latency_ratio", "max_disagreement")
    CANDIDATE_CALLS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_P50_MS_FIELD_NUMBER: _ClassVar[int]
    STABLE_P50_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MIN_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    candidate_calls: int
    candidate_errors: int
    error_rate: float
    candidate_p50_ms: float
    stable_p50_ms: float
    latency_ratio: float
    compared: int
    disagreement: float
    min_calls: int
    max_error_rate: float
    max_latency_ratio: float
    max_disagreement: float
    def __init__(self, candidate_calls: _Optional[int] = ..., candidate_errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., candidate_p50_ms: _Optional[float] = ..., stable_p50_ms: _Optional[float] = ..., latency_ratio: _Optional[float] = ..., compared: _Optional[int] = ..., disagreement: _Optional[float] = ..., min_calls: _Optional[int] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., max_disagreement: _Optional[float] = ...) -> None: ...
