"""Image decoding, resizing and normalization, shared by training and serving.

Training reads its datasets through :func:`prepare_batch`, so the service preprocesses every
image exactly as the model saw them. Numpy and Pillow only.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.runtime.errors import InvalidInput

__all__ = [
    "RESIZE_POLICIES",
    "ImageLike",
    "ImageSpec",
    "decode_image",
    "denormalize",
    "normalize",
    "prepare_batch",
    "to_channels",
    "to_model_size",
]

RESIZE_POLICIES = ("resize", "center_crop")

ImageLike = Union[np.ndarray, Image.Image, str, Path, bytes]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects; stored in the bundle manifest under ``image``."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...] = field(default=(0.5,))
    std: tuple[float, ...] = field(default=(0.5,))
    # "resize": stretch to height x width; "center_crop": scale the shorter side, crop the centre
    resize: str = "center_crop"
    fill: tuple[float, ...] = field(default=(0.5,))  # training-data mean in [0, 1]: hole start

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
        return cls(
            channels=int(d["channels"]),
            height=int(d["height"]),
            width=int(d["width"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            resize=str(d.get("resize", "center_crop")),
            fill=tuple(d.get("fill", (0.5,))),
        )


def decode_image(src: ImageLike, where: str = "image") -> np.ndarray:
    """Any supported input -> uint8 array (H, W) or (H, W, C). ``where`` names it in errors."""
    if isinstance(src, np.ndarray):
        arr = src
    elif isinstance(src, Image.Image):
        arr = _pil_to_array(src)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(src))) as im:
                arr = _pil_to_array(im)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InvalidInput(f"{where}: cannot decode image bytes ({e})") from e
    elif isinstance(src, (str, Path)):
        try:
            with Image.open(src) as im:
                arr = _pil_to_array(im)
        except FileNotFoundError as e:
            raise InvalidInput(f"{where}: no such file {src}") from e
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InvalidInput(f"{where}: cannot decode {src} ({e})") from e
    else:
        raise InvalidInput(f"{where}: unsupported image type {type(src).__name__}")
    return _check_array(arr, where)


def _pil_to_array(im: Image.Image) -> np.ndarray:
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB") if im.mode in ("RGBA", "P", "CMYK", "YCbCr", "LA") else im.convert("L")
    return np.asarray(im)


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InvalidInput(
            f"{where}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {arr.shape}"
        )
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidInput(f"{where}: empty image of shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise InvalidInput(f"{where}: unsupported dtype {arr.dtype}")
        if np.issubdtype(arr.dtype, np.floating):
            if not np.all(np.isfinite(arr)):
                raise InvalidInput(f"{where}: contains NaN or infinite values")
            # floats are taken as [0, 1] intensities
            arr = np.clip(np.rint(arr * 255.0), 0, 255)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


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


def to_model_size(arr: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 (spec.height, spec.width, spec.channels)."""
    arr = to_channels(arr, spec.channels)
    h, w = arr.shape[:2]
    if (h, w) == (spec.height, spec.width):
        return np.ascontiguousarray(arr)
    im = Image.fromarray(arr[:, :, 0] if spec.channels == 1 else arr)
    if spec.resize == "center_crop":
        scale = max(spec.height / h, spec.width / w)
        nh, nw = max(spec.height, round(h * scale)), max(spec.width, round(w * scale))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=None)
        top, left = (nh - spec.height) // 2, (nw - spec.width) // 2
        im = im.crop((left, top, left + spec.width, top + spec.height))
    else:
        im = im.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    out = np.asarray(im)
    return out[:, :, None] if out.ndim == 2 else out


def prepare_batch(images: Sequence[ImageLike] | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Decode and resize a batch -> uint8 (N, H, W, C) at model size.

    A numpy array with a leading batch axis ((N, H, W) or (N, H, W, C)) counts as N images.
    """
    if isinstance(images, np.ndarray):
        if images.ndim == 2:
            images = [images]
        elif images.ndim in (3, 4):
            images = list(images)
        else:
            raise InvalidInput(f"images: expected a batch array (N, H, W[, C]), got {images.shape}")
    if len(images) == 0:
        raise InvalidInput("images: the batch is empty")
    out = np.empty((len(images), spec.height, spec.width, spec.channels), np.uint8)
    for i, img in enumerate(images):
        out[i] = to_model_size(decode_image(img, where=f"image {i}"), spec)
    return out


def normalize(batch: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W), (x / 255 - mean) / std."""
    scaled = batch.astype(np.float32) / np.float32(255.0)
    x: np.ndarray = (scaled - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, C, H, W)


def denormalize(x: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """float32 (N, C, H, W) -> uint8 (N, H, W, C); inverse of :func:`normalize`."""
    x = x.transpose(0, 2, 3, 1) * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
