"""Choosing score weights and checkpoints without test labels.

The signal (DESIGN.md section 11): how well a weighting separates held-out *normal* images from
synthetically corrupted copies of the same images. The corruptions are generic local and
structural defects — a patch pasted from another image, a scratch, a blotch of noise, a
flipped or rotated half, a cut-out — so no knowledge of the test anomalies goes in.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

from service.runtime.scoring import COMPONENTS
from service.runtime.stats import auroc

__all__ = ["CORRUPTIONS", "WEIGHT_GRID", "corrupt", "select_weights", "separation"]

CORRUPTIONS = ("paste", "scratch", "noise", "flip_half", "rotate", "cutout")
WEIGHT_LEVELS = (0.0, 0.25, 0.5, 1.0)


def _weight_grid() -> list[tuple[float, ...]]:
    """All non-zero weight vectors over WEIGHT_LEVELS, up to scale (max weight 1)."""
    out = set()
    for w in itertools.product(WEIGHT_LEVELS, repeat=len(COMPONENTS)):
        if max(w) == 1.0:
            out.add(w)
    return sorted(out)


WEIGHT_GRID = _weight_grid()


def _box(rng: np.random.Generator, h: int, w: int, lo: float = 0.15, hi: float = 0.4) -> tuple[int, int, int, int]:
    bh = int(rng.integers(max(2, int(h * lo)), max(3, int(h * hi)) + 1))
    bw = int(rng.integers(max(2, int(w * lo)), max(3, int(w * hi)) + 1))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    return top, left, bh, bw


def corrupt(images: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Corrupted copies of uint8 (N, H, W, C) images, one corruption each (cycled).

    Returns (corrupted images, the corruption index per image into CORRUPTIONS).
    """
    rng = np.random.default_rng(seed)
    n, h, w, c = images.shape
    out = images.copy()
    kinds = np.arange(n) % len(CORRUPTIONS)
    rng.shuffle(kinds)
    for i, k in enumerate(kinds):
        img = out[i]
        name = CORRUPTIONS[k]
        if name == "paste":  # CutPaste: a patch of another image, at another place
            t, lf, bh, bw = _box(rng, h, w)
            j = int(rng.integers(0, n))
            st, sl = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            img[t : t + bh, lf : lf + bw] = np.rot90(images[j, st : st + bh, sl : sl + bw], 2) if bh == bw else images[j, st : st + bh, sl : sl + bw]
        elif name == "scratch":  # a thick line of a random intensity
            y0, x0, y1, x1 = rng.integers(0, [h, w, h, w])
            steps = max(h, w) * 2
            ys = np.linspace(y0, y1, steps).round().astype(int)
            xs = np.linspace(x0, x1, steps).round().astype(int)
            colour = rng.integers(0, 256, c)
            thick = max(1, h // 16)
            for dy in range(thick):
                img[np.clip(ys + dy, 0, h - 1), xs] = colour
        elif name == "noise":  # a blotch of strong noise
            t, lf, bh, bw = _box(rng, h, w)
            img[t : t + bh, lf : lf + bw] = rng.integers(0, 256, (bh, bw, c))
        elif name == "flip_half":  # one half mirrored onto the other: broken structure
            if rng.random() < 0.5:
                img[:, w // 2 :] = img[:, : w - w // 2][:, ::-1][:, : w // 2]
            else:
                img[h // 2 :] = img[: h - h // 2][::-1][: h // 2]
        elif name == "rotate":  # the whole image turned by 90 or 180 degrees
            k90 = int(rng.integers(1, 4))
            img[:] = np.rot90(img, k90) if h == w else img[::-1, ::-1]
        else:  # cutout: a flat patch of the image's own mean
            t, lf, bh, bw = _box(rng, h, w)
            img[t : t + bh, lf : lf + bw] = img.reshape(-1, c).mean(0).astype(np.uint8)
    return out, kinds


def separation(
    normal: Mapping[str, np.ndarray],
    corrupted: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    stats: Mapping[str, tuple[float, float]],
) -> float:
    """AUROC of normal vs corrupted under ``weights`` applied to standardized components."""
    def score(c: Mapping[str, np.ndarray]) -> np.ndarray:
        return sum(weights[k] * (np.asarray(c[k]) - stats[k][0]) / stats[k][1] for k in COMPONENTS)

    s_n, s_c = score(normal), score(corrupted)
    return auroc(np.r_[s_n, s_c], np.r_[np.zeros(len(s_n)), np.ones(len(s_c))])


def select_weights(
    normal: Mapping[str, np.ndarray], corrupted: Mapping[str, np.ndarray]
) -> tuple[dict[str, float], dict]:
    """The grid weighting that best separates normal from corrupted; ties go to fewer terms.

    Returns (weights, a report with every component's own AUROC and the chosen AUROC).
    """
    stats = {k: (float(np.mean(normal[k])), max(float(np.std(normal[k])), 1e-12)) for k in COMPONENTS}
    best, best_auc = None, -1.0
    for w in WEIGHT_GRID:
        weights = dict(zip(COMPONENTS, w, strict=True))
        a = separation(normal, corrupted, weights, stats)
        # prefer simpler weightings unless clearly better
        if a > best_auc + 1e-4 or (abs(a - best_auc) <= 1e-4 and best is not None and sum(w) < sum(best.values())):
            best, best_auc = weights, a
    assert best is not None
    single = {k: separation(normal, corrupted, {j: float(j == k) for j in COMPONENTS}, stats) for k in COMPONENTS}
    equal = separation(normal, corrupted, dict.fromkeys(COMPONENTS, 1.0), stats)
    report = {
        "method": "grid search on held-out normals vs synthetic corruptions " + "/".join(CORRUPTIONS),
        "n_normal": int(len(normal["pixel"])),
        "n_corrupted": int(len(corrupted["pixel"])),
        "selection_auroc": best_auc,
        "equal_weights_auroc": equal,
        "component_auroc": single,
    }
    return best, report
