"""Inpainting helpers: mask handling, mask geometry and compositing. Numpy + Pillow.

Masks follow the image geometry of the model's :class:`~service.runtime.preprocess.ImageSpec`
(:func:`mask_to_model`, :func:`mask_to_input`), so a fill lands exactly where the model saw
the masked pixels, whatever the resize policy.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from vaegan.service.runtime.errors import InvalidInput
from vaegan.service.runtime.preprocess import (
    ImageLike,
    ImageSpec,
    decode_image,
    fit_to_spec,
    frame_to_input,
)

__all__ = [
    "border_offset",
    "seam_correction",
    "hole_start",
    "dilate",
    "mask_to_input",
    "mask_to_model",
    "prepare_mask",
]


def prepare_mask(src: ImageLike, shape: tuple[int, int], where: str) -> np.ndarray:
    """Any image-like mask -> bool (H, W), non-zero = fill; must match the image's (H, W).
    Boolean arrays are taken as they are (True = fill)."""
    if isinstance(src, np.ndarray) and src.dtype == np.bool_:
        src = src.astype(np.uint8)
    m = decode_image(src, where=where)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != shape:
        raise InvalidInput(f"{where}: mask shape {m.shape} does not match image shape {shape}")
    return m > 0


def mask_to_model(mask: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """bool (h, w) at an input's size -> bool (spec.height, spec.width) in the model frame, with
    the geometry :func:`~service.runtime.preprocess.to_model_size` gives the image. Any covered
    pixel stays covered (area resize > 0); letterbox padding and cropped-away parts are False."""
    if mask.shape == (spec.height, spec.width):
        return mask.astype(bool, copy=True)
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(fit_to_spec(im, spec, Image.Resampling.BOX)) > 0


def mask_to_input(mask: np.ndarray, h: int, w: int, spec: ImageSpec) -> np.ndarray:
    """bool (spec.height, spec.width) in the model frame -> bool (h, w) over an h x w input:
    the inverse of :func:`mask_to_model`. Only the input pixels the model saw can be covered
    (:func:`~service.runtime.preprocess.input_region`); letterbox padding is ignored."""
    part, (t, left, bh, bw) = frame_to_input(mask.astype(np.uint8) * 255, h, w, spec, Image.Resampling.BOX)
    out = np.zeros((h, w), bool)
    out[t : t + bh, left : left + bw] = part > 0
    return out


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation of bool (..., H, W) with a (2r+1)^2 square."""
    out = mask.copy()
    h, w = mask.shape[-2:]
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            src = mask[..., max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
            out[..., max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)] |= src
    return out


def hole_start(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A normalized batch (N, C, H, W) with its holes (bool (N, H, W), True = hole) set to 0,
    the normalization mean: exactly what training feeds the encoder for a masked image
    (``trainer.step.masked_input``), so the model meets holes as it learned them. (Starting the
    holes at the data's mean instead, as before, cost 0.4-1.4 dB of hole PSNR on MNIST.)"""
    return x * (1.0 - mask[:, None].astype(x.dtype))


def border_offset(x: np.ndarray, gen: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-image, per-channel mean of (x - gen) on the ring just outside each hole.

    x, gen: float (N, C, H, W); mask: bool (N, H, W). Adding the offset to the generated fill
    matches its brightness to the surroundings, so the seam does not show.
    """
    ring = dilate(mask, 2) & ~mask  # (N, H, W)
    diff = (x - gen) * ring[:, None]
    count = ring.sum(axis=(1, 2))[:, None]  # (N, 1)
    off = diff.sum(axis=(2, 3)) / np.maximum(count, 1)  # (N, C)
    off[count[:, 0] == 0] = 0.0
    return off[:, :, None, None].astype(np.float32)


def seam_correction(x: np.ndarray, gen: np.ndarray, mask: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Poisson blending of a fill: the smooth (harmonic) correction ``u`` inside each hole that
    takes the values of ``x - gen`` on the known pixels around it, so ``gen + u`` meets the
    surroundings without a seam while keeping ``gen``'s own gradients (Perez et al. 2003, with
    the generated image as the guidance field).

    x, gen: float (N, C, H, W); mask: bool (N, H, W), True = hole. Solved by Jacobi iterations
    started from :func:`border_offset` (the mean mismatch around the hole), the image's edges
    mirrored. On MNIST the hole PSNR stops changing after 15 iterations (20 by default).
    Returns u (N, C, H, W) float32, zero outside the holes.
    """
    m = np.broadcast_to(mask[:, None], x.shape)  # (N, C, H, W)
    d = (x - gen).astype(np.float32)
    u = np.where(m, border_offset(x, gen, mask), d).astype(np.float32)
    n, c, h, w = u.shape
    p = np.empty((n, c, h + 2, w + 2), np.float32)
    for _ in range(iterations):
        p[:, :, 1:-1, 1:-1] = u
        p[:, :, 0, 1:-1], p[:, :, -1, 1:-1] = u[:, :, 0], u[:, :, -1]
        p[:, :, :, 0], p[:, :, :, -1] = p[:, :, :, 1], p[:, :, :, -2]
        avg = 0.25 * (p[:, :, :-2, 1:-1] + p[:, :, 2:, 1:-1] + p[:, :, 1:-1, :-2] + p[:, :, 1:-1, 2:])
        np.copyto(u, avg, where=m)
    u[~m] = 0.0
    return u
