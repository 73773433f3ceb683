"""Pictures from numpy arrays with Pillow: heat maps, input/reconstruction/map grids and tiles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["heatmap", "save_grid", "tile"]

# a small perceptual colormap (dark blue -> red -> yellow), interpolated
_STOPS = np.array([[0, 0, 32], [40, 0, 120], [180, 20, 80], [250, 120, 0], [255, 240, 60]], np.float32)


def heatmap(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """float (H, W) >= 0 -> uint8 (H, W, 3) colour map, scaled to ``vmax`` (default: the max)."""
    v = np.asarray(values, np.float32)
    top = float(vmax if vmax is not None else max(float(v.max()), 1e-8))
    t = np.clip(v / top, 0, 1) * (len(_STOPS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_STOPS) - 2)
    frac = (t - lo)[..., None]
    return np.rint(_STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac).astype(np.uint8)


def tile(images: np.ndarray, cols: int, gutter: int = 2, fill: int = 255) -> np.ndarray:
    """Images uint8 (N, H, W, C) laid out row by row, ``cols`` per row, ``gutter`` pixels apart:
    one uint8 picture (R*H + (R-1)*gutter, cols*W + (cols-1)*gutter, C) with R = ceil(N / cols);
    gutters and empty cells are ``fill``."""
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.full((rows * h + (rows - 1) * gutter, cols * w + (cols - 1) * gutter, c), fill, np.uint8)
    for i, img in enumerate(images):
        top, left = (i // cols) * (h + gutter), (i % cols) * (w + gutter)
        out[top : top + h, left : left + w] = img
    return out


def _rgb(img: np.ndarray) -> np.ndarray:
    return np.repeat(img, 3, axis=2) if img.ndim == 3 and img.shape[2] == 1 else (np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img)


def save_grid(
    path: Path,
    images: np.ndarray,
    reconstructions: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str] | None = None,
    scale: int = 3,
) -> Path:
    """One column per image: input / reconstruction / anomaly map (shared colour scale)."""
    n, h, w = maps.shape
    vmax = float(np.quantile(maps, 0.995)) or 1.0
    title_h = 12 if titles else 0
    cell_h, cell_w = h * scale, w * scale
    canvas = Image.new("RGB", (n * (cell_w + 4), title_h + 3 * (cell_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        x0 = i * (cell_w + 4)
        rows = (_rgb(images[i]), _rgb(reconstructions[i]), heatmap(maps[i], vmax))
        for r, img in enumerate(rows):
            tile = Image.fromarray(img).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (x0, title_h + r * (cell_h + 4)))
        if titles:
            draw.text((x0 + 1, 0), titles[i][: max(4, cell_w // 6)], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
