"""Connected regions, PRO / AU-PRO, binned pixel AUROC and bootstrap intervals, against hand
computations and brute-force references."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from vaegan.service.runtime.regions import (
    au_pro,
    label_regions,
    pixel_counts,
    pro_counts,
    pro_curve,
)
from vaegan.service.runtime.stats import auroc, bootstrap_ci

# ------------------------------------------------------------------------ references


def flood_fill(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Breadth-first labelling, scanning in row-major order: the slow, obvious reference."""
    h, w = mask.shape
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if connectivity == 4:
        steps = [(dy, dx) for dy, dx in steps if dy == 0 or dx == 0]
    labels = np.zeros((h, w), int)
    n = 0
    for r in range(h):
        for c in range(w):
            if mask[r, c] and not labels[r, c]:
                n += 1
                labels[r, c] = n
                queue = deque([(r, c)])
                while queue:
                    y, x = queue.popleft()
                    for dy, dx in steps:
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                            labels[yy, xx] = n
                            queue.append((yy, xx))
    return labels, n


def regions_of(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    out = []
    for i, m in enumerate(masks):
        labels, n = flood_fill(m)
        out += [(i, labels == k) for k in range(1, n + 1)]
    return out


def area_up_to(points: list[tuple[float, float]], max_fpr: float) -> float:
    """Trapezoids over (fpr, pro) points sorted by fpr, the last one cut at max_fpr."""
    pts = sorted(points)
    total = 0.0
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        total += (x1 - x0) * (y0 + y1) / 2
    return total / max_fpr


def brute_force_au_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """PRO and FPR at every distinct map value (and -inf), one threshold at a time."""
    regions = regions_of(masks)
    points = []
    for t in [-np.inf, *np.unique(maps)]:
        above = maps > t
        fpr = above[~masks].mean()
        pro = np.mean([above[i][r].mean() for i, r in regions])
        points.append((float(fpr), float(pro)))
    return area_up_to(points, max_fpr)


def sorted_pixels_au_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Exact curve by sorting every pixel, as MVTec AD's evaluation code computes it."""
    regions = regions_of(masks)
    weight = np.zeros(maps.shape)
    for i, r in regions:
        weight[i][r] = 1.0 / (r.sum() * len(regions))
    order = np.argsort(-maps.ravel(), kind="stable")
    values = maps.ravel()[order]
    fpr = np.cumsum((~masks).ravel()[order]) / (~masks).sum()
    pro = np.cumsum(weight.ravel()[order])
    last = np.r_[np.flatnonzero(np.diff(values)), values.size - 1]  # after each distinct value
    return area_up_to([(0.0, 0.0), *zip(fpr[last], pro[last], strict=True)], max_fpr)


def blob_masks(rng: np.random.Generator, n: int, h: int, w: int, n_clean: int) -> np.ndarray:
    """Rectangles, diagonal lines and single pixels; the first ``n_clean`` images defect-free."""
    masks = np.zeros((n, h, w), bool)
    for i in range(n_clean, n):
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            kind = rng.integers(0, 3)
            if kind == 0:
                masks[i, y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
            elif kind == 1:
                k = min(h - y, w - x, int(rng.integers(2, 6)))
                masks[i, y + np.arange(k), x + np.arange(k)] = True  # 8-connected only
            else:
                masks[i, y, x] = True
    return masks


# ------------------------------------------------------------------- connected regions


def test_label_regions_matches_flood_fill_on_random_masks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(1, 24, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.8)
        for connectivity in (4, 8):
            got, n = label_regions(mask, connectivity)
            want, n_want = flood_fill(mask, connectivity)
            assert n == n_want and np.array_equal(got, want)
            assert got.dtype == np.int32


def test_label_regions_on_shapes_that_merge_late() -> None:
    # a U: the two arms are separate runs until the bottom row joins them
    u = np.array([[1, 0, 0, 1], [1, 0, 0, 1], [1, 1, 1, 1]], bool)
    assert label_regions(u)[1] == 1
    # a diagonal: one region with corners, two with edges only
    diag = np.eye(3, dtype=bool)
    assert label_regions(diag, 8)[1] == 1 and label_regions(diag, 4)[1] == 3
    # a spiral: one long path, many merges
    spiral = np.zeros((9, 9), bool)
    spiral[0, :] = spiral[:, 8] = spiral[8, :] = spiral[2:, 0] = True
    spiral[2, 0:7] = spiral[2:7, 6] = spiral[6, 2:7] = spiral[4:7, 2] = spiral[4, 2:5] = True
    labels, n = label_regions(spiral)
    assert n == flood_fill(spiral)[1] and np.array_equal(labels > 0, spiral)
    empty, n0 = label_regions(np.zeros((3, 5), bool))
    assert n0 == 0 and not empty.any()
    with pytest.raises(ValueError, match="2-D"):
        label_regions(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="connectivity"):
        label_regions(diag, 6)


# -------------------------------------------------------------------------------- AU-PRO


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Image 0: defect-free, map 0.0 .. 0.9. Image 1: region A = the diagonal (0,0)-(1,1)
    (one 8-connected region) with values 0.95 and 0.5 (a tie with a normal pixel), region B =
    (0,3)-(0,4) with values 0.85 and 0.05, its six normal pixels at -1. 16 normal pixels."""
    maps = np.array([
        [[0.0, 0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8, 0.9]],
        [[0.95, -1.0, -1.0, 0.85, 0.05], [-1.0, 0.5, -1.0, -1.0, -1.0]],
    ])
    masks = np.zeros((2, 2, 5), bool)
    masks[1, 0, 0] = masks[1, 1, 1] = masks[1, 0, 3] = masks[1, 0, 4] = True
    return maps, masks


def test_au_pro_hand_computed() -> None:
    maps, masks = hand_case()
    # Lowering the threshold: 0.95 -> PRO 1/4 at FPR 0; 0.9 -> FPR 1/16; 0.85 -> PRO 1/2;
    # 0.8, 0.7, 0.6 -> FPR 4/16; 0.5 (normal and region A together) -> FPR 5/16, PRO 3/4.
    # Area to 0.3 = 4.8/16: 1/4 * 1/16 + 1/2 * 3/16 + (1/2 + 0.7) / 2 * 0.8/16, where
    # 0.7 = PRO interpolated at FPR 0.3 on the diagonal step from (4/16, 1/2) to (5/16, 3/4).
    area = 0.25 / 16 + 0.5 * 3 / 16 + (0.5 + 0.7) / 2 * 0.8 / 16
    assert au_pro(maps, masks) == pytest.approx(area / 0.3, abs=1e-12)
    assert au_pro(maps, masks, max_fpr=0.25) == pytest.approx((0.25 / 16 + 0.5 * 3 / 16) / 0.25, abs=1e-12)
    fpr, pro = pro_curve(maps, masks)
    assert (fpr[0], pro[0]) == (0.0, 0.0) and (fpr[-1], pro[-1]) == (1.0, 1.0)
    points = set(zip(fpr.tolist(), pro.tolist(), strict=True))
    for point in [(0.0, 0.25), (1 / 16, 0.25), (1 / 16, 0.5), (4 / 16, 0.5), (5 / 16, 0.75)]:
        assert point in points
    assert pro_counts(maps, masks).n_regions == 2  # the diagonal is one region
    # a perfect map: every defect pixel above every normal one
    assert au_pro(masks.astype(float), masks) == 1.0


def test_au_pro_equals_brute_force_when_exact() -> None:
    rng = np.random.default_rng(1)
    masks = blob_masks(rng, 6, 16, 12, n_clean=2)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)  # ties within and across kinds
    for max_fpr in (0.3, 0.05, 1.0):
        assert au_pro(maps, masks, max_fpr=max_fpr) == pytest.approx(
            brute_force_au_pro(maps, masks, max_fpr), abs=1e-12)


@pytest.mark.parametrize("num_thresholds", [100, 400])
def test_au_pro_threshold_grid_is_close_to_the_exact_curve(num_thresholds: int) -> None:
    rng = np.random.default_rng(2)
    masks = blob_masks(rng, 8, 40, 40, n_clean=3)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)  # ~12800 distinct values
    exact = sorted_pixels_au_pro(maps.astype(np.float64), masks)
    assert 0.2 < exact < 0.95
    got = au_pro(maps, masks, num_thresholds=num_thresholds)
    assert abs(got - exact) < 1.0 / num_thresholds
    assert pro_counts(maps, masks, num_thresholds=num_thresholds).thresholds.size < 2 * num_thresholds


def test_weights_equal_duplicated_images() -> None:
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, 5, 10, 10, n_clean=2)
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 2)
    weights = np.array([2, 0, 1, 3, 1])
    dup = np.repeat(np.arange(5), weights)
    assert pro_counts(maps, masks).area(0.3, weights) == pytest.approx(au_pro(maps[dup], masks[dup]), abs=1e-12)
    assert pixel_counts(maps, masks).auroc(weights) == pytest.approx(auroc(maps[dup], masks[dup]), abs=1e-12)


def test_pixel_counts_auroc() -> None:
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 6, 12, 12, n_clean=2)
    small = np.round(rng.random(masks.shape) + 0.3 * masks, 2)
    assert pixel_counts(small, masks).auroc() == pytest.approx(auroc(small, masks), abs=1e-12)  # exact bins
    big = rng.random(masks.shape) + 0.3 * masks
    assert abs(pixel_counts(big, masks, num_bins=64).auroc() - auroc(big, masks)) < 0.5 / 64


def test_undefined_and_bad_inputs() -> None:
    maps, masks = hand_case()
    assert np.isnan(au_pro(maps, np.zeros_like(masks)))  # no regions
    assert np.isnan(pixel_counts(maps, np.zeros_like(masks)).auroc())
    with pytest.raises(ValueError, match="must both be"):
        au_pro(maps, masks[:1])
    with pytest.raises(ValueError, match="NaN"):
        au_pro(np.where(masks, np.nan, maps), masks)
    with pytest.raises(ValueError, match="max_fpr"):
        au_pro(maps, masks, max_fpr=0.0)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_of_a_mean() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(3.0, 2.0, 400)
    lo, hi = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=2000, seed=0)
    assert lo < x.mean() < hi
    normal_theory = 2 * 1.96 * x.std() / np.sqrt(len(x))
    assert (hi - lo) == pytest.approx(normal_theory, rel=0.1)
    assert bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=2000, seed=0) == (lo, hi)
    assert bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=2000, seed=1) != (lo, hi)


def test_bootstrap_ci_drops_undefined_resamples() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8])
    labels = np.array([0, 0, 0, 1, 1])
    # some resamples hold one class only: their AUROC is NaN and is left out
    lo, hi = bootstrap_ci(lambda idx: auroc(scores[idx], labels[idx]), 5, n_boot=300, seed=0)
    assert (lo, hi) == (1.0, 1.0)
    assert all(np.isnan(bootstrap_ci(lambda idx: float("nan"), 5, n_boot=10)))
    with pytest.raises(ValueError):
        bootstrap_ci(lambda idx: 0.0, 0)
