"""A built-in, procedural dataset of textured surfaces with injected defects (MVTec-like).

Normal images are smooth RGB surfaces: a base colour from a small palette, low-frequency
directional stripes with a slow wavy warp (grain), a mild linear gradient and fine noise.
Defective images carry one defect covering 1-8% of the image, with a ground-truth mask:

- scratch: a thin curved line of a contrasting colour,
- blob: an irregular semi-transparent stain of a contrasting colour,
- patch: a rectangle of flat dark or bright colour (missing material).

Defect colours are drawn around the surface colour (lighter or darker, hue shifted), so they
are not simply the brightest pixels. Everything is drawn in normalized coordinates and
rendered at the requested size, so a 64x64 set is sharp, not upsampled. Images are made in
fixed chunks, each with its own seed, so ``limit`` returns a prefix of the full set.
"""

from __future__ import annotations

import numpy as np

from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.trainer.data import ImageSet, images_to_spec, native_spec

__all__ = [
    "CLASS_NAMES",
    "COUNTS",
    "DEFECT_KINDS",
    "MAX_COVERAGE",
    "MIN_COVERAGE",
    "PALETTE",
    "load_synthetic",
    "make_synthetic",
    "make_synthetic_repairs",
]

CLASS_NAMES = ["normal", "defect"]
COUNTS = {"train": 4000, "test": 1000}
DEFECT_KINDS = ("scratch", "blob", "patch")
MIN_COVERAGE, MAX_COVERAGE = 0.01, 0.08  # share of the image a defect mask covers
PALETTE = np.array(  # surface families, RGB in [0, 1]
    [
        [0.56, 0.58, 0.61],  # brushed steel
        [0.62, 0.45, 0.28],  # wood
        [0.26, 0.36, 0.56],  # blue fabric
        [0.36, 0.26, 0.21],  # dark leather
    ],
    dtype=np.float32,
)
_SPLIT_IDS = {"train": 0, "test": 1}
_CHUNK = 256  # images drawn from one seed; fixed, so a prefix never depends on the count
_SEGMENTS = 8  # a scratch is a quadratic Bezier curve drawn as this many segments
_NOISE = 0.012  # std of the fine grey noise


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [0, 1]: y (1, H, 1), x (1, 1, W)."""
    y = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
    x = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, None, :]
    return y, x


def _col(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)[:, None, None]  # (N,) -> (N, 1, 1), broadcasts over (N, H, W)


def _surface_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    u = rng.uniform
    return {
        "base": PALETTE[rng.integers(0, len(PALETTE), n)] + u(-0.04, 0.04, (n, 3)).astype(np.float32),
        "theta": u(0, np.pi, n), "freq": u(1.5, 4.0, n), "phase": u(0, 2 * np.pi, n),
        "amp": u(0.05, 0.12, n), "warp": u(0.0, 1.2, n), "warp_freq": u(0.5, 1.5, n),
        "warp_phase": u(0, 2 * np.pi, n), "grad_dir": u(0, 2 * np.pi, n), "grad": u(-0.08, 0.08, n),
    }


def _render_surface(p: dict[str, np.ndarray], height: int, width: int) -> np.ndarray:
    """-> float32 (N, H, W, 3) without noise."""
    y, x = _grid(height, width)
    c, s = _col(np.cos(p["theta"])), _col(np.sin(p["theta"]))
    along, across = c * x + s * y, -s * x + c * y  # (N, H, W)
    warp = _col(p["warp"]) * np.sin(2 * np.pi * _col(p["warp_freq"]) * across + _col(p["warp_phase"]))
    stripes = np.sin(2 * np.pi * _col(p["freq"]) * along + _col(p["phase"]) + warp)
    g = _col(np.cos(p["grad_dir"])) * (x - 0.5) + _col(np.sin(p["grad_dir"])) * (y - 0.5)
    lum = 1.0 + _col(p["amp"]) * stripes + 2.0 * _col(p["grad"]) * g  # (N, H, W)
    return p["base"][:, None, None, :] * lum[..., None]  # (N, H, W, 3)


def _defect_params(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
    u = rng.uniform
    kind = rng.integers(0, len(DEFECT_KINDS), m)
    return {
        "kind": kind,
        "centre": u(0.25, 0.75, (m, 2)), "angle": u(0, np.pi, m),
        "area": u(0.018, 0.06, m), "ratio": u(0.35, 1.0, m),  # blob / patch
        "length": u(0.35, 0.7, m), "bend": u(-0.25, 0.25, m), "half_width": u(0.022, 0.036, m),
        "lobes": u(0.0, 0.2, m), "lobe_phase": u(0, 2 * np.pi, m),
        "opacity": np.where(kind == 1, u(0.7, 0.95, m), 1.0),  # stains stay translucent
    }


def _render_defects(p: dict[str, np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (alpha float32 (M, H, W) in [0, 1], mask bool (M, H, W))."""
    y, x = _grid(height, width)
    px = 1.0 / min(height, width)  # one pixel in normalized units: anti-aliasing width
    cy, cx = _col(p["centre"][:, 0]), _col(p["centre"][:, 1])
    ca, sa = _col(np.cos(p["angle"])), _col(np.sin(p["angle"]))
    du, dv = ca * (x - cx) + sa * (y - cy), -sa * (x - cx) + ca * (y - cy)  # rotated offsets
    # scratch: distance to a bent curve, P0 -> P2 along the angle, control point off to the side
    half = p["length"][:, None] / 2
    d = np.stack([np.cos(p["angle"]), np.sin(p["angle"])], 1)  # (M, 2) as (x, y)
    mid = p["centre"][:, ::-1]  # (M, 2) as (x, y)
    p0, p2 = mid - half * d, mid + half * d
    p1 = mid + (p["bend"] * p["length"])[:, None] * np.stack([-d[:, 1], d[:, 0]], 1)
    t = np.linspace(0, 1, _SEGMENTS + 1)[None, :, None]
    curve = ((1 - t) ** 2 * p0[:, None] + 2 * t * (1 - t) * p1[:, None] + t**2 * p2[:, None])
    curve = curve.astype(np.float32)  # (M, K+1, 2)
    a, b = curve[:, :-1, None, None, :], curve[:, 1:, None, None, :]  # (M, K, 1, 1, 2)
    pt = np.stack(np.broadcast_arrays(x[:, None], y[:, None]), -1)  # (1, 1, H, W, 2)
    ab = b - a
    h = np.clip(((pt - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)
    dist = np.linalg.norm(pt - a - h[..., None] * ab, axis=-1).min(1)  # (M, H, W)
    scratch = _col(p["half_width"]) - dist
    # blob: an ellipse of the given area with a wavy rim, edge distance approximated radially
    ea = np.sqrt(p["area"] / (np.pi * p["ratio"]))
    r = np.sqrt((du / _col(ea)) ** 2 + (dv / _col(ea * p["ratio"])) ** 2)
    rim = 1 + _col(p["lobes"]) * np.sin(3 * np.arctan2(dv, du) + _col(p["lobe_phase"]))
    blob = (rim - r) * _col(ea * p["ratio"])
    # patch: an axis-aligned rectangle of the given area
    hw, hh = np.sqrt(p["area"] / p["ratio"]) / 2, np.sqrt(p["area"] * p["ratio"]) / 2
    patch = np.minimum(_col(hw) - np.abs(x - cx), _col(hh) - np.abs(y - cy))
    edge = np.choose(_col(p["kind"]).astype(np.int64), [scratch, blob, patch])  # (M, H, W)
    alpha = np.clip(edge / px + 0.5, 0, 1).astype(np.float32)
    return alpha, alpha >= 0.5


def _defect_colours(rng: np.random.Generator, base: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """(M, 3) colours: shifted lighter or darker and in hue from the surface; patches flat grey."""
    m = len(base)
    shift = rng.choice([-1.0, 1.0], m) * rng.uniform(0.2, 0.35, m)
    delta = shift[:, None] + rng.normal(0, 0.12, (m, 3))
    colour = base + delta
    flip = (colour.min(1) < 0.03) | (colour.max(1) > 0.97)
    colour[flip] = base[flip] - delta[flip]
    grey = np.where(rng.random(m) < 0.5, rng.uniform(0.04, 0.15, m), rng.uniform(0.85, 0.96, m))
    colour[kind == 2] = grey[kind == 2, None]
    return np.clip(colour, 0.02, 0.98).astype(np.float32)


def _render_defects_sliced(p: dict[str, np.ndarray], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_render_defects` a few at a time, so memory stays bounded for large images."""
    step = max(1, (1 << 20) // (_SEGMENTS * height * width))
    m = len(p["kind"])
    parts = [_render_defects({k: v[i : i + step] for k, v in p.items()}, height, width) for i in range(0, m, step)]
    if not parts:
        return np.zeros((0, height, width), np.float32), np.zeros((0, height, width), bool)
    return np.concatenate([a for a, _ in parts]), np.concatenate([k for _, k in parts])


def _add_defects(rng: np.random.Generator, img: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect into each of ``img`` (float32 (M, H, W, 3), in place) -> (masks (M, H, W),
    kinds (M,): indices into DEFECT_KINDS)."""
    m, height, width = img.shape[:3]
    dp = _defect_params(rng, m)
    colours = _defect_colours(rng, base, dp["kind"])
    alpha, mask = _render_defects_sliced(dp, height, width)
    for _ in range(50):  # redraw the few defects whose rasterized area is out of range
        cover = mask.mean((1, 2))
        bad = np.flatnonzero((cover < MIN_COVERAGE) | (cover > MAX_COVERAGE))
        if not len(bad):
            break
        redo = _defect_params(rng, len(bad))
        for key in dp:
            dp[key][bad] = redo[key]
        colours[bad] = _defect_colours(rng, base[bad], dp["kind"][bad])
        alpha[bad], mask[bad] = _render_defects_sliced(redo, height, width)
    else:
        raise RuntimeError("synthetic defects: coverage did not settle; widen the size ranges")
    a = (alpha * _col(dp["opacity"]))[..., None]  # (M, H, W, 1)
    img *= 1 - a
    img += colours[:, None, None, :] * a
    return mask, dp["kind"]


def _chunk(
    seed: int, split: str, chunk: int, n: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images ``chunk * _CHUNK ...`` of a split -> (uint8 (n, H, W, 3), bool (n, H, W) masks,
    uint8 (n, H, W, 3) the same images before their defects were painted, int64 (n,) defect
    kinds: indices into DEFECT_KINDS, -1 for a normal image)."""
    params_seq, noise_seq = np.random.SeedSequence([seed, _SPLIT_IDS[split], chunk]).spawn(2)
    rng, noise_rng = np.random.default_rng(params_seq), np.random.default_rng(noise_seq)
    surface = _surface_params(rng, n)
    img = _render_surface(surface, height, width)  # (n, H, W, 3)
    img += noise_rng.normal(0, _NOISE, (n, height, width, 1)).astype(np.float32)  # grain in luminance
    img += noise_rng.normal(0, _NOISE / 3, (n, height, width, 3)).astype(np.float32)  # and a little colour
    masks = np.zeros((n, height, width), bool)
    kinds = np.full(n, -1, np.int64)

    def to_uint8(a: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)

    clean = to_uint8(img)
    if split == "test":
        defective = np.flatnonzero((chunk * _CHUNK + np.arange(n)) % 2 == 1)
        sub = img[defective]
        masks[defective], kinds[defective] = _add_defects(rng, sub, surface["base"][defective])
        img[defective] = sub
    return to_uint8(img), masks, clean, kinds


def make_synthetic(
    split: str, count: int, height: int, width: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first ``count`` images of a split -> (uint8 (N, H, W, 3), int64 labels (N,),
    bool masks (N, H, W)). Test images alternate normal (even index) and defective (odd)."""
    # whole chunks only, so image i is the same whatever the count
    parts = [_chunk(seed, split, c, _CHUNK, height, width) for c in range(-(-count // _CHUNK))]
    images = np.concatenate([p[0] for p in parts])[:count] if parts else np.zeros((0, height, width, 3), np.uint8)
    masks = np.concatenate([p[1] for p in parts])[:count] if parts else np.zeros((0, height, width), bool)
    labels = (np.arange(count) % 2 if split == "test" else np.zeros(count)).astype(np.int64)
    return images, labels, masks


def make_synthetic_repairs(
    count: int, height: int, width: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The defective images among the first ``count`` test images, with what a repair should
    give back: (defective uint8 (M, H, W, 3), the same images rendered without their defect
    (M, H, W, 3), bool defect masks (M, H, W), int64 kinds (M,): indices into DEFECT_KINDS).
    The images are exactly those of :func:`make_synthetic` (``split="test"``)."""
    parts = [_chunk(seed, "test", c, _CHUNK, height, width) for c in range(-(-count // _CHUNK))]
    images, masks, clean, kinds = (np.concatenate([p[i] for p in parts])[:count] for i in range(4))
    bad = kinds >= 0
    return images[bad], clean[bad], masks[bad], kinds[bad]


def load_synthetic(split: str, spec: ImageSpec | None, *, seed: int = 0, limit: int | None = None) -> ImageSet:
    """The synthetic dataset: train 4000 normal images (masks None), test 1000 images, half
    defective, with masks. Rendered at the spec's size (default 32x32); a grey spec converts
    the RGB surfaces as the service would."""
    spec = spec if spec is not None else native_spec("synthetic")
    count = COUNTS[split] if limit is None else min(COUNTS[split], limit)
    images, labels, masks = make_synthetic(split, count, spec.height, spec.width, seed=seed)
    return ImageSet(
        images=images_to_spec(images, spec),
        labels=labels,
        masks=masks if split == "test" else None,
        class_names=list(CLASS_NAMES),
    )
