"""Errors of the HTTP gateway in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`
with the matching HTTP status, so an OpenAI SDK raises its own exception class for each
(BadRequestError, AuthenticationError, NotFoundError, RateLimitError, ...).

A gRPC status from the router keeps its sentence and gets the HTTP status a client of the
OpenAI API expects for it; the router's `retry-after-ms` trailer becomes `Retry-After`.
"""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

# gRPC status → (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (408, "timeout_error"),
    grpc.StatusCode.CANCELLED: (408, "timeout_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    # The router failed in a way no input explains: the gateway's upstream is at fault.
    grpc.StatusCode.INTERNAL: (502, "upstream_error"),
    grpc.StatusCode.UNKNOWN: (502, "upstream_error"),
    grpc.StatusCode.DATA_LOSS: (502, "upstream_error"),
    grpc.StatusCode.ABORTED: (503, "service_unavailable_error"),
    grpc.StatusCode.ALREADY_EXISTS: (400, "invalid_request_error"),
}
_TYPES = {500: "server_error", 400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
          408: "timeout_error", 413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          501: "not_implemented_error", 502: "upstream_error", 503: "service_unavailable_error"}


class GatewayError(Exception):
    """An error a client gets as OpenAI's error JSON with `status`; `param` names the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, param)


def from_rpc_error(exc: grpc.aio.AioRpcError, hop: str = "the router") -> GatewayError:
    """The router's status as the HTTP error an OpenAI client expects, its sentence kept."""
    code = exc.code()
    status, _ = _HTTP.get(code, (502, "upstream_error"))
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and _unreachable(details):
        message = (f"{hop} is not reachable ({details.splitlines()[0][:200]}); the mesh may be starting or down: "
                   "retry shortly, or start it with `mirador up`")
    else:
        message = details or f"{hop} answered {code.name} without a message"
    retry_after_s = None
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = 1.0
        for key, value in exc.trailing_metadata() or ():
            if key == "retry-after-ms":
                try:
                    retry_after_s = int(value) / 1000
                except ValueError:
                    pass
    return GatewayError(status, message, code=code.name.lower(), retry_after_s=retry_after_s)


def _unreachable(details: str) -> bool:
    """grpcio's own words for the router being out of reach. The router's own UNAVAILABLE (no model of a
    route could answer, naming each hop) begins with its sentence, so it is relayed as it is."""
    return details.startswith(("failed to connect", "Connection refused", "connections to all backends",
                               "Socket closed", "DNS resolution failed", "Broken pipe", "recvmsg:"))
