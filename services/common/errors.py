"""Errors a caller can cause, each with its gRPC status and a sentence saying what to fix.

Servicers raise these; `ErrorMappingInterceptor` (server.py) turns them into
statuses, so no handler needs its own try/except and no input crashes a service.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with the gRPC status the caller should get."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    """A capability that a later milestone builds; says so instead of a fake answer."""

    code = grpc.StatusCode.UNIMPLEMENTED
