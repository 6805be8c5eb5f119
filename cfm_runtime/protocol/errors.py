"""Errors a center handler raises; `status_for` maps any exception to one gRPC status."""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """A request the center refuses; the message says what to fix."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


_BUILTIN = [  # plain exceptions from library code, most specific first
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
]


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message a handler's exception becomes."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    for kind, code in _BUILTIN:
        if isinstance(exc, kind):
            return code, f"{type(exc).__name__}: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); see the center's log"
