"""One wrapper around every OutlierService method: request ids, metrics, access logs and the
exception -> status mapping of :mod:`service.server.errors`.

For every call it takes the caller's ``x-request-id`` metadata (or makes one), puts it in the
logging context and in the trailing metadata, counts the call by method and status code,
times it, and turns any exception the servicer raises into ``context.abort(code, message)``.
Health and reflection calls pass through untouched.

This is a server interceptor's job, done once at registration instead: a
``grpc.aio.ServerInterceptor`` runs a coroutine and builds a new method handler for every call,
which cost 18% of the no-op RPC rate on a 2-core machine (measured: 4164 against 4918 calls/s).
:class:`InstrumentedServicer` wraps each method of the servicer once, when the server starts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from vaegan.service.runtime.errors import InvalidInput
from vaegan.service.server.auth import TokenSet
from vaegan.service.server.errors import to_status
from vaegan.service.server.logs import new_request_id, request_id
from vaegan.service.server.metrics import ServerMetrics
from vaegan.service.server.repository import current_model

__all__ = ["REQUEST_ID_KEY", "InstrumentedServicer", "Malformed", "add_to_server"]

logger = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")


def _release(exc: BaseException) -> None:
    """Drop the frames (and so the locals) that ``exc`` and the exceptions chained to it hold."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)  # frames still running are skipped
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


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
            model = current_model.get()
            self.metrics.requests.labels(self.method, self.code.name, *model).inc()
            self.metrics.latency.labels(self.method, *model).observe(seconds)
            if logger.isEnabledFor(logging.INFO):  # peer() is not free; skip it when not logged
                logger.info("%s %s %.1fms peer=%s", self.method, self.code.name, seconds * 1e3, self.context.peer())
            request_id.reset(self.token)

    def _cancelled(self) -> None:
        remaining = self.context.time_remaining()
        expired = remaining is not None and remaining <= 0
        self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED

    async def _fail(self, exc: Exception) -> None:
        """Abort the call with the status ``exc`` maps to (raises grpc.aio.AbortError).

        gRPC keeps the AbortError, whose context is ``exc``: ``exc``'s traceback frames are
        cleared first, or their locals (a request's decoded images, hundreds of MiB for a
        refused over-budget request) would live until the cycle collector runs."""
        self.code, message, is_bug = to_status(exc, self.rid)
        if is_bug:
            logger.error("%s failed: %s", self.method, message, exc_info=exc)
        else:
            logger.info("%s rejected: %s: %s", self.method, self.code.name, message)
        _release(exc)
        await self.context.abort(self.code, message, trailing_metadata=self.metadata)


class InstrumentedServicer:
    """``servicer``'s methods of ``service`` (a ServiceDescriptor), each wrapped once in a
    :class:`_Call`; register it in place of the servicer (``add_*Servicer_to_server``)."""

    def __init__(
        self, servicer: object, service: Any, metrics: ServerMetrics, tokens: TokenSet | None = None,
        open_methods: frozenset[str] = frozenset(),
    ) -> None:
        """``tokens``: every call must present one of them (:mod:`service.server.auth`), except
        calls of ``open_methods`` (liveness and readiness, which probes make without a token)."""
        self.metrics = metrics
        self.tokens = tokens
        self.open_methods = open_methods
        for m in service.methods:
            behavior = getattr(servicer, m.name)
            if m.client_streaming and m.server_streaming:
                setattr(self, m.name, self._stream(behavior, m.name))
            elif not m.client_streaming and not m.server_streaming:
                setattr(self, m.name, self._unary(behavior, m.name))
            else:
                raise TypeError(f"{m.full_name}: only unary and bidirectional streaming methods are wrapped")

    def _unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = _request_id(context.invocation_metadata())
            async with _Call(self.metrics, method, rid, context):
                if method not in self.open_methods:
                    self._authenticate(context)
                reject_malformed(request)
                return await behavior(request, context)

        return wrapped

    def _stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            rid = _request_id(context.invocation_metadata())
            async with _Call(self.metrics, method, rid, context):
                self._authenticate(context)
                async for response in behavior(_checked(request_iterator), context):
                    yield response

        return wrapped

    def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        if self.tokens is not None:
            self.tokens.check(context.invocation_metadata())


@dataclass(frozen=True)
class Malformed:
    """A request whose bytes did not parse: handed to the method wrapper, which answers
    INVALID_ARGUMENT (gRPC's own handling of a failing deserializer is an INTERNAL or UNKNOWN
    status naming internal classes, with a traceback in the log per call)."""

    type_name: str
    reason: str


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Malformed(message_class.DESCRIPTOR.full_name, str(e).split(": ")[-1])

    return parse


def reject_malformed(request: Any) -> None:
    if isinstance(request, Malformed):
        raise InvalidInput(f"malformed {request.type_name} message ({request.reason})")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        reject_malformed(request)
        yield request


def add_to_server(servicer: InstrumentedServicer, service: Any, messages: Any, server: grpc.aio.Server) -> None:
    """Register ``servicer`` for ``service`` (a ServiceDescriptor) like the generated
    ``add_*Servicer_to_server``, but with deserializers that turn unparsable bytes into
    :class:`Malformed` (answered INVALID_ARGUMENT and counted) instead of a gRPC-internal error.
    ``messages``: the generated ``*_pb2`` module holding the message classes."""
    handlers = {}
    for m in service.methods:
        request_class = getattr(messages, m.input_type.name)
        response_class = getattr(messages, m.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if m.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_tolerant(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
