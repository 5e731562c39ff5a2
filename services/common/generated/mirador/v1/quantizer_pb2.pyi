from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class QuantizeRequest(_message.Message):
    __slots__ = ("request_id", "model", "budget_bits_per_weight", "budget_mb", "calibration_path", "block_size", "output_name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BITS_PER_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_PATH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    budget_bits_per_weight: float
    budget_mb: float
    calibration_path: str
    block_size: int
    output_name: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., budget_bits_per_weight: _Optional[float] = ..., budget_mb: _Optional[float] = ..., calibration_path: _Optional[str] = ..., block_size: _Optional[int] = ..., output_name: _Optional[str] = ...) -> None: ...

class QuantizeResponse(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: QuantizeProgress
    report: QuantizeReport
    def __init__(self, progress: _Optional[_Union[QuantizeProgress, _Mapping]] = ..., report: _Optional[_Union[QuantizeReport, _Mapping]] = ...) -> None: ...

class QuantizeProgress(_message.Message):
    __slots__ = ("phase", "step", "total", "layer", "elapsed_s", "remaining_s")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_S_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    total: int
    layer: str
    elapsed_s: float
    remaining_s: float
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., layer: _Optional[str] = ..., elapsed_s: _Optional[float] = ..., remaining_s: _Optional[float] = ...) -> None: ...

class BitSensitivity(_message.Message):
    __slots__ = ("bits", "kl")
    BITS_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    bits: int
    kl: float
    def __init__(self, bits: _Optional[int] = ..., kl: _Optional[float] = ...) -> None: ...

class LayerReport(_message.Message):
    __slots__ = ("name", "shape", "sensitivities", "bits")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITIES_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    sensitivities: _containers.RepeatedCompositeFieldContainer[BitSensitivity]
    bits: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., sensitivities: _Optional[_Iterable[_Union[BitSensitivity, _Mapping]]] = ..., bits: _Optional[int] = ...) -> None: ...

class VariantMetrics(_message.Message):
    __slots__ = ("name", "size_bytes", "perplexity", "kl_vs_fp32", "top1_agreement")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    KL_VS_FP32_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    perplexity: float
    kl_vs_fp32: float
    top1_agreement: float
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., perplexity: _Optional[float] = ..., kl_vs_fp32: _Optional[float] = ..., top1_agreement: _Optional[float] = ...) -> None: ...

class QuantizeReport(_message.Message):
    __slots__ = ("output_model", "output_version", "layers", "variants", "calibration", "report_path", "plot_path")
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    REPORT_PATH_FIELD_NUMBER: _ClassVar[int]
    PLOT_PATH_FIELD_NUMBER: _ClassVar[int]
    output_model: str
    output_version: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerReport]
    variants: _containers.RepeatedCompositeFieldContainer[VariantMetrics]
    calibration: str
    report_path: str
    plot_path: str
    def __init__(self, output_model: _Optional[str] = ..., output_version: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerReport, _Mapping]]] = ..., variants: _Optional[_Iterable[_Union[VariantMetrics, _Mapping]]] = ..., calibration: _Optional[str] = ..., report_path: _Optional[str] = ..., plot_path: _Optional[str] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("request_id", "model", "calibration_path", "bits")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_PATH_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    calibration_path: str
    bits: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., calibration_path: _Optional[str] = ..., bits: _Optional[_Iterable[int]] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("model", "layers", "calibration")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerReport]
    calibration: str
    def __init__(self, model: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerReport, _Mapping]]] = ..., calibration: _Optional[str] = ...) -> None: ...
