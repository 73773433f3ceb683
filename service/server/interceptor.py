"""One server interceptor for the OutlierService methods: request ids, metrics, access logs and
the exception -> status mapping of :mod:`service.server.errors`.

For every call it takes the caller's ``x-request-id`` metadata (or makes one), puts it in the
logging context and in the trailing metadata, counts the call by method and status code,
times it, and turns any exception the servicer raises into ``context.abort(code, message)``.
Health and reflection calls pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.server.errors import to_status
from service.server.logs import new_request_id, request_id
from service.server.metrics import ServerMetrics

__all__ = ["REQUEST_ID_KEY", "ServiceInterceptor"]

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _VALID_ID.match(value):
            return value
    return new_request_id()


class _Call:
    """``async with`` one call: context var, in-flight gauge, final code, duration, log line,
    and the exception -> status mapping (the one place unary and streaming calls share)."""

    def __init__(self, metrics: ServerMetrics, method: str, rid: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics, self.method, self.rid, self.context = metrics, method, rid, context
        self.code = grpc.StatusCode.OK
        self.metadata = ((REQUEST_ID_KEY, rid),)
        self.in_flight = metrics.in_flight.labels(method)

    async def __aenter__(self) -> _Call:
        self.token = request_id.set(self.rid)
        self.start = time.perf_counter()
        self.in_flight.inc()
        self.context.set_trailing_metadata(self.metadata)
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        """Record the outcome; an unexpected exception becomes ``context.abort`` (AbortError)."""
        try:
            if isinstance(exc, asyncio.CancelledError):
                self._cancelled()
            elif isinstance(exc, grpc.aio.AbortError):
                self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            elif isinstance(exc, Exception):
                await self._fail(exc)
        finally:
            seconds = time.perf_counter() - self.start
            self.in_flight.dec()
            self.metrics.requests.labels(self.method, self.code.name).inc()
            self.metrics.latency.labels(self.method).observe(seconds)
            if logger.isEnabledFor(logging.INFO):  # peer() is not free; skip it when not logged
                logger.info("%s %s %.1fms peer=%s", self.method, self.code.name, seconds * 1e3, self.context.peer())
            request_id.reset(self.token)

    def _cancelled(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    async def _fail(self, exc: Exception) -> None:
        """Abort the call with the status ``exc`` maps to (raises grpc.aio.AbortError)."""
        self.code, message, is_bug = to_status(exc, self.rid)
        if is_bug:
            logger.error("%s failed: %s", self.method, message, exc_info=exc)
        else:
            logger.info("%s rejected: %s: %s", self.method, self.code.name, message)
        await self.context.abort(self.code, message, trailing_metadata=self.metadata)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the unary-unary and stream-stream handlers of one service (``service_name``)."""

    def __init__(self, metrics: ServerMetrics, service_name: str) -> None:
        self.metrics = metrics
        self.prefix = f"/{service_name}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or not full_method.startswith(self.prefix):
            return handler
        method = full_method[len(self.prefix) :]
        rid = _request_id(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, rid),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method, rid),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, behavior: Callable[..., Any], method: str, rid: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _Call(self.metrics, method, rid, context):
                return await behavior(request, context)

        return wrapped

    def _stream(self, behavior: Callable[..., Any], method: str, rid: str) -> Callable[..., Any]:
        async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with _Call(self.metrics, method, rid, context):
                async for response in behavior(request_iterator, context):
                    yield response

        return wrapped
