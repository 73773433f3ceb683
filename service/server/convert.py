"""Protobuf messages <-> runtime inputs and results: the server's one conversion module.

Inputs are validated here, each problem raised as a ServiceError naming the image index and
id: ``InvalidInput`` (bad bytes, shapes, dtypes, NaN, mask mismatch, empty request) or
``ResourceExhausted`` (too many images, too many pixels). Decoding follows the runtime's own
:func:`~service.runtime.preprocess.decode_image` / ``to_model_size`` / ``normalize``, so a
served image is preprocessed exactly as :meth:`Runtime.preprocess` would.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from vaegan.protos.vaegan.v1 import outlier_service_pb2 as pb
from vaegan.service.runtime import InvalidInput, ResourceExhausted, Runtime, ScoreResult, generative
from vaegan.service.runtime.preprocess import (
    DEFAULT_IMAGE_FORMATS,
    ImageSpec,
    Prepared,
    decode_image,
    match_channels,
    to_model_size,
)
from vaegan.service.runtime.scoring import ALL_COMPONENTS, Calibration, map_to_uint8
from vaegan.service.runtime.scoring import map_full_scale as full_scale
from vaegan.service.server.codec import array_to_png, array_to_tensor, tensor_to_array
from vaegan.service.server.config import ServiceConfig

__all__ = [
    "ENDS",
    "MAX_ID_BYTES",
    "Abandoned",
    "InterpolateArgs",
    "Limits",
    "PixelBudget",
    "SampleArgs",
    "ScoreOptions",
    "check_count",
    "check_ids",
    "decode_ends",
    "decode_images",
    "declared_end_pixels",
    "declared_pixels",
    "check_response_size",
    "decode_masks",
    "full_scale",
    "images_floor_bytes",
    "inpaint_response",
    "interpolate_args",
    "interpolate_response",
    "model_batch",
    "model_info",
    "model_inputs",
    "name_image",
    "raw_model_batch",
    "request_classes",
    "response_floor_bytes",
    "sample_args",
    "sample_response",
    "score_options",
    "score_response",
]


@dataclass(frozen=True)
class Limits:
    """Per-request input limits (from the ServiceConfig)."""

    max_images: int
    max_pixels: int
    formats: tuple[str, ...] | None = DEFAULT_IMAGE_FORMATS  # Pillow format names; None: all
    max_request_pixels: int = 64 << 20  # decoded pixels of all images (and masks) of one request


class PixelBudget:
    """The pixels one request may still decode (``--max-request-pixels``), spent from each
    image's header before it is decoded: a request's decoded originals never exceed it."""

    def __init__(self, limits: Limits) -> None:
        self.limit = limits.max_request_pixels
        self.spent = 0

    def spend(self, h: int, w: int, where: str) -> None:
        self.spent += h * w
        if self.spent > self.limit:
            raise ResourceExhausted(
                f"{where}: the request's images add up to more than {self.limit} pixels "
                f"(--max-request-pixels); send fewer or smaller images per request"
            )


@dataclass(frozen=True)
class ScoreOptions:
    """A validated ``vaegan.v1.ScoreOptions``."""

    anomaly_map: bool = False
    map_at_input: bool = False  # anomaly maps at each input's size instead of the model's
    reconstruction: bool = False
    repaired: bool = False
    image_format: int = pb.IMAGE_FORMAT_PNG
    weights: dict[str, float] | None = None  # only the overridden components
    threshold: float | None = None

    @property
    def default_scoring(self) -> bool:
        """True when the batch's default-option scores can be used as they are."""
        return self.weights is None and self.threshold is None and not self.reconstruction

    @property
    def pictures(self) -> bool:
        return self.anomaly_map or self.reconstruction or self.repaired


MAX_ID_BYTES = 256  # longer image ids are refused: they are echoed into logs and errors


def name_image(i: int | None, image_id: str, what: str = "image") -> str:
    """How errors name an image: ``image 3 (id 'cat.png')``; a long id is cut to 64 characters.
    ``i`` None: a single image field, named by ``what`` alone (``a (id 'cat.png')``)."""
    name = what if i is None else f"{what} {i}"
    if not image_id:
        return name
    shown = image_id if len(image_id) <= 64 else image_id[:61] + "..."
    return f"{name} (id {shown!r})"


def check_ids(images: Sequence[pb.Image], what: str = "image") -> None:
    """Every image id at most :data:`MAX_ID_BYTES` bytes (UTF-8)."""
    for i, img in enumerate(images):
        size = len(img.id.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise InvalidInput(f"{name_image(i, img.id, what)}: the id is {size} bytes; at most {MAX_ID_BYTES}")


def _check_class(class_id: int, rt: Runtime, where: str) -> int:
    """A request's class id for ``rt``'s model: INVALID_ARGUMENT naming ``where`` when the model
    is not conditional or the id is out of range."""
    k = rt.num_classes
    if k == 0:
        raise InvalidInput(f"{where}: class_id is set, but this model is not conditional (trained without "
                           "--conditional); leave class_id unset")
    if not 0 <= class_id < k:
        raise InvalidInput(f"{where}: class_id {class_id} is out of range; this model has classes 0..{k - 1}")
    return class_id


def request_classes(images: Sequence[pb.Image], rt: Runtime, what: str = "image") -> np.ndarray | None:
    """The images' ``class_id`` fields: int64 (N,), -1 where unset (the best class), or None
    when no image sets one. Errors name the image (see :func:`_check_class`)."""
    if not any(img.HasField("class_id") for img in images):
        return None
    return np.array([
        _check_class(img.class_id, rt, name_image(i, img.id, what)) if img.HasField("class_id") else -1
        for i, img in enumerate(images)
    ], np.int64)


def _format(fmt: int, where: str) -> int:
    if fmt == pb.IMAGE_FORMAT_UNSPECIFIED:
        return pb.IMAGE_FORMAT_PNG
    if fmt not in (pb.IMAGE_FORMAT_PNG, pb.IMAGE_FORMAT_RAW):
        raise InvalidInput(f"{where}: unknown image_format {fmt}")
    return fmt


def score_options(opts: pb.ScoreOptions) -> ScoreOptions:
    """Validate the options: finite weights and threshold, a known image format."""
    weights = {k: getattr(opts.weights, k) for k in ALL_COMPONENTS if opts.weights.HasField(k)}
    bad = [k for k, v in weights.items() if not math.isfinite(v)]
    if bad:
        raise InvalidInput(f"options.weights: {bad} must be finite")
    threshold = opts.threshold if opts.HasField("threshold") else None
    if threshold is not None and not math.isfinite(threshold):
        raise InvalidInput(f"options.threshold must be finite, got {threshold}")
    return ScoreOptions(
        anomaly_map=opts.return_anomaly_map,
        map_at_input=opts.anomaly_map_input_size,
        reconstruction=opts.return_reconstruction,
        repaired=opts.return_repaired,
        image_format=_format(opts.image_format, "options.image_format"),
        weights=weights or None,
        threshold=threshold,
    )


def check_count(n: int, limits: Limits, what: str = "images") -> None:
    """Empty -> InvalidInput; over ``limits.max_images`` -> ResourceExhausted."""
    if n == 0:
        raise InvalidInput(f"{what}: the request has no images")
    if n > limits.max_images:
        raise ResourceExhausted(
            f"{what}: {n} images in one request, the limit is {limits.max_images} "
            "(--max-images-per-request)"
        )


def _check_pixels(h: int, w: int, where: str, limits: Limits, budget: PixelBudget | None = None) -> None:
    if h * w > limits.max_pixels:
        raise ResourceExhausted(
            f"{where}: {h}x{w} = {h * w} pixels, the limit is {limits.max_pixels} (--max-image-pixels)"
        )
    if budget is not None:
        budget.spend(h, w, where)


def _open_encoded(img: pb.Image, where: str, limits: Limits) -> Image.Image:
    """Open encoded bytes with the accepted formats: reads the header only."""
    formats = None if limits.formats is None else list(limits.formats)
    try:
        return Image.open(io.BytesIO(img.encoded), formats=formats)
    except UnidentifiedImageError as e:
        accepted = "a known image format" if formats is None else f"one of the accepted formats: {', '.join(formats)}"
        raise InvalidInput(f"{where}: cannot decode image bytes (not {accepted})") from e
    except Image.DecompressionBombError as e:
        raise ResourceExhausted(f"{where}: too many pixels ({e})") from e
    except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many unrelated types
        raise InvalidInput(f"{where}: cannot decode image bytes ({type(e).__name__}: {e})") from e


def _declared_size(img: pb.Image, where: str, limits: Limits) -> tuple[int, int]:
    """(height, width) as the image says before it is decoded (tensor shape or file header);
    (0, 0) for what decoding will refuse anyway (no data, a bad tensor shape)."""
    kind = img.WhichOneof("data")
    if kind == "tensor":
        shape = list(img.tensor.shape)
        return (shape[0], shape[1]) if len(shape) in (2, 3) and min(shape) > 0 else (0, 0)
    if kind == "encoded":
        with _open_encoded(img, where, limits) as im:
            return im.height, im.width
    return 0, 0


def declared_pixels(
    images: Sequence[pb.Image], limits: Limits, what: str = "image", masks: Sequence[pb.Image] = ()
) -> int:
    """The pixels a request will decode, read from every header before anything is decoded:
    the per-image and per-request limits are enforced here (RESOURCE_EXHAUSTED naming the
    image), and bytes that are no accepted image format are refused (INVALID_ARGUMENT)."""
    if masks and len(masks) != len(images):
        raise InvalidInput(f"masks: got {len(masks)} masks for {len(images)} images")
    budget = PixelBudget(limits)
    named = [(img, name_image(i, img.id, what)) for i, img in enumerate(images)]
    named += [(m, name_image(i, img.id, "mask")) for i, (m, img) in enumerate(zip(masks, images, strict=False))]
    for img, where in named:
        h, w = _declared_size(img, where, limits)
        _check_pixels(h, w, where, limits, budget)
    return budget.spent


def response_floor_bytes(n: int, input_pixels: int, spec: ImageSpec, opts: ScoreOptions) -> int:
    """The fewest bytes the pictures of a Score response will take, known before any work:
    raw tensors have an exact size (PNG sizes are not known in advance: 0). ``input_pixels``:
    height * width of all inputs together."""
    if opts.image_format != pb.IMAGE_FORMAT_RAW or not opts.pictures:
        return 0
    model_pixels = n * spec.height * spec.width
    total = 0
    if opts.anomaly_map:
        total += 4 * (input_pixels if opts.map_at_input else model_pixels)  # float32 maps
    if opts.reconstruction:
        total += model_pixels * spec.channels
    if opts.repaired:
        total += input_pixels * (spec.channels + 1)  # the repaired image and its mask
    return total


def check_response_size(size: int, limit: int, known_before: bool) -> None:
    """RESOURCE_EXHAUSTED when a response of ``size`` bytes cannot be sent (``limit``)."""
    if size > limit:
        when = "would be" if known_before else "is"
        raise ResourceExhausted(
            f"the response {when} {size / 2**20:.1f} MiB, over --max-message-bytes "
            f"({limit / 2**20:.1f} MiB): ask for fewer pictures, PNG instead of raw tensors, "
            "or fewer images per request"
        )


def _decode_one(img: pb.Image, where: str, limits: Limits, budget: PixelBudget | None = None) -> np.ndarray:
    """One Image -> uint8 (H, W) or (H, W, 3) at its own size; size checked before decoding."""
    kind = img.WhichOneof("data")
    if kind == "tensor":
        shape = list(img.tensor.shape)
        if len(shape) in (2, 3) and min(shape) > 0:
            _check_pixels(shape[0], shape[1], where, limits, budget)
        try:
            arr = tensor_to_array(img.tensor)
        except ValueError as e:
            raise InvalidInput(f"{where}: {e}") from e
        return decode_image(arr, where)
    if kind == "encoded":
        with _open_encoded(img, where, limits) as im:
            _check_pixels(im.height, im.width, where, limits, budget)
            try:
                return decode_image(im, where)
            except Image.DecompressionBombError as e:
                raise ResourceExhausted(f"{where}: too many pixels ({e})") from e
            except (InvalidInput, ResourceExhausted):
                raise
            except Exception as e:  # noqa: BLE001 - Pillow's plugins raise many unrelated types
                raise InvalidInput(f"{where}: cannot decode image bytes ({type(e).__name__}: {e})") from e
    raise InvalidInput(f"{where}: no image data (set encoded or tensor)")


class Abandoned(Exception):
    """The call this work was for was cancelled or ran out of time: stop, nobody will read it."""


def _check_abandoned(abandoned: threading.Event | None) -> None:
    if abandoned is not None and abandoned.is_set():
        raise Abandoned


def decode_images(
    images: Sequence[pb.Image], limits: Limits, what: str = "image", budget: PixelBudget | None = None,
    abandoned: threading.Event | None = None,
) -> list[np.ndarray]:
    """Decode every image at its own size: uint8 (H, W) or (H, W, 3) each."""
    check_count(len(images), limits, what + "s")
    check_ids(images, what)
    budget = budget or PixelBudget(limits)
    out: list[np.ndarray] = []
    try:
        for i, img in enumerate(images):
            _check_abandoned(abandoned)  # between images: an abandoned call stops within one decode
            out.append(_decode_one(img, name_image(i, img.id, what), limits, budget))
    except BaseException:
        out.clear()  # a failed request frees its decoded images now, not when a traceback goes
        raise
    return out


def decode_masks(
    masks: Sequence[pb.Image], images: Sequence[pb.Image], decoded: list[np.ndarray], limits: Limits,
    budget: PixelBudget | None = None,
) -> list[np.ndarray]:
    """Decode masks and check each against its image's (H, W)."""
    if len(masks) != len(images):
        raise InvalidInput(f"masks: got {len(masks)} masks for {len(images)} images")
    out = []
    for i, (m, img, arr) in enumerate(zip(masks, images, decoded, strict=True)):
        where = name_image(i, img.id, "mask")
        mask = _decode_one(m, where, limits, budget)
        if mask.shape[:2] != arr.shape[:2]:
            raise InvalidInput(
                f"{where}: mask is {mask.shape[0]}x{mask.shape[1]} but its image is "
                f"{arr.shape[0]}x{arr.shape[1]} (height x width must match)"
            )
        out.append(mask)
    return out


def model_inputs(
    originals: list[np.ndarray], spec: ImageSpec, ids: Sequence[str] = (), abandoned: threading.Event | None = None
) -> Prepared:
    """Decoded images -> the uint8 batch (N, H, W, C) at model size, as Runtime.preprocess
    before :func:`~service.runtime.preprocess.normalize` (which the batcher applies per merged
    batch), with each input's size and channel conversion (logged once per direction)."""
    batch = np.empty((len(originals), spec.height, spec.width, spec.channels), np.uint8)  # (N, H, W, C)
    sizes = np.empty((len(originals), 2), np.int64)
    conversions = []
    for i, arr in enumerate(originals):
        _check_abandoned(abandoned)
        sizes[i] = arr.shape[:2]
        where = name_image(i, ids[i] if i < len(ids) else "")
        matched, kind = match_channels(arr, spec.channels, where)
        batch[i] = to_model_size(matched, spec)
        conversions.append(kind)
    return Prepared(batch, sizes, conversions)


def model_batch(originals: list[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """Decoded images -> uint8 (N, H, W, C) at model size (:func:`model_inputs`' batch)."""
    return model_inputs(originals, spec).batch


def raw_model_batch(images: Sequence[pb.Image], spec: ImageSpec, limits: Limits) -> np.ndarray | None:
    """Fast path: when every image is a raw uint8 tensor already at model size and channels,
    the uint8 batch (N, H, W, C) straight from the bytes, as :func:`model_batch` would give it
    (decoding and resizing would not change them); else None, and :func:`decode_images`
    handles (or rejects) them. A few microseconds per image: cheap enough for the event loop."""
    shape = [spec.height, spec.width, spec.channels]
    nbytes = spec.height * spec.width * spec.channels
    if spec.height * spec.width > limits.max_pixels:
        return None
    data = []
    for img in images:
        t = img.tensor
        if img.WhichOneof("data") != "tensor" or t.dtype != pb.DTYPE_UINT8 or len(t.data) != nbytes:
            return None
        if list(t.shape) != shape and not (spec.channels == 1 and list(t.shape) == shape[:2]):
            return None
        data.append(t.data)
    return np.frombuffer(b"".join(data), np.uint8).reshape(len(data), *shape)  # (N, H, W, C)


def _picture(arr: np.ndarray, fmt: int) -> pb.Image:
    if fmt == pb.IMAGE_FORMAT_RAW:
        return pb.Image(tensor=array_to_tensor(arr))
    return pb.Image(encoded=array_to_png(arr))


def _anomaly_map(amap: np.ndarray, fmt: int, scale: float) -> pb.Image:
    if fmt == pb.IMAGE_FORMAT_RAW:
        return pb.Image(tensor=array_to_tensor(amap))  # float32 (H, W)
    return pb.Image(encoded=array_to_png(map_to_uint8(amap, scale)))  # uint8 (H, W)


def _region(box: np.ndarray) -> pb.Region:
    """(top, left, height, width) -> Region."""
    top, left, height, width = (int(v) for v in box)
    return pb.Region(top=top, left=left, height=height, width=width)


def _anomaly_map_of(res: ScoreResult, i: int, opts: ScoreOptions) -> np.ndarray:
    """Image i's map, float32 at model size or (``map_at_input``) at its input's size."""
    return res.map_at_input(i) if opts.map_at_input else res.anomaly_map[i]


def _mask(mask: np.ndarray, fmt: int) -> pb.Image:
    m = mask.astype(np.uint8)  # (H, W) 1 = filled
    return _picture(m if fmt == pb.IMAGE_FORMAT_RAW else m * 255, fmt)


def score_response(
    ids: Sequence[str],
    res: ScoreResult,
    opts: ScoreOptions,
    spec: ImageSpec,
    repaired: tuple[list[np.ndarray], list[np.ndarray]] | None = None,
    calibration: Calibration | None = None,
) -> pb.ScoreResponse:
    """A ScoreResult (and repairs) -> ScoreResponse, with the pictures the options ask for and
    where each input landed (region, input size, channel conversion)."""
    fmt, scale = opts.image_format, full_scale(spec, calibration)
    results = []
    for i, image_id in enumerate(ids):
        r = pb.ImageScore(
            id=image_id,
            score=float(res.score[i]),
            is_outlier=bool(res.is_outlier[i]),
            tail_probability=float(res.tail_probability[i]),
            threshold=float(res.threshold),
            components=pb.Components(**{k: float(v[i]) for k, v in res.components.items()}),
            region=_region(res.regions[i]),
            input_height=int(res.input_sizes[i][0]),
            input_width=int(res.input_sizes[i][1]),
            conversion=res.conversions[i],
        )
        if res.classes[i] >= 0:  # a conditional model: the class scored against
            r.class_id = int(res.classes[i])
        if opts.anomaly_map:
            r.anomaly_map.CopyFrom(_anomaly_map(_anomaly_map_of(res, i, opts), fmt, scale))
        if opts.reconstruction and res.reconstruction is not None:
            r.reconstruction.CopyFrom(_picture(res.reconstruction[i], fmt))
        if repaired is not None:
            r.repaired.CopyFrom(_picture(repaired[0][i], fmt))
            r.repair_mask.CopyFrom(_mask(repaired[1][i], fmt))
        results.append(r)
    return pb.ScoreResponse(results=results)


def inpaint_response(ids: Sequence[str], filled: list[np.ndarray], fmt: int) -> pb.InpaintResponse:
    """Filled uint8 (H, W, C) images -> InpaintResponse."""
    fmt = _format(fmt, "image_format")
    return pb.InpaintResponse(
        results=[pb.InpaintedImage(id=i, image=_picture(f, fmt)) for i, f in zip(ids, filled, strict=True)]
    )


# ---- Sample and Interpolate ----------------------------------------------------------------
ENDS = ("a", "b")  # the InterpolateRequest fields holding the two images, in path order


@dataclass(frozen=True)
class SampleArgs:
    """A validated ``vaegan.v1.SampleRequest``."""

    n: int
    seed: int  # the request's, or one drawn for it (returned in SampleResponse.seed)
    temperature: float
    image_format: int
    class_id: int | None = None  # a conditional model's class for every image; None: in turn


@dataclass(frozen=True)
class InterpolateArgs:
    """A validated ``vaegan.v1.InterpolateRequest`` (its images are decoded by :func:`decode_ends`)."""

    steps: int
    method: str
    image_format: int
    class_id: int | None = None  # a conditional model's class for the path; None: a's best class


def sample_args(request: pb.SampleRequest, limits: Limits, rt: Runtime) -> SampleArgs:
    """n in 1..1024 (then ``--max-images-per-request``: RESOURCE_EXHAUSTED), a finite
    temperature > 0 (0 = 1.0), a known image format, a class only for a conditional model and
    in its range; an unset seed is drawn here."""
    n = generative.check_n(request.n)
    check_count(n, limits, "n")
    temperature = generative.check_temperature(request.temperature or 1.0)
    class_id = _check_class(request.class_id, rt, "class_id") if request.HasField("class_id") else None
    seed = request.seed if request.HasField("seed") else generative.draw_seed()
    return SampleArgs(n, seed, temperature, _format(request.image_format, "image_format"), class_id)


def interpolate_args(request: pb.InterpolateRequest, limits: Limits, rt: Runtime) -> InterpolateArgs:
    """steps in 2..256 (0 = 8; then ``--max-images-per-request``), method ``linear`` (also
    when empty) or ``slerp``, a known image format, image ids of at most MAX_ID_BYTES, and the
    path's class from ``a.class_id`` or ``b.class_id`` (a conditional model only; both set:
    they must agree)."""
    steps = generative.check_steps(request.steps or generative.DEFAULT_STEPS)
    check_count(steps, limits, "steps")
    method = generative.check_method(request.method or "linear")
    for field in ENDS:
        img = getattr(request, field)
        size = len(img.id.encode("utf-8"))
        if size > MAX_ID_BYTES:
            raise InvalidInput(f"{name_image(None, img.id, field)}: the id is {size} bytes; at most {MAX_ID_BYTES}")
    given = {
        field: _check_class(getattr(request, field).class_id, rt, f"{field}.class_id")
        for field in ENDS if getattr(request, field).HasField("class_id")
    }
    if len(set(given.values())) > 1:
        raise InvalidInput(f"a.class_id {given['a']} and b.class_id {given['b']} differ; a path is decoded in one class")
    class_id = next(iter(given.values()), None)
    return InterpolateArgs(steps, method, _format(request.image_format, "image_format"), class_id)


def declared_end_pixels(request: pb.InterpolateRequest, limits: Limits) -> int:
    """:func:`declared_pixels` of the two images ``a`` and ``b`` (errors name the field)."""
    budget = PixelBudget(limits)
    for field in ENDS:
        img = getattr(request, field)
        where = name_image(None, img.id, field)
        _check_pixels(*_declared_size(img, where, limits), where, limits, budget)
    return budget.spent


def decode_ends(
    request: pb.InterpolateRequest, limits: Limits, abandoned: threading.Event | None = None
) -> list[np.ndarray]:
    """The images ``a`` and ``b`` decoded at their own size: uint8 (H, W) or (H, W, 3) each."""
    budget = PixelBudget(limits)
    out = []
    for field in ENDS:
        _check_abandoned(abandoned)
        img = getattr(request, field)
        out.append(_decode_one(img, name_image(None, img.id, field), limits, budget))
    return out


def images_floor_bytes(n: int, spec: ImageSpec, fmt: int) -> int:
    """The bytes of ``n`` model-size images in a response, known before any work for raw
    tensors (PNG sizes are not known in advance: 0)."""
    return n * spec.height * spec.width * spec.channels if fmt == pb.IMAGE_FORMAT_RAW else 0


def sample_response(images: np.ndarray, fmt: int, seed: int) -> pb.SampleResponse:
    """uint8 (n, H, W, C) samples -> SampleResponse (``fmt``: a validated ImageFormat)."""
    return pb.SampleResponse(images=[_picture(im, fmt) for im in images], seed=seed)


def interpolate_response(images: np.ndarray, fmt: int) -> pb.InterpolateResponse:
    """uint8 (steps, H, W, C) path images -> InterpolateResponse."""
    return pb.InterpolateResponse(images=[_picture(im, fmt) for im in images])


def model_info(rt: Runtime, config: ServiceConfig) -> pb.ModelInfo:
    """What GetModelInfo returns for a loaded runtime under ``config``."""
    spec, b = rt.spec, rt.bundle
    info = pb.ModelInfo(
        name=b.name,
        version=b.version,
        image=pb.ImageShape(channels=spec.channels, height=spec.height, width=spec.width, resize=spec.resize),
        latent_dim=b.latent_dim,
        feature_dim=b.feature_dim,
        providers=list(rt.providers),
        batching=pb.BatchingSettings(
            max_batch_size=config.max_batch_size,
            max_delay_ms=config.max_delay_ms,
            max_images_per_request=config.max_images_per_request,
            max_image_pixels=config.max_image_pixels,
            max_message_bytes=config.max_message_bytes,
        ),
        anomaly_map_full_scale=full_scale(spec, b.calibration),
        class_names=b.class_names,
    )
    cal = b.calibration
    if cal is None:
        info.calibration.calibrated = False
        return info
    c = info.calibration
    c.calibrated = True
    c.n = cal.n
    c.target_fpr = cal.target_fpr
    c.threshold = cal.threshold()
    c.weights.CopyFrom(pb.Components(**cal.weights))
    for k, (mean, std) in cal.stats.items():
        c.components[k].mean, c.components[k].std = mean, std
    c.map_threshold = cal.map_threshold
    return info
