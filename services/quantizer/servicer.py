"""`mirador.v1.Quantizer` over gRPC. Requests are validated now; the analysis
and the writer arrive with the quantizer milestone and answer UNIMPLEMENTED."""

from __future__ import annotations

from mirador.v1 import quantizer_pb2 as pb
from mirador.v1 import quantizer_pb2_grpc

from services.common.config import MiradorConfig
from services.common.errors import InvalidArgument, Unimplemented
from services.common.validation import require_model

BLOCK_SIZES = (16, 32, 64, 128, 256)
PROBE_BITS = (8, 4, 2)
_NOT_YET = "arrives with the quantizer milestone"


class QuantizerServicer(quantizer_pb2_grpc.QuantizerServicer):
    def __init__(self, config: MiradorConfig):
        self.config = config

    def _require_decoder(self, model: str) -> None:
        spec = require_model(self.config, model)
        if spec.task != "text-generation":
            raise InvalidArgument(f"`{model}` is a {spec.task} model; the quantizer measures decoders (text-generation)")

    async def Quantize(self, request: pb.QuantizeRequest, context):
        self._require_decoder(request.model)
        budget = request.WhichOneof("budget")
        if budget is None:
            raise InvalidArgument("no budget: set `budget_bits_per_weight` (e.g. 4.5) or `budget_mb`")
        if budget == "budget_bits_per_weight" and not 2.0 <= request.budget_bits_per_weight <= 32.0:
            raise InvalidArgument(f"`budget_bits_per_weight` is {request.budget_bits_per_weight:g}; use 2 to 32")
        if budget == "budget_mb" and request.budget_mb <= 0:
            raise InvalidArgument(f"`budget_mb` is {request.budget_mb:g}; give a positive size in MB")
        if request.block_size and request.block_size not in BLOCK_SIZES:
            raise InvalidArgument(f"`block_size` {request.block_size} is not supported; use one of {BLOCK_SIZES}")
        raise Unimplemented(f"Quantize: mixed-precision quantization {_NOT_YET}")
        yield  # an async generator: progress streams, then the report

    async def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        self._require_decoder(request.model)
        bad = sorted(set(request.bits) - set(PROBE_BITS))
        if bad:
            raise InvalidArgument(f"`bits` holds {bad}; probe a subset of {PROBE_BITS}")
        raise Unimplemented(f"Analyze: sensitivity analysis {_NOT_YET}")
