"""The one place where exceptions become gRPC status codes.

The runtime raises :class:`~service.runtime.errors.ServiceError` subclasses, each naming its
status (``InvalidInput`` -> INVALID_ARGUMENT, ``ResourceExhausted`` -> RESOURCE_EXHAUSTED,
``ModelNotReady`` -> UNAVAILABLE, ``BundleError`` -> FAILED_PRECONDITION). The server
interceptor (:mod:`service.server.interceptor`) calls :func:`to_status` for every failed call;
anything that is not a ServiceError is a bug: INTERNAL with a generic message, and the
traceback goes to the log under the request id.
"""

from __future__ import annotations

import grpc

from vaegan.service.runtime.errors import ServiceError

__all__ = ["INTERNAL_MESSAGE", "to_status"]

INTERNAL_MESSAGE = "internal error; the server log has the details under request id {request_id}"


def to_status(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, bool]:
    """(status code, message for the client, whether it is a bug to log with its traceback)."""
    if isinstance(exc, ServiceError):
        code = getattr(grpc.StatusCode, exc.status_name, grpc.StatusCode.INTERNAL)
        return code, str(exc), code is grpc.StatusCode.INTERNAL
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE.format(request_id=request_id), True
