"""The Open Inference Protocol over HTTP/REST (``--http-port``), on the server's event loop.

Endpoints (KServe v2 / Triton):

========================================================== ======================================
``GET  /v2``                                               server metadata
``GET  /v2/health/live``, ``/v2/health/ready``             200, or 503 when not ready
``GET  /v2/models/{name}[/versions/{v}]``                  model metadata
``GET  /v2/models/{name}[/versions/{v}]/ready``            200, or 503 when not ready
``POST /v2/models/{name}[/versions/{v}]/infer``            inference
``POST /v2/repository/index``                              the served models and their state
``POST /v2/repository/models/{name}/load`` / ``unload``      explicit model control
========================================================== ======================================

Infer bodies are JSON, or JSON followed by binary tensor data (the binary data extension that
tritonclient uses): the ``Inference-Header-Content-Length`` header gives the JSON's length; an
input with ``parameters.binary_data_size`` takes that many bytes of the rest, in input order.
Outputs come back as JSON ``data`` unless asked as binary (``parameters.binary_data`` on the
output, or ``binary_data_output`` on the request), in which case the response is laid out the
same way. Tensors are the ones of :mod:`service.server.oip`; the work is the same
:meth:`~service.server.oip.InferenceServicer.infer` as over gRPC, on the same batcher.

Errors are ``{"error": "..."}`` with the HTTP status of the gRPC code (400 for bad input,
404 for an unknown model, 401/403 for auth, 429 over a limit, 503 unavailable, 500 a bug).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from vaegan.service.runtime import InvalidInput
from vaegan.service.server.auth import TokenSet
from vaegan.service.server.errors import to_status
from vaegan.service.server.logs import new_request_id
from vaegan.service.server.metrics import ServerMetrics
from vaegan.service.server.oip import (
    INPUT,
    MASKS,
    InferenceServicer,
    check_inputs,
    tensor_bytes,
    tensor_images,
    tensor_shape,
)
from vaegan.service.server.repository import current_model

__all__ = ["HEADER_LENGTH", "HttpEndpoint", "build_app", "start_http"]

logger = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """(the JSON part, the binary part) of an infer request body."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: not a number ({header_length!r})") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        doc = json.loads(json_part)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"the request body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InvalidInput("the request body must be a JSON object")
    return doc, binary


def _inputs(doc: dict[str, Any], binary: bytes) -> tuple[list[Any], list[Any] | None]:
    """(IMAGES, MASKS or None) of an infer request; binary tensors take their
    ``binary_data_size`` bytes of ``binary`` in input order."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput("inputs: expected a list of tensors")
    check_inputs([str(t.get("name")) for t in inputs])
    got: dict[str, list[Any]] = {}
    offset = 0
    for t in inputs:
        name = str(t["name"])
        where = f"input '{name}'"
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) for s in shape):
            raise InvalidInput(f"{where}: shape must be a list of integers")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"{where}: binary_data_size is {size}, but {len(binary) - offset} bytes follow the JSON"
                )
            got[name] = tensor_images(str(t.get("datatype")), shape, binary[offset : offset + size], name=name)
            offset += size
            continue
        if str(t.get("datatype")) == "BYTES":
            raise InvalidInput(f"{where}: send encoded images as binary data (the binary data extension)")
        data = t.get("data")
        if not isinstance(data, list):
            raise InvalidInput(f"{where}: no data (a flat or nested list of values, or binary data)")
        flat = np.asarray(data, dtype=object).ravel()
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
            raise InvalidInput(f"{where}: UINT8 data must be integers")
        got[name] = tensor_images(str(t.get("datatype")), shape, None, values=[int(v) for v in flat], name=name)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the JSON that no input claims")
    return got[INPUT], got.get(MASKS)


def _wants_binary(doc: dict[str, Any]) -> tuple[list[str], set[str]]:
    """(the output names asked for, those to send as binary data)."""
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and "name" in o for o in outputs):
        raise InvalidInput("outputs: expected a list of {\"name\": ...} objects")
    params = doc.get("parameters") or {}
    all_binary = bool(isinstance(params, dict) and params.get("binary_data_output"))
    names = [str(o["name"]) for o in outputs]
    binary = {str(o["name"]) for o in outputs if all_binary or (o.get("parameters") or {}).get("binary_data")}
    return names, binary


class _Routes:
    def __init__(self, inference: InferenceServicer, metrics: ServerMetrics, tokens: TokenSet | None) -> None:
        self.inference = inference
        self.metrics = metrics
        self.tokens = tokens

    def wrap(self, method: str, handler: Handler, open_: bool = False) -> Handler:
        """Auth, metrics (as the gRPC calls: by method and status code) and error mapping."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            in_flight = self.metrics.in_flight.labels(method)
            in_flight.inc()
            try:
                if self.tokens is not None and not open_:
                    self.tokens.check([("authorization", request.headers.get("Authorization", ""))])
                return await handler(request)
            except Exception as e:  # noqa: BLE001 - every failure becomes a status, the server goes on
                code, message, is_bug = to_status(e, new_request_id())
                if is_bug:
                    logger.error("HTTP %s failed: %s", method, message, exc_info=e)
                return _json_error(_HTTP_STATUS.get(code, 500), message)
            finally:
                in_flight.dec()
                model = current_model.get()
                self.metrics.requests.labels(method, code.name, *model).inc()
                self.metrics.latency.labels(method, *model).observe(time.perf_counter() - start)

        return wrapped

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "vaegan", "version": self.inference.server_version, "extensions": []})

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.inference.ready() else 503)

    async def model_ready(self, request: web.Request) -> web.Response:
        ok = self.inference.model_ready(request.match_info["name"], request.match_info.get("version", ""))
        return web.Response(status=200 if ok else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        m = self.inference.metadata(request.match_info["name"], request.match_info.get("version", ""))
        return web.json_response({
            "name": m.name, "versions": list(m.versions), "platform": m.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in m.outputs],
        })

    async def repository_index(self, request: web.Request) -> web.Response:
        from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip

        index = await self.inference.RepositoryIndex(oip.RepositoryIndexRequest(), None)  # type: ignore[arg-type]
        return web.json_response([
            {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models
        ])

    async def repository_load(self, request: web.Request) -> web.Response:
        from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip

        await self.inference.RepositoryModelLoad(oip.RepositoryModelLoadRequest(model_name=request.match_info["name"]), None)
        return web.json_response({})

    async def repository_unload(self, request: web.Request) -> web.Response:
        from vaegan.protos.inference.v2 import grpc_predict_v2_pb2 as oip

        await self.inference.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name=request.match_info["name"]), None)
        return web.json_response({})

    async def infer(self, request: web.Request) -> web.Response:
        self.inference._model(request.match_info["name"], request.match_info.get("version", ""))  # 404 first
        doc, binary = _parse_body(await request.read(), request.headers.get(HEADER_LENGTH))
        names, as_binary = _wants_binary(doc)
        images, masks = _inputs(doc, binary)
        model, outputs = await self.inference.infer(
            request.match_info["name"], request.match_info.get("version", ""), images, names, masks
        )
        described, chunks = [], []
        for name, datatype, value in outputs:
            entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": tensor_shape(value)}
            if name in as_binary or isinstance(value, list):
                raw = tensor_bytes(value)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = value.ravel().tolist()
            described.append(entry)
        head: dict[str, Any] = {"model_name": model.name, "model_version": model.version, "outputs": described}
        if isinstance(doc.get("id"), str):
            head["id"] = doc["id"]
        header = json.dumps(head).encode()
        if not chunks:
            return web.Response(body=header, content_type="application/json")
        return web.Response(
            body=header + b"".join(chunks),
            headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
        )


def build_app(inference: InferenceServicer, metrics: ServerMetrics, tokens: TokenSet | None, max_body: int) -> web.Application:
    """The aiohttp application serving the OIP REST endpoints."""
    r = _Routes(inference, metrics, tokens)
    app = web.Application(client_max_size=max_body)
    model = "/v2/models/{name}"
    version = "/v2/models/{name}/versions/{version}"
    app.add_routes([
        web.get("/v2", r.wrap("ServerMetadata", r.server_metadata)),
        web.get("/v2/health/live", r.wrap("ServerLive", r.live, open_=True)),
        web.get("/v2/health/ready", r.wrap("ServerReady", r.ready, open_=True)),
        web.get(model, r.wrap("ModelMetadata", r.model_metadata)),
        web.get(version, r.wrap("ModelMetadata", r.model_metadata)),
        web.get(model + "/ready", r.wrap("ModelReady", r.model_ready, open_=True)),
        web.get(version + "/ready", r.wrap("ModelReady", r.model_ready, open_=True)),
        web.post(model + "/infer", r.wrap("ModelInfer", r.infer)),
        web.post(version + "/infer", r.wrap("ModelInfer", r.infer)),
        web.post("/v2/repository/index", r.wrap("RepositoryIndex", r.repository_index)),
        web.post("/v2/repository/models/{name}/load", r.wrap("RepositoryModelLoad", r.repository_load)),
        web.post("/v2/repository/models/{name}/unload", r.wrap("RepositoryModelUnload", r.repository_unload)),
    ])
    return app


class HttpEndpoint:
    """A running aiohttp site; :meth:`close` stops it."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_http(app: web.Application, host: str, port: int) -> HttpEndpoint:
    """Serve ``app`` on ``host:port`` (0: a free port) on the running event loop."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or None, port, reuse_port=False)
    await site.start()
    server = site._server  # the bound port when 0 was asked  # noqa: SLF001
    sockets = getattr(server, "sockets", None) or []
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    logger.info("OIP HTTP/REST on http://%s:%d/v2", host, bound)
    return HttpEndpoint(runner, bound)
