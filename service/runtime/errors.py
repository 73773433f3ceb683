"""Domain errors of the runtime. Each carries the name of the gRPC status it maps to.

The runtime has no grpc dependency: the server maps ``status_name`` to a ``grpc.StatusCode``
in one place (``service/server/errors.py``); the CLI maps every ServiceError to exit code 2.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "FailedPrecondition",
    "InvalidInput",
    "ModelNotReady",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
]


class ServiceError(Exception):
    """Base of every error the runtime reports to a caller on purpose."""

    status_name = "INTERNAL"


class InvalidInput(ServiceError):
    """The caller sent something we cannot use (bad bytes, shapes, NaN, ...)."""

    status_name = "INVALID_ARGUMENT"


class ResourceExhausted(ServiceError):
    """The request is over a configured limit (too many or too large images)."""

    status_name = "RESOURCE_EXHAUSTED"


class ModelNotReady(ServiceError):
    """No model is loaded yet, or the server is shutting down."""

    status_name = "UNAVAILABLE"


class FailedPrecondition(ServiceError):
    """The call cannot be done in the server's present setup (e.g. no model repository)."""

    status_name = "FAILED_PRECONDITION"


class NotFound(ServiceError):
    """The caller named a model or version this server does not serve."""

    status_name = "NOT_FOUND"


class BundleError(ServiceError):
    """A model bundle failed a check (missing file, checksum, shape, format version)."""

    status_name = "FAILED_PRECONDITION"


class Unauthenticated(ServiceError):
    """The call carries no valid credentials (a bearer token the server accepts)."""

    status_name = "UNAUTHENTICATED"


class PermissionDenied(ServiceError):
    """The caller asked for something this server does not allow (e.g. weight overrides)."""

    status_name = "PERMISSION_DENIED"
