"""Image decoding, geometry and normalization, shared by training and serving.

Training reads its datasets through :func:`to_model_size`, so the service preprocesses every
image exactly as the model saw them. Numpy and Pillow only.

Decoding rules (:func:`decode_image`), the same for files, bytes, PIL images and arrays:

* EXIF orientation is applied first, so an image comes out the way a viewer shows it.
* 8-bit grey (``L``) and RGB are taken as they are; ``1`` (bilevel) becomes 0 / 255.
* 16-bit grey (``I;16``, ``I;16B``, ``I;16L``) and uint16 arrays: ``round(v / 257)``, so 65535
  is 255 and mid-grey stays mid-grey. 32-bit integer images (``I``) are read the same way, as
  16-bit intensities (values are clipped to 0..65535 first).
* Floating point: arrays are taken as [0, 1]; a Pillow ``F`` image is taken as [0, 1] when its
  largest value is at most 1, else as [0, 255]. Values are clipped; NaN or inf is an error.
* Transparency (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour, (H, W, 4) arrays) is
  composited on black, as a viewer shows it on a black background; premultiplied ``RGBa`` and
  ``La`` already are.
* Palette images decode to RGB, or to grey when every palette colour is a grey.
* ``CMYK``, ``YCbCr``, ``HSV`` and ``LAB`` are converted to RGB with Pillow's conversions.

Geometry (:class:`ImageSpec` ``resize``): ``letterbox`` scales the whole image to fit inside
the model frame and pads the rest with black; ``resize`` stretches it; ``center_crop`` scales
the shorter side to fit and crops the centre. :func:`model_region`, :func:`input_region` and
:func:`map_to_input` relate model-frame pixels to input pixels for every policy.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vaegan.service.runtime.errors import InvalidInput

__all__ = [
    "CONVERSIONS",
    "DEFAULT_IMAGE_FORMATS",
    "GREY_MODES",
    "LEGACY_RESIZE",
    "RESIZE_POLICIES",
    "Box",
    "ImageLike",
    "ImageSpec",
    "Prepared",
    "decode_image",
    "denormalize",
    "fit_to_spec",
    "frame_to_input",
    "input_region",
    "is_grey_image",
    "map_to_input",
    "match_channels",
    "model_region",
    "normalize",
    "prepare_batch",
    "prepare_inputs",
    "to_channels",
    "to_model_size",
]

logger = logging.getLogger(__name__)

# "letterbox": fit the whole image, pad with black; "resize": stretch; "center_crop": fill the
# frame, crop the centre. The first one is the default for new specs.
RESIZE_POLICIES = ("letterbox", "resize", "center_crop")
# the policy of manifests written before the policy was stored
LEGACY_RESIZE = "center_crop"
# how an image's channels were matched to the model's: as is, grey copied to RGB, RGB to luma
CONVERSIONS = ("", "grey->rgb", "rgb->grey")
# the image formats a server decodes by default (Pillow format names): common, well-fuzzed decoders
# only, never EPS (Ghostscript), PDF or the long tail of Pillow's ~40 plugins
DEFAULT_IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Pillow modes that decode to a grey (H, W) array (palette images: when all colours are grey)
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})

ImageLike = Union[np.ndarray, Image.Image, str, Path, bytes]  # noqa: UP007 - a runtime alias
Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels

_ORIENTATION = 0x0112  # the EXIF Orientation tag
_warned: set[str] = set()  # channel conversions already logged by this process


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects; stored in the bundle manifest under ``image``."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))
    # how other sizes are fitted, one of RESIZE_POLICIES (see the module docstring)
    resize: str = "letterbox"
    # training-data mean in [0, 1], recorded for reference (holes start at the normalization
    # mean, as training marks them: service.runtime.inpaint.hole_start)
    fill: tuple[float, ...] = field(default=(0.5,))

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {self.resize!r}")
        for name in ("mean", "std", "fill"):
            v = tuple(float(a) for a in getattr(self, name))
            if len(v) == 1:
                v = v * self.channels
            if len(v) != self.channels:
                raise ValueError(f"{name} needs {self.channels} values, got {len(v)}")
            object.__setattr__(self, name, v)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "fill": list(self.fill),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        """The inverse of :meth:`to_dict`; a dict without ``resize`` (an older manifest) gets
        :data:`LEGACY_RESIZE`, the policy its model was trained with."""
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resize=str(d.get("resize", LEGACY_RESIZE)),
            fill=tuple(d.get("fill", (0.5,))),
        )


# ---- decoding ---------------------------------------------------------------------------
def decode_image(src: ImageLike, where: str = "image", formats: Sequence[str] | None = None) -> np.ndarray:
    """Any supported input -> uint8 array (H, W) or (H, W, 3). ``where`` names it in errors.

    See the module docstring for how modes, bit depths, alpha and EXIF orientation are read.
    ``formats``: the Pillow format names accepted for bytes and files (None: all Pillow has).
    Any decoder failure is an :class:`InvalidInput` naming the image (Pillow's plugins raise
    many unrelated types); only a decompression bomb passes through as Pillow's own error.
    """
    if isinstance(src, np.ndarray):
        arr = src
    elif isinstance(src, Image.Image):
        arr = _decoded(lambda: _pil_to_array(src), f"{where}: cannot decode image")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        arr = _decoded(lambda: _open_array(io.BytesIO(bytes(src)), formats), f"{where}: cannot decode image bytes", formats)
    elif isinstance(src, (str, Path)):
        if not Path(src).exists():
            raise InvalidInput(f"{where}: no such file {src}")
        arr = _decoded(lambda: _open_array(src, formats), f"{where}: cannot decode {src}", formats)
    else:
        raise InvalidInput(f"{where}: unsupported image type {type(src).__name__}")
    return _check_array(arr, where)


def _open_array(fp: Any, formats: Sequence[str] | None) -> np.ndarray:
    with Image.open(fp, formats=None if formats is None else list(formats)) as im:
        return _pil_to_array(im)


def _decoded(read: Any, message: str, formats: Sequence[str] | None = None) -> np.ndarray:
    """Run a decode, turning every decoder failure into one InvalidInput."""
    try:
        arr: np.ndarray = read()
        return arr
    except Image.DecompressionBombError:
        raise
    except UnidentifiedImageError as e:
        if formats is not None:
            raise InvalidInput(f"{message} (not an image in an accepted format: {', '.join(formats)})") from e
        raise InvalidInput(f"{message} ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"{message} ({e})") from e
    except Exception as e:  # noqa: BLE001 - plugins raise NotImplementedError, struct.error, ...
        raise InvalidInput(f"{message} ({type(e).__name__}: {e})") from e


def _upright(im: Image.Image) -> Image.Image:
    """The image as a viewer shows it: its EXIF orientation applied (a no-op without one)."""
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError):  # unreadable EXIF: take the pixels as stored
        return im
    if orientation not in range(2, 9):
        return im
    return ImageOps.exif_transpose(im)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    """A PIL image -> uint8 (H, W) or (H, W, 3), by the rules of the module docstring."""
    im = _upright(im)
    mode = im.mode
    if mode in ("L", "RGB"):
        return np.asarray(im)
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode == "I" or mode.startswith("I;16"):
        return _from_16bit(np.asarray(im))
    if mode == "F":
        values = np.asarray(im)
        return _from_float(values, _float_range(values))
    if mode in ("LA", "RGBA"):
        a = np.asarray(im)
        out = _composite(a[:, :, :-1], a[:, :, -1])
        return out[:, :, 0] if mode == "LA" else out
    if mode == "La":  # premultiplied: already composited on black
        return np.ascontiguousarray(np.asarray(im)[:, :, 0])
    if mode == "RGBa":
        return np.ascontiguousarray(np.asarray(im)[:, :, :3])
    if mode in ("P", "PA"):
        return _palette_to_array(im)
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, HSV, LAB; ValueError if unsupported


def _palette_to_array(im: Image.Image) -> np.ndarray:
    if im.mode == "PA" or "transparency" in im.info:
        a = np.asarray(im.convert("RGBA"))
        out = _composite(a[:, :, :3], a[:, :, 3])
    else:
        out = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(out[:, :, 0]) if is_grey_image(im) else out


def is_grey_image(im: Image.Image) -> bool:
    """True when :func:`decode_image` gives this image as grey (H, W): a mode in
    :data:`GREY_MODES`, or a palette whose colours are all greys. Reads the header only
    (and the palette of palette images)."""
    if im.mode in GREY_MODES:
        return True
    if im.mode not in ("P", "PA"):
        return False
    palette = np.asarray(im.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    return palette.size > 0 and bool((palette == palette[:, :1]).all())


def _composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) over black with uint8 alpha (H, W): round(color * alpha / 255)."""
    out = (color.astype(np.uint16) * alpha[:, :, None].astype(np.uint16) + 127) // 255
    return out.astype(np.uint8)


def _from_16bit(arr: np.ndarray) -> np.ndarray:
    """16-bit intensities (any integer dtype, clipped to 0..65535) -> uint8, round(v / 257)."""
    v = np.clip(arr.astype(np.int64, copy=False), 0, 65535)
    return ((v + 128) // 257).astype(np.uint8)


def _float_range(arr: np.ndarray) -> float:
    """The full-scale value of a Pillow ``F`` image: 1.0 if its largest value is <= 1, else 255."""
    finite = arr[np.isfinite(arr)]
    return 1.0 if finite.size == 0 or float(finite.max()) <= 1.0 else 255.0


def _from_float(arr: np.ndarray, full_scale: float) -> np.ndarray:
    """Floats with ``full_scale`` (1 or 255) as white -> uint8, rounded and clipped."""
    if not np.all(np.isfinite(arr)):
        raise ValueError("contains NaN or infinite values")
    scaled = arr * 255.0 if full_scale == 1.0 else arr
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidInput(
            f"{where}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInput(f"{where}: empty image of shape {arr.shape}")
    arr = _to_uint8(arr, where)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = _composite(arr[:, :, :3], arr[:, :, 3])
    return arr


def _to_uint8(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; uint16 as 16-bit; other integers clipped to 0..255; floats as [0, 1]."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise InvalidInput(f"{where}: contains NaN or infinite values")
        return _from_float(arr, 1.0)
    if arr.dtype == np.uint16:
        return _from_16bit(arr)
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, 255).astype(np.uint8)
    raise InvalidInput(f"{where}: unsupported dtype {arr.dtype}")


# ---- channels ---------------------------------------------------------------------------
def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) -> (H, W, channels)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if channels == 1:
        if arr.ndim == 3:  # ITU-R 601-2 luma, as Pillow's convert("L")
            arr = np.rint(arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114]))
            arr = arr.astype(np.uint8)
        return arr[:, :, None]
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def match_channels(arr: np.ndarray, channels: int, where: str = "image") -> tuple[np.ndarray, str]:
    """A decoded image -> (uint8 (H, W, channels), conversion), the conversion one of
    :data:`CONVERSIONS`. A grey image for an RGB model or an RGB image for a grey model is
    converted (:func:`to_channels`) and logged as a warning, once per process and direction."""
    grey = arr.ndim == 2 or arr.shape[2] == 1
    kind = "grey->rgb" if grey and channels == 3 else "rgb->grey" if not grey and channels == 1 else ""
    if kind and kind not in _warned:
        _warned.add(kind)
        logger.warning(
            "%s: %s image converted for this %s model (%s; logged once per process, every "
            "image's conversion is reported with its score)",
            where, "a grey" if grey else "an RGB", "RGB" if channels == 3 else "grey", kind,
        )
    return to_channels(arr, channels), kind


# ---- geometry ---------------------------------------------------------------------------
def _layout(h: int, w: int, spec: ImageSpec) -> tuple[int, int, int, int]:
    """(nh, nw, top, left): the size an h x w input is resized to, and the offset of the
    model frame inside it (``center_crop``) or of it inside the model frame (``letterbox``)."""
    fh, fw = spec.height, spec.width
    if spec.resize == "resize":
        return fh, fw, 0, 0
    if spec.resize == "center_crop":
        scale = max(fh / h, fw / w)
        nh, nw = max(fh, round(h * scale)), max(fw, round(w * scale))
        return nh, nw, (nh - fh) // 2, (nw - fw) // 2
    scale = min(fh / h, fw / w)
    nh, nw = min(fh, max(1, round(h * scale))), min(fw, max(1, round(w * scale)))
    return nh, nw, (fh - nh) // 2, (fw - nw) // 2


def model_region(h: int, w: int, spec: ImageSpec) -> Box:
    """Where an h x w input lands in the model frame, (top, left, height, width) in model
    pixels: the un-padded box for ``letterbox``, the whole frame for the other policies."""
    if spec.resize != "letterbox":
        return 0, 0, spec.height, spec.width
    nh, nw, top, left = _layout(h, w, spec)
    return top, left, nh, nw


def input_region(h: int, w: int, spec: ImageSpec) -> Box:
    """The part of an h x w input the model frame shows, (top, left, height, width) in input
    pixels: the centre box for ``center_crop``, the whole input for the other policies."""
    if spec.resize != "center_crop":
        return 0, 0, h, w
    nh, nw, top, left = _layout(h, w, spec)
    t, b = round(top * h / nh), round((top + spec.height) * h / nh)
    left_in, right_in = round(left * w / nw), round((left + spec.width) * w / nw)
    t, left_in = min(max(0, t), h - 1), min(max(0, left_in), w - 1)
    return t, left_in, max(1, min(h, b) - t), max(1, min(w, right_in) - left_in)


def fit_to_spec(
    im: Image.Image, spec: ImageSpec, resample: Image.Resampling = Image.Resampling.BILINEAR
) -> Image.Image:
    """A PIL image of any size -> spec.height x spec.width by the spec's policy, with
    ``resample``; letterbox padding is 0. Images (bilinear) and masks (nearest or box) share
    this one geometry."""
    fh, fw = spec.height, spec.width
    if spec.resize == "resize":
        return im.resize((fw, fh), resample)
    nh, nw, top, left = _layout(im.height, im.width, spec)
    resized = im.resize((nw, nh), resample, reducing_gap=None)
    if spec.resize == "center_crop":
        return resized.crop((left, top, left + fw, top + fh))
    if (nh, nw) == (fh, fw):
        return resized
    canvas = Image.new(im.mode, (fw, fh), 0)
    canvas.paste(resized, (left, top))
    return canvas


def to_model_size(arr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 (spec.height, spec.width, spec.channels)."""
    arr = to_channels(arr, spec.channels)
    if arr.shape[:2] == (spec.height, spec.width):
        return np.ascontiguousarray(arr)
    im = Image.fromarray(arr[:, :, 0] if spec.channels == 1 else arr)
    out = np.asarray(fit_to_spec(im, spec))
    return out[:, :, None] if out.ndim == 2 else out


def frame_to_input(
    arr: np.ndarray,
    h: int,
    w: int,
    spec: ImageSpec,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> tuple[np.ndarray, Box]:
    """A model-frame picture -> (its content over the input's :func:`input_region`, that region).

    ``arr`` is uint8 (H, W), (H, W, 1) or (H, W, 3), or float32 (H, W), at model size. The
    part of it that shows the input (:func:`model_region`) is resized to the input region's
    size with ``resample``; the result keeps ``arr``'s dtype and channel axis.
    """
    mt, ml, mh, mw = model_region(h, w, spec)
    box = input_region(h, w, spec)
    squeeze = arr.ndim == 3 and arr.shape[2] == 1
    part = arr[mt : mt + mh, ml : ml + mw]
    if (mh, mw) != box[2:]:
        im = Image.fromarray(np.ascontiguousarray(part[:, :, 0] if squeeze else part))
        part = np.asarray(im.resize((box[3], box[2]), resample, reducing_gap=None))
        part = part[:, :, None] if squeeze else part
    return part, box


def map_to_input(map2d: np.ndarray, h: int, w: int, spec: ImageSpec) -> np.ndarray:
    """An anomaly map float32 (H, W) at model size -> float32 (h, w) over an h x w input.

    Letterbox padding is cut away and the rest resized (bilinear) to the input; for
    ``center_crop`` the map fills the centre box the model saw and the uncovered border,
    which the model never scored, is 0.0.
    """
    part, (t, left, bh, bw) = frame_to_input(np.asarray(map2d, np.float32), h, w, spec)
    if (bh, bw) == (h, w):
        return np.array(part, np.float32)
    out = np.zeros((h, w), np.float32)
    out[t : t + bh, left : left + bw] = part
    return out


# ---- batches ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """A batch at model size and what each image was before."""

    batch: np.ndarray  # uint8 (N, H, W, C) at model size
    sizes: np.ndarray  # int64 (N, 2): each input's (height, width) as decoded
    conversions: list[str]  # per image, one of CONVERSIONS

    @classmethod
    def at_model_size(cls, batch: np.ndarray) -> Prepared:
        """A batch whose inputs already were at model size and channels."""
        n, h, w = batch.shape[:3]
        return cls(batch, np.tile(np.array([h, w], np.int64), (n, 1)), [""] * n)


def _model_sized(images: Sequence[ImageLike] | np.ndarray, spec: ImageSpec) -> np.ndarray | None:
    """The fast path: a uint8 batch array already at model size and channels, as it is."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or len(images) == 0:
        return None
    frame = (spec.height, spec.width)
    if images.ndim == 4 and images.shape[1:] == (*frame, spec.channels):
        return np.ascontiguousarray(images)
    if spec.channels == 1 and images.ndim == 3 and images.shape[1:] == frame:
        return np.ascontiguousarray(images[:, :, :, None])
    return None


def _as_list(images: Sequence[ImageLike] | np.ndarray) -> Sequence[ImageLike]:
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            return [images]
        if images.ndim in (3, 4):
            return list(images)
        raise InvalidInput(f"images: expected a batch array (N, H, W[, C]), got {images.shape}")
    return images


def prepare_inputs(images: Sequence[ImageLike] | np.ndarray, spec: ImageSpec) -> Prepared:
    """Decode, match channels and fit a batch to the model, keeping each input's size.

    A numpy array with a leading batch axis ((N, H, W) or (N, H, W, C)) counts as N images; a
    uint8 batch already at model size is taken as it is.
    """
    fast = _model_sized(images, spec)
    if fast is not None:
        return Prepared.at_model_size(fast)
    items = _as_list(images)
    if len(items) == 0:
        raise InvalidInput("images: the batch is empty")
    batch = np.empty((len(items), spec.height, spec.width, spec.channels), np.uint8)
    sizes = np.empty((len(items), 2), np.int64)
    conversions = []
    for i, img in enumerate(items):
        arr = decode_image(img, where=f"image {i}")
        sizes[i] = arr.shape[:2]
        arr, kind = match_channels(arr, spec.channels, where=f"image {i}")
        batch[i] = to_model_size(arr, spec)
        conversions.append(kind)
    return Prepared(batch, sizes, conversions)


def prepare_batch(images: Sequence[ImageLike] | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Decode and resize a batch -> uint8 (N, H, W, C) at model size (see :func:`prepare_inputs`)."""
    return prepare_inputs(images, spec).batch


def normalize(batch: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), (x / 255 - mean) / std."""
    scaled = batch.astype(np.float32) / np.float32(255.0)
    x: np.ndarray = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)


def denormalize(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """float32 (N, C, H, W) -> uint8 (N, H, W, C); inverse of :func:`normalize`."""
    x = x.transpose(0, 2, 3, 1) * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
