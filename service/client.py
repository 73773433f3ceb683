"""A small typed Python client for ``vaegan.v1.OutlierService``.

    with OutlierClient("localhost:50051", timeout=10) as client:
        results = client.score(["a.png", "b.png"], anomaly_maps=True)
        results[0].score, results[0].is_outlier, results[0].anomaly_map  # float32 (H, W)
        results[0].region, results[0].input_size, results[0].conversion  # where the image landed
        filled = client.inpaint([image], [mask])                       # uint8 (H, W, C)
        samples = client.sample(16, seed=0)                            # uint8 (16, H, W, C)
        path = client.interpolate(image_a, image_b, steps=8)           # uint8 (8, H, W, C)
        # a conditional model: score against given classes (None: the image's best class)
        results = client.score([a, b], classes=[3, None]); results[1].class_id

Images may be numpy arrays (uint8 0..255 or float 0..1; (H, W) or (H, W, C), or a batch
(N, H, W[, C])), PIL images, file paths or encoded bytes. Arrays are sent as raw tensors, files
and bytes as they are (the server decodes them). PIL images are turned upright (EXIF
orientation) and sent as arrays when 8-bit grey, RGB or RGBA, else losslessly encoded (PNG or
TIFF) so that the server decodes 16-bit, float, palette or CMYK pixels by its own rules. Every
call has a deadline (``timeout`` s, which
covers retries); UNAVAILABLE (server starting, shutting down, unreachable) is retried with
jittered exponential backoff. For several servers behind one DNS name (a Kubernetes headless
Service) use ``dns:///name:port`` with ``load_balancing="round_robin"``.

Needs numpy, Pillow, grpcio and protobuf only (no onnxruntime).
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image, ImageOps

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.protos.vaegan.v1 import outlier_service_pb2_grpc as pb_grpc
from vaegan.service.server.codec import array_to_tensor, decode_output

__all__ = ["ImageInput", "ImageScore", "ModelInfo", "OutlierClient", "OutlierClientError"]

logger = logging.getLogger(__name__)

ImageInput = np.ndarray | Image.Image | str | Path | bytes
COMPONENTS = ("pixel", "feature", "disc", "pixel_local", "disc_local")  # the last two: models that have them
T = TypeVar("T")


class OutlierClientError(Exception):
    """A failed call: the gRPC status ``code``, the server's ``details`` and the request id."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str) -> None:
        super().__init__(f"{code.name}: {details} (request id {request_id})")
        self.code = code
        self.details = details
        self.request_id = request_id


@dataclass(frozen=True)
class ImageScore:
    """One image's result; pictures are set only when asked for."""

    id: str
    score: float  # calibrated outlier score (higher = more anomalous)
    is_outlier: bool  # score > threshold
    tail_probability: float  # share of normal calibration images scoring >= score
    threshold: float
    components: dict[str, float]  # "pixel" | "feature" | "disc"
    # float32 (H, W) at model resolution, or at the input's size with anomaly_map_input_size
    anomaly_map: np.ndarray | None = None
    reconstruction: np.ndarray | None = None  # uint8 (H, W, C) at model resolution
    repaired: np.ndarray | None = None  # uint8 (H, W, C) at the input's size
    repair_mask: np.ndarray | None = None  # bool (H, W), True = filled
    # the part of the input the model scored, (top, left, height, width) in input pixels
    region: tuple[int, int, int, int] = (0, 0, 0, 0)
    input_size: tuple[int, int] = (0, 0)  # the decoded input's (height, width)
    conversion: str = ""  # "" (as sent), "grey->rgb" or "rgb->grey"
    class_id: int | None = None  # a conditional model: the class scored against; else None


@dataclass(frozen=True)
class ModelInfo:
    """The served model, its calibration and the server's batching settings."""

    name: str
    version: str
    channels: int
    height: int
    width: int
    resize: str  # how other sizes are fitted: "letterbox", "resize" or "center_crop"
    providers: list[str]
    calibrated: bool
    threshold: float
    target_fpr: float
    weights: dict[str, float]
    max_batch_size: int
    max_delay_ms: float
    max_images_per_request: int
    raw: pb.ModelInfo = field(repr=False)  # every field, as sent
    class_names: list[str] = field(default_factory=list)  # a conditional model's classes; else []


def _to_image(src: ImageInput, image_id: str) -> pb.Image:
    if isinstance(src, (str, Path)):
        return pb.Image(id=image_id, encoded=Path(src).read_bytes())
    if isinstance(src, (bytes, bytearray, memoryview)):
        return pb.Image(id=image_id, encoded=bytes(src))
    if isinstance(src, Image.Image):
        return _pil_image(src, image_id)
    return pb.Image(id=image_id, tensor=array_to_tensor(np.asarray(src)))


def _pil_image(im: Image.Image, image_id: str) -> pb.Image:
    """Upright (EXIF orientation); 8-bit grey, RGB and RGBA as a raw tensor; any other mode as
    lossless PNG or TIFF bytes, which the server decodes by its own rules (16-bit, float,
    palette, CMYK ...); modes neither format holds are converted to RGB(A) here."""
    if im.getexif().get(0x0112, 1) != 1:  # the EXIF Orientation tag
        im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBa", "La"):  # premultiplied: neither PNG nor TIFF holds them
        im = im.convert("RGBA" if im.mode == "RGBa" else "LA")
    if im.mode in ("L", "RGB", "RGBA"):
        return pb.Image(id=image_id, tensor=array_to_tensor(np.asarray(im)))
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        try:
            im.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            continue
        return pb.Image(id=image_id, encoded=buf.getvalue())
    return pb.Image(id=image_id, tensor=array_to_tensor(np.asarray(im.convert("RGB"))))


def _with_classes(messages: list[pb.Image], classes: Sequence[int | None] | None) -> list[pb.Image]:
    """``messages`` with ``class_id`` set from ``classes`` (one per image; None: unset, the
    image's best class). Conditional models only: the server refuses a class for others."""
    if classes is None:
        return messages
    if len(classes) != len(messages):
        raise ValueError(f"got {len(classes)} classes for {len(messages)} images")
    for msg, c in zip(messages, classes, strict=True):
        if c is not None:
            msg.class_id = int(c)
    return messages


def _as_list(images: Sequence[ImageInput] | np.ndarray) -> list[ImageInput]:
    if isinstance(images, np.ndarray):
        return [images] if images.ndim == 2 else list(images)  # (H, W) or a batch (N, ...)
    return list(images)


def _ids(images: list[ImageInput], ids: Sequence[str] | None) -> list[str]:
    if ids is not None:
        if len(ids) != len(images):
            raise ValueError(f"got {len(ids)} ids for {len(images)} images")
        return [str(i) for i in ids]
    return [str(src) if isinstance(src, (str, Path)) else str(i) for i, src in enumerate(images)]


def _path_id(src: ImageInput) -> str:
    """A file's path as its image id (the server's errors name it); "" for anything else."""
    return str(src) if isinstance(src, (str, Path)) else ""


def _picture(img: pb.Image) -> np.ndarray | None:
    return decode_output(img) if img.WhichOneof("data") else None


def _result(r: pb.ImageScore) -> ImageScore:
    mask = _picture(r.repair_mask)
    box = r.region
    return ImageScore(
        id=r.id,
        score=r.score,
        is_outlier=r.is_outlier,
        tail_probability=r.tail_probability,
        threshold=r.threshold,
        components={k: getattr(r.components, k) for k in COMPONENTS if r.components.HasField(k)},
        anomaly_map=_picture(r.anomaly_map),
        reconstruction=_picture(r.reconstruction),
        repaired=_picture(r.repaired),
        repair_mask=None if mask is None else mask > 0,
        region=(box.top, box.left, box.height, box.width),
        input_size=(r.input_height, r.input_width),
        conversion=r.conversion,
        class_id=r.class_id if r.HasField("class_id") else None,
    )


class OutlierClient:
    """Blocking client with deadlines, retries on UNAVAILABLE, TLS and client-side balancing."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.1,
        max_backoff: float = 2.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        load_balancing: str | None = "round_robin",
        token: str | None = None,
        max_message_bytes: int = 64 << 20,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """``target``: ``host:port``, ``dns:///name:port`` or ``ipv4:a:p,b:p``; ``timeout``:
        default deadline per call in seconds (retries included); ``retries``: extra attempts
        after UNAVAILABLE; ``tls``: TLS with ``root_certificates`` (system roots when None) and
        an optional client key/chain (mutual TLS); ``load_balancing``: ``round_robin`` or
        ``pick_first``; ``token``: a bearer token sent with every call (``--auth-tokens-file``)."""
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        config: dict[str, Any] = {}
        if load_balancing:
            config["loadBalancingConfig"] = [{load_balancing: {}}]
        opts: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.service_config", json.dumps(config)),
            # reconnect soon after a refused connection, so that retries can succeed
            ("grpc.initial_reconnect_backoff_ms", max(1, int(backoff * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, int(backoff * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, int(max_backoff * 1000))),
            *options,
        ]
        if tls or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.OutlierServiceStub(self._channel)

    # ---- calls ------------------------------------------------------------------------------
    def score(
        self,
        images: Sequence[ImageInput] | np.ndarray,
        *,
        ids: Sequence[str] | None = None,
        anomaly_maps: bool = False,
        reconstructions: bool = False,
        repaired: bool = False,
        weights: Mapping[str, float] | None = None,
        threshold: float | None = None,
        timeout: float | None = None,
        anomaly_map_input_size: bool = False,
        classes: Sequence[int | None] | None = None,
    ) -> list[ImageScore]:
        """Score images; one result per image, in order. ``weights`` overrides components'
        weights (e.g. ``{"disc": 0}``); ``threshold`` the decision threshold;
        ``anomaly_map_input_size`` returns the maps at each input's size (to overlay it);
        ``classes`` (conditional models): the class to score each image against, None for its
        best class (``ImageScore.class_id`` reports the class used)."""
        items = _as_list(images)
        messages = [_to_image(src, i) for src, i in zip(items, _ids(items, ids), strict=True)]
        request = pb.ScoreRequest(
            images=_with_classes(messages, classes),
            options=self._options(anomaly_maps, reconstructions, repaired, weights, threshold, anomaly_map_input_size),
        )
        response = self._call(self._stub.Score, request, timeout)
        return [_result(r) for r in response.results]

    def score_stream(
        self,
        batches: Iterable[Any],
        *,
        with_ids: bool = False,
        anomaly_maps: bool = False,
        repaired: bool = False,
        weights: Mapping[str, float] | None = None,
        threshold: float | None = None,
        timeout: float | None = None,
        anomaly_map_input_size: bool = False,
    ) -> Iterator[list[ImageScore]]:
        """Score many batches over one ScoreStream call (no retries); yields per batch, in
        order. Each batch is a sequence of images (or a batch array), or with ``with_ids`` an
        ``(ids, images)`` pair. ``batches`` is read lazily, as the stream has room."""
        options = self._options(anomaly_maps, False, repaired, weights, threshold, anomaly_map_input_size)

        def requests() -> Iterator[pb.ScoreRequest]:
            for batch in batches:
                ids, images = batch if with_ids else (None, batch)
                items = _as_list(images)
                yield pb.ScoreRequest(
                    images=[_to_image(s, i) for s, i in zip(items, _ids(items, ids), strict=True)],
                    options=options,
                )

        rid = uuid.uuid4().hex[:16]
        stream = self._stub.ScoreStream(
            requests(), timeout=timeout or self.timeout, metadata=(("x-request-id", rid), *self._auth)
        )
        try:
            for response in stream:
                yield [_result(r) for r in response.results]
        except grpc.RpcError as e:
            raise OutlierClientError(e.code(), e.details() or "", rid) from e

    def inpaint(
        self,
        images: Sequence[ImageInput] | np.ndarray,
        masks: Sequence[ImageInput] | np.ndarray,
        *,
        timeout: float | None = None,
        classes: Sequence[int | None] | None = None,
    ) -> list[np.ndarray]:
        """Fill the non-zero mask pixels; uint8 (H, W, C) images at each input's size.
        ``classes`` as in :meth:`score` (conditional models)."""
        items, mask_items = _as_list(images), _as_list(masks)
        ids = _ids(items, None)
        request = pb.InpaintRequest(
            images=_with_classes([_to_image(s, i) for s, i in zip(items, ids, strict=True)], classes),
            masks=[_to_image(m, i) for m, i in zip(mask_items, ids, strict=False)],
            image_format=pb.IMAGE_FORMAT_RAW,
        )
        response = self._call(self._stub.Inpaint, request, timeout)
        return [decode_output(r.image) for r in response.results]

    def sample(
        self,
        n: int,
        *,
        seed: int | None = None,
        temperature: float = 1.0,
        model_name: str = "",
        model_version: str = "",
        timeout: float | None = None,
        class_id: int | None = None,
    ) -> np.ndarray:
        """``n`` images drawn from the model: uint8 (n, H, W, C) at the model's size. The same
        ``seed`` gives the same images (None: the server draws a seed). ``class_id``
        (conditional models): the class of every image (None: the classes in turn)."""
        request = pb.SampleRequest(
            n=n, seed=seed, temperature=temperature, image_format=pb.IMAGE_FORMAT_RAW,
            model_name=model_name, model_version=model_version, class_id=class_id,
        )
        response = self._call(self._stub.Sample, request, timeout)
        return np.stack([decode_output(img) for img in response.images])

    def interpolate(
        self,
        a: ImageInput,
        b: ImageInput,
        *,
        steps: int = 8,
        method: str = "linear",
        model_name: str = "",
        model_version: str = "",
        timeout: float | None = None,
    ) -> np.ndarray:
        """The decoded latent path from ``a`` to ``b`` (``method`` ``linear`` or ``slerp``):
        uint8 (steps, H, W, C) at the model's size; the ends are the two reconstructions."""
        request = pb.InterpolateRequest(
            a=_to_image(a, _path_id(a)), b=_to_image(b, _path_id(b)), steps=steps, method=method,
            image_format=pb.IMAGE_FORMAT_RAW, model_name=model_name, model_version=model_version,
        )
        response = self._call(self._stub.Interpolate, request, timeout)
        return np.stack([decode_output(img) for img in response.images])

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model's name, version, image shape, calibration and batching."""
        m = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return ModelInfo(
            name=m.name,
            version=m.version,
            channels=m.image.channels,
            height=m.image.height,
            width=m.image.width,
            resize=m.image.resize,
            providers=list(m.providers),
            calibrated=m.calibration.calibrated,
            threshold=m.calibration.threshold,
            target_fpr=m.calibration.target_fpr,
            weights={k: getattr(m.calibration.weights, k) for k in COMPONENTS if m.calibration.weights.HasField(k)},
            max_batch_size=m.batching.max_batch_size,
            max_delay_ms=m.batching.max_delay_ms,
            max_images_per_request=m.batching.max_images_per_request,
            raw=m,
            class_names=list(m.class_names),
        )

    # ---- plumbing ---------------------------------------------------------------------------
    @staticmethod
    def _options(
        anomaly_maps: bool,
        reconstructions: bool,
        repaired: bool,
        weights: Mapping[str, float] | None,
        threshold: float | None,
        anomaly_map_input_size: bool = False,
    ) -> pb.ScoreOptions:
        unknown = set(weights or {}) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
        return pb.ScoreOptions(
            return_anomaly_map=anomaly_maps,
            return_reconstruction=reconstructions,
            return_repaired=repaired,
            anomaly_map_input_size=anomaly_map_input_size,
            image_format=pb.IMAGE_FORMAT_RAW,
            weights=pb.Components(**dict(weights or {})),
            threshold=threshold,
        )

    def _call(self, rpc: Callable[..., T], request: Any, timeout: float | None) -> T:
        """One unary call with an overall deadline; retries UNAVAILABLE with backoff."""
        rid = uuid.uuid4().hex[:16]
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise OutlierClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", rid)
                return rpc(request, timeout=remaining, metadata=(("x-request-id", rid), *self._auth))
            except grpc.RpcError as e:
                code = e.code()
                pause = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
                if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries or (
                    time.monotonic() + pause >= deadline
                ):
                    raise OutlierClientError(code, e.details() or "", rid) from e
                logger.info("%s: UNAVAILABLE (%s); retry %d in %.2f s", rid, e.details(), attempt + 1, pause)
                time.sleep(pause)
                attempt += 1

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> OutlierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
