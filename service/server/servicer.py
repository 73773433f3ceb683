"""The ``vaegan.v1.OutlierService`` servicer: validate, convert, delegate, convert back.

Decoding and resizing (and inpainting, sampling and interpolation) run on ``decode_pool``,
after the request's headers have reserved their pixels in the server-wide budget
(:mod:`service.server.budget`); re-scoring and response pictures on ``respond_pool``. Model
runs go through the :class:`~service.server.batcher.DynamicBatcher`, which also scores each
merged batch with the model's defaults (:mod:`service.server.pipeline`). Errors are raised as
ServiceErrors and mapped to status codes by the interceptor; nothing here touches status codes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.runtime import InvalidInput, Runtime, ServiceError
from vaegan.service.runtime.errors import PermissionDenied
from vaegan.service.runtime.preprocess import Prepared
from vaegan.service.server import convert
from vaegan.service.server.budget import InflightPixels
from vaegan.service.server.config import ServiceConfig
from vaegan.service.server.metrics import ServerMetrics
from vaegan.service.server.pipeline import ScoredBatch
from vaegan.service.server.repository import LoadedModel, ModelSet

__all__ = ["SERVICE", "SERVICE_NAME", "LoadedModel", "OutlierServicer"]

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["OutlierService"]
SERVICE_NAME = SERVICE.full_name  # vaegan.v1.OutlierService
T = TypeVar("T")
M = TypeVar("M", bound=Message)
# requests of at most this many images take no hop to a worker thread when the work is a few
# microseconds per image: raw uint8 tensors at model size are read on the event loop, and
# responses without pictures are built there (the hop would cost more than the work)
INLINE_MAX = 8


class OutlierServicer(pb_grpc.OutlierServiceServicer):
    """Implements the RPCs on top of a :class:`LoadedModel` (UNAVAILABLE until attached)."""

    def __init__(
        self, config: ServiceConfig, decode_pool: Executor, respond_pool: Executor, metrics: ServerMetrics,
        inflight: InflightPixels | None = None,
    ) -> None:
        self.config = config
        self.decode_pool = decode_pool
        self.respond_pool = respond_pool
        self.metrics = metrics
        self.inflight = inflight or InflightPixels(config.max_inflight_pixels)
        self.limits = convert.Limits(
            config.max_images_per_request, config.max_image_pixels, config.formats, config.max_request_pixels
        )
        self.models = ModelSet()

    def attach(self, model: LoadedModel | None) -> None:
        """Serve ``model`` (added to the model set; None: serve nothing, answer UNAVAILABLE)."""
        if model is None:
            self.models = ModelSet()
        else:
            self.models.add(model)

    @staticmethod
    async def _in_pool(pool: Executor, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, functools.partial(fn, *args, **kwargs))

    async def _decoding(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on the decode pool, for work that checks ``abandoned`` (a threading.Event) as it
        goes: a call that is cancelled or runs out of time sets it, so the thread stops at its
        next check instead of decoding on for nobody (work still queued is dropped by the pool)."""
        abandoned = threading.Event()
        try:
            return await self._in_pool(self.decode_pool, fn, *args, abandoned=abandoned)
        except asyncio.CancelledError:
            abandoned.set()
            raise

    # ---- Score --------------------------------------------------------------------------
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await self._score(request, "Score")

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ScoreResponse]:
        """Up to ``stream_window`` requests in progress at once; responses in request order."""
        window: collections.deque[asyncio.Task[pb.ScoreResponse]] = collections.deque()
        try:
            seq = 0
            try:
                async for request in request_iterator:
                    window.append(asyncio.ensure_future(self._score(request, "ScoreStream", seq)))
                    seq += 1
                    while len(window) >= self.config.stream_window or (window and window[0].done()):
                        yield await window.popleft()
            except ServiceError:  # a bad message mid-stream: answer those before it, then fail
                while window:
                    yield await window.popleft()
                raise
            while window:
                yield await window.popleft()
        finally:
            for task in window:
                task.cancel()

    async def _score(self, request: pb.ScoreRequest, method: str, seq: int | None = None) -> pb.ScoreResponse:
        try:
            with self.models.use(request.model_name, request.model_version) as model:
                response = await self._score_with(request, model, method)
        except ServiceError as e:
            if seq is None:
                raise
            raise type(e)(f"request {seq}: {e}") from e
        self.metrics.images.labels(method, model.name, model.version).inc(len(request.images))
        return response

    async def _score_with(self, request: pb.ScoreRequest, model: LoadedModel, method: str) -> pb.ScoreResponse:
        opts = convert.score_options(request.options)
        if not self.config.allow_overrides and (opts.weights is not None or opts.threshold is not None):
            raise PermissionDenied("this server does not take per-request weights or thresholds (--allow-overrides false)")
        if opts.repaired and model.runtime.bundle.calibration is None:
            raise InvalidInput("options.return_repaired needs a calibrated model")
        convert.check_count(len(request.images), self.limits)
        convert.check_ids(request.images)
        classes = convert.request_classes(request.images, model.runtime)  # None: no image sets one
        raw = self._raw_inline(request, model.runtime, opts)
        if raw is not None:
            self._check_response_floor(request, model, len(raw.batch) * raw.batch.shape[1] * raw.batch.shape[2], opts)
            response = await self._score_prepared(request, model, [], raw, opts, classes)
        else:
            pixels = await self._in_pool(self.decode_pool, convert.declared_pixels, request.images, self.limits)
            self._check_response_floor(request, model, pixels, opts)  # refused before any work
            async with self.inflight.reserve(pixels):  # until the answer is built: originals live that long
                originals, prepared = await self._decoding(self._decode, request, model.runtime, opts.repaired)
                response = await self._score_prepared(request, model, originals, prepared, opts, classes)
        response.model_name, response.model_version = model.name, model.version
        return response

    def _check_response_floor(
        self, request: pb.ScoreRequest, model: LoadedModel, input_pixels: int, opts: convert.ScoreOptions
    ) -> None:
        floor = convert.response_floor_bytes(len(request.images), input_pixels, model.runtime.spec, opts)
        convert.check_response_size(floor, self.config.max_message_bytes, known_before=True)

    async def _score_prepared(
        self, request: pb.ScoreRequest, model: LoadedModel, originals: list[np.ndarray], prepared: Prepared,
        opts: convert.ScoreOptions, classes: np.ndarray | None = None,
    ) -> pb.ScoreResponse:
        scored = await model.batcher.infer(prepared.batch, classes)
        if opts.default_scoring and not opts.pictures and len(request.images) <= INLINE_MAX:
            return self._respond(request, model, scored, originals, prepared, opts)  # cheap
        return await self._in_pool(
            self.respond_pool, self._respond, request, model, scored, originals, prepared, opts
        )

    def _raw_inline(self, request: pb.ScoreRequest, rt: Runtime, opts: convert.ScoreOptions) -> Prepared | None:
        """Small requests of raw uint8 tensors at model size are read on the event loop: no
        thread hop and no decoding (None: anything else, decoded on the decode pool)."""
        if opts.repaired or len(request.images) > INLINE_MAX:
            return None
        x = convert.raw_model_batch(request.images, rt.spec, self.limits)
        return None if x is None else Prepared.at_model_size(x)

    def _decode(
        self, request: pb.ScoreRequest, rt: Runtime, keep_originals: bool, abandoned: threading.Event | None = None
    ) -> tuple[list[np.ndarray], Prepared]:
        """(the decoded originals if ``keep_originals`` (repairs need them), else []; the batch at
        model size). Raw uint8 tensors at model size are taken as they are."""
        if not keep_originals:
            x = convert.raw_model_batch(request.images, rt.spec, self.limits)
            if x is not None:
                return [], Prepared.at_model_size(x)
        originals = convert.decode_images(request.images, self.limits, abandoned=abandoned)
        prepared = convert.model_inputs(originals, rt.spec, [img.id for img in request.images], abandoned)
        return (originals if keep_originals else []), prepared

    def _respond(
        self,
        request: pb.ScoreRequest,
        model: LoadedModel,
        scored: ScoredBatch,
        originals: list[np.ndarray],
        prepared: Prepared,
        opts: convert.ScoreOptions,
    ) -> pb.ScoreResponse:
        rt = model.runtime
        res = scored.result
        if res is None or not opts.default_scoring:
            res = rt.score_forward(scored.fwd, opts.weights, opts.threshold, opts.reconstruction)
        res = res.with_inputs(rt.spec, prepared.sizes, prepared.conversions)
        # a conditional model repairs each image in the class it was scored against
        repaired = rt.repair(originals, classes=res.classes if rt.num_classes else None) if opts.repaired else None
        self.metrics.outliers.labels(model.name, model.version).inc(int(np.count_nonzero(res.is_outlier)))
        scores = self.metrics.scores.labels(model.name, model.version)
        for s in res.score:
            scores.observe(float(s))
        ids = [img.id for img in request.images]
        response = convert.score_response(ids, res, opts, rt.spec, repaired, rt.bundle.calibration)
        if opts.pictures:  # PNG sizes are known only now: a clear refusal, not gRPC's send error
            convert.check_response_size(response.ByteSize(), self.config.max_message_bytes, known_before=False)
        return response

    # ---- Inpaint ------------------------------------------------------------------------
    async def Inpaint(self, request: pb.InpaintRequest, context: grpc.aio.ServicerContext) -> pb.InpaintResponse:
        with self.models.use(request.model_name, request.model_version) as model:
            return await self._inpaint_with(request, model)

    async def _inpaint_with(self, request: pb.InpaintRequest, model: LoadedModel) -> pb.InpaintResponse:
        convert.check_count(len(request.images), self.limits)
        convert.check_ids(request.images)
        pixels = await self._in_pool(
            self.decode_pool, convert.declared_pixels, request.images, self.limits, masks=request.masks
        )
        async with self.inflight.reserve(pixels):
            response = await self._in_pool(self.decode_pool, self._inpaint, request, model.runtime)
        self.metrics.images.labels("Inpaint", model.name, model.version).inc(len(request.images))
        return response

    def _inpaint(self, request: pb.InpaintRequest, rt: Runtime) -> pb.InpaintResponse:
        classes = convert.request_classes(request.images, rt)
        budget = convert.PixelBudget(self.limits)  # images and masks together
        images = convert.decode_images(request.images, self.limits, budget=budget)
        masks = convert.decode_masks(request.masks, request.images, images, self.limits, budget)
        filled = rt.inpaint(images, masks, classes)
        return convert.inpaint_response([img.id for img in request.images], filled, request.image_format)

    # ---- Sample and Interpolate: the generator on the decode pool, as Inpaint ------------
    async def Sample(self, request: pb.SampleRequest, context: grpc.aio.ServicerContext) -> pb.SampleResponse:
        with self.models.use(request.model_name, request.model_version) as model:
            args = convert.sample_args(request, self.limits, model.runtime)
            self._check_images_floor(args.n, model.runtime, args.image_format)
            response = await self._in_pool(self.decode_pool, self._sample, model.runtime, args)
        response.model_name, response.model_version = model.name, model.version
        self.metrics.images.labels("Sample", model.name, model.version).inc(args.n)  # images drawn
        return response

    def _sample(self, rt: Runtime, args: convert.SampleArgs) -> pb.SampleResponse:
        images = rt.sample(args.n, args.seed, args.temperature, args.class_id)
        return self._checked_size(convert.sample_response(images, args.image_format, args.seed), args.image_format)

    async def Interpolate(
        self, request: pb.InterpolateRequest, context: grpc.aio.ServicerContext
    ) -> pb.InterpolateResponse:
        with self.models.use(request.model_name, request.model_version) as model:
            args = convert.interpolate_args(request, self.limits, model.runtime)
            self._check_images_floor(args.steps, model.runtime, args.image_format)
            pixels = await self._in_pool(self.decode_pool, convert.declared_end_pixels, request, self.limits)
            async with self.inflight.reserve(pixels):
                response = await self._decoding(self._interpolate, request, model.runtime, args)
        response.model_name, response.model_version = model.name, model.version
        self.metrics.images.labels("Interpolate", model.name, model.version).inc(args.steps)  # images decoded
        return response

    def _interpolate(
        self, request: pb.InterpolateRequest, rt: Runtime, args: convert.InterpolateArgs,
        abandoned: threading.Event | None = None,
    ) -> pb.InterpolateResponse:
        a, b = convert.decode_ends(request, self.limits, abandoned)
        images = rt.interpolate(a, b, args.steps, args.method, args.class_id)
        return self._checked_size(convert.interpolate_response(images, args.image_format), args.image_format)

    def _check_images_floor(self, n: int, rt: Runtime, fmt: int) -> None:
        """Refuse before any work a response of ``n`` raw model-size images that cannot be sent."""
        floor = convert.images_floor_bytes(n, rt.spec, fmt)
        convert.check_response_size(floor, self.config.max_message_bytes, known_before=True)

    def _checked_size(self, response: M, fmt: int) -> M:
        """``response``; PNG sizes are known only now: a clear refusal, not gRPC's send error."""
        if fmt != pb.IMAGE_FORMAT_RAW:
            convert.check_response_size(response.ByteSize(), self.config.max_message_bytes, known_before=False)
        return response

    # ---- GetModelInfo -------------------------------------------------------------------
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        model = self.models.resolve(request.model_name, request.model_version)
        info = convert.model_info(model.runtime, self.config)
        info.name, info.version = model.name, model.version
        return info

    # ---- ListModels ---------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        rows = self.models.states()
        return pb.ListModelsResponse(
            models=[pb.ModelVersionState(name=n, version=v, state=st, reason=r) for n, v, st, r in rows]
        )
