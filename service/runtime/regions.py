"""Pixel-level localisation metrics on numpy arrays: connected defect regions, PRO / AU-PRO
(as MVTec AD reports it) and a binned pixel AUROC that can be bootstrapped over images.

Anomaly maps are float (N, H, W), higher = more anomalous; ground-truth masks are bool
(N, H, W), True = defect. Both metrics first reduce the maps to per-image histograms over one
grid of thresholds (:class:`ProCounts`, :class:`PixelCounts`), so a bootstrap resample of the
images costs a weighted sum of those histograms, not a new sort of every pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "PixelCounts",
    "ProCounts",
    "au_pro",
    "label_regions",
    "pixel_counts",
    "pro_counts",
    "pro_curve",
]

# quantiles that place the threshold grid are taken from at most this many pixels
_QUANTILE_SAMPLE = 1 << 20


def label_regions(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D boolean mask.

    Args:
        mask: (H, W), True = foreground.
        connectivity: 8 (pixels touching at an edge or a corner belong together, as MVTec's
            regions) or 4 (edges only).

    Returns:
        (labels, n): int32 (H, W) with 0 for background and 1..n for the regions, numbered in
        the row-major order of their first pixel; and the number of regions n.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = m.shape
    out = np.zeros((h, w), np.int32)
    if not m.any():
        return out, 0
    # horizontal runs of foreground pixels, in row-major order: row, start, end (exclusive)
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = m
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)
    n_runs = len(rows)
    # runs of the row above that touch each run: a contiguous range [lo, hi) of run indices,
    # found by binary search on (row, column) keys
    key = w + 2
    end_keys = rows * key + ends
    start_keys = rows * key + starts
    above = (rows - 1) * key
    if connectivity == 8:  # touching at a corner counts: columns may be one apart
        lo = np.searchsorted(end_keys, above + starts, side="left")
        hi = np.searchsorted(start_keys, above + ends, side="right")
    else:
        lo = np.searchsorted(end_keys, above + starts, side="right")
        hi = np.searchsorted(start_keys, above + ends, side="left")
    counts = np.maximum(hi - lo, 0)
    b = np.repeat(np.arange(n_runs), counts)
    offsets = np.arange(len(b)) - np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(lo, counts) + offsets
    # union-find over the runs: hook the higher root onto the lower one, then compress paths;
    # every label stays a run of the same component and only ever decreases
    parent = np.arange(n_runs)
    while True:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra[differ], rb[differ]), np.minimum(ra[differ], rb[differ]))
    roots, component = np.unique(parent, return_inverse=True)
    out[m] = np.repeat(component.astype(np.int32) + 1, ends - starts)  # row-major, as the runs
    return out, len(roots)


def _check_maps(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(maps)
    if a.ndim == 2:
        a = a[None]
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    m = np.asarray(masks, dtype=bool)
    if m.ndim == 2:
        m = m[None]
    if a.ndim != 3 or a.shape != m.shape:
        raise ValueError(f"maps {a.shape} and masks {m.shape} must both be (N, H, W)")
    if not np.isfinite(a).all():
        raise ValueError("maps hold NaN or infinite values")
    return a, m


def _sample(values: np.ndarray) -> np.ndarray:
    """Sorted values, or a sorted even subsample of at most ``_QUANTILE_SAMPLE`` of them."""
    stride = max(1, -(-values.size // _QUANTILE_SAMPLE))
    return np.sort(values[::stride], kind="stable")


def _levels(sorted_values: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Empirical quantiles (lower) of already-sorted values at levels ``q`` in [0, 1]."""
    if sorted_values.size == 0:
        return sorted_values
    idx = np.clip(np.floor(q * (sorted_values.size - 1)).astype(np.int64), 0, sorted_values.size - 1)
    return sorted_values[idx]


def _distinct_if_few(values: np.ndarray, limit: int) -> np.ndarray | None:
    """All distinct values when the maps are small and hold at most ``limit`` of them."""
    if values.size > _QUANTILE_SAMPLE:
        return None
    distinct = np.unique(values)
    return distinct if distinct.size <= limit else None


def _reverse_cumsum(hist: np.ndarray) -> np.ndarray:
    """(…, K+1) bin counts -> (…, K): the count in bins above each of the K thresholds."""
    return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]


def _weighted_sum(w: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``w @ rows`` without BLAS: a multithreaded gemv is erratic on busy machines and the
    bootstrap calls this thousands of times on small arrays."""
    return np.einsum("r,rk->k", w, rows)


def _normalize_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    return w


@dataclass(frozen=True)
class ProCounts:
    """Per-image counts behind the PRO curve, at a fixed grid of thresholds.

    ``thresholds`` ascend and start at -inf; column k of each array counts pixels with
    ``map > thresholds[k]``. Build with :func:`pro_counts`.
    """

    thresholds: np.ndarray  # (K,) ascending, thresholds[0] = -inf
    normal_above: np.ndarray  # (N, K) normal pixels of each image above each threshold
    normal_total: np.ndarray  # (N,) normal pixels per image
    region_above: np.ndarray  # (R, K) share of each region's pixels above each threshold
    region_image: np.ndarray  # (R,) the image each region lies in

    @property
    def n_regions(self) -> int:
        """Number of ground-truth regions over all images."""
        return int(self.region_image.size)

    def curve(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, pro) at every threshold, in ascending FPR from (0, 0) to (1, 1).

        ``weights`` (N,) weighs the images (a bootstrap resample passes how often it drew each);
        NaN arrays when there are no normal pixels or no regions.
        """
        w = _normalize_weights(weights, self.normal_total.size)
        total = float(w @ self.normal_total)
        wr = w[self.region_image]
        if total <= 0 or wr.sum() <= 0:
            nan = np.full(self.thresholds.size, np.nan)
            return nan, nan
        fpr = _weighted_sum(w, self.normal_above) / total
        pro = _weighted_sum(wr, self.region_above) / wr.sum()
        return fpr[::-1], pro[::-1]

    def area(self, max_fpr: float = 0.3, weights: np.ndarray | None = None) -> float:
        """AU-PRO: the area under PRO over FPR in [0, max_fpr] (trapezoids, PRO interpolated
        linearly at exactly ``max_fpr``), divided by ``max_fpr``; 1.0 is perfect."""
        fpr, pro = self.curve(weights)
        return _area_up_to(fpr, pro, max_fpr)


def _area_up_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if fpr.size == 0 or np.isnan(fpr).any():
        return float("nan")
    i = int(np.searchsorted(fpr, max_fpr, side="right"))  # points with fpr <= max_fpr: [0, i)
    x, y = fpr[:i], pro[:i]
    if i < fpr.size and x[-1] < max_fpr:  # close the area at exactly max_fpr
        x0, y0, x1, y1 = fpr[i - 1], pro[i - 1], fpr[i], pro[i]
        x = np.r_[x, max_fpr]
        y = np.r_[y, y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0) / max_fpr)


def _pro_thresholds(a: np.ndarray, m: np.ndarray, max_fpr: float, num_thresholds: int) -> np.ndarray:
    """-inf, then either every distinct map value (small inputs: the curve is exact) or a grid:
    ``num_thresholds`` quantiles of the normal pixels spaced evenly in FPR over a little more
    than [0, max_fpr], plus ``num_thresholds // 2`` quantiles of the defect pixels, plus the
    maximum (FPR = PRO = 0)."""
    exact = _distinct_if_few(a.ravel(), num_thresholds)
    if exact is not None:
        grid = exact
    else:
        normal = _sample(a[~m])
        defect = _sample(a[m])
        span = min(1.0, max_fpr * (1.0 + 2.0 / num_thresholds) + 1.0 / num_thresholds)
        grid = np.unique(np.concatenate([
            _levels(normal, 1.0 - np.linspace(0.0, span, num_thresholds)),
            _levels(defect, np.linspace(0.0, 1.0, max(2, num_thresholds // 2))),
            [a.max()],
        ]))
    return np.concatenate([[-np.inf], grid]).astype(a.dtype)


def pro_counts(
    maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3, num_thresholds: int = 2000
) -> ProCounts:
    """Label the regions of every mask (8-connected) and count, per image and per threshold,
    the normal pixels and the share of each region's pixels whose map value exceeds it.

    Normal pixels are those outside every mask, in every image (defect-free images included).
    The thresholds are every distinct map value when the maps have at most ``num_thresholds``
    of them, else a grid whose FPR steps over [0, max_fpr] are about ``max_fpr /
    num_thresholds`` apart, so the area differs from the exact one by at most about
    ``1 / num_thresholds``.
    """
    a, m = _check_maps(maps, masks)
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    thresholds = _pro_thresholds(a, m, max_fpr, num_thresholds)
    k = thresholds.size
    normal_hist = np.zeros((len(a), k + 1), np.int64)
    region_rows: list[np.ndarray] = []
    region_image: list[np.ndarray] = []
    for i, (amap, mask) in enumerate(zip(a, m, strict=True)):
        bins = np.searchsorted(thresholds, amap, side="left")  # map > thresholds[j] iff j < bins
        normal_hist[i] = np.bincount(bins[~mask], minlength=k + 1)
        labels, n = label_regions(mask)
        if n:
            hist = np.bincount((labels[mask] - 1) * (k + 1) + bins[mask], minlength=n * (k + 1)).reshape(n, k + 1)
            region_rows.append(_reverse_cumsum(hist) / hist.sum(axis=1, keepdims=True))
            region_image.append(np.full(n, i))
    return ProCounts(
        thresholds=thresholds,
        normal_above=_reverse_cumsum(normal_hist).astype(np.float64),
        normal_total=normal_hist.sum(axis=1).astype(np.float64),
        region_above=np.concatenate(region_rows) if region_rows else np.zeros((0, k)),
        region_image=np.concatenate(region_image) if region_image else np.zeros(0, np.int64),
    )


def pro_curve(
    maps: np.ndarray, masks: np.ndarray, *, max_fpr: float = 0.3, num_thresholds: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) of the per-region-overlap curve, ascending FPR; see :func:`pro_counts`."""
    return pro_counts(maps, masks, max_fpr=max_fpr, num_thresholds=num_thresholds).curve()


def au_pro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 2000) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, normalized to [0, 1], as
    MVTec AD reports it.

    Each 8-connected region of each mask is one region. At threshold t, PRO(t) is the mean
    over all regions (of all images) of the share of the region's pixels with map > t, and
    FPR(t) the share of normal pixels (outside every mask, defect-free images included) with
    map > t. PRO is integrated over FPR from 0 to ``max_fpr`` with trapezoids (interpolated at
    exactly ``max_fpr``) and divided by ``max_fpr``. NaN when the masks hold no defect pixel
    or no normal one. See :func:`pro_counts` for the threshold grid.
    """
    return pro_counts(maps, masks, max_fpr=max_fpr, num_thresholds=num_thresholds).area(max_fpr)


@dataclass(frozen=True)
class PixelCounts:
    """Per-image histograms of defect and normal pixel values over one grid of bins; build
    with :func:`pixel_counts`. Values in one bin count as ties (half a correct pair each)."""

    edges: np.ndarray  # (B,) ascending; bin j holds values in (edges[j-1], edges[j]]
    positive: np.ndarray  # (N, B+1) defect pixels per image and bin
    negative: np.ndarray  # (N, B+1) normal pixels per image and bin

    def auroc(self, weights: np.ndarray | None = None) -> float:
        """Pixel AUROC of the (weighted) images: P(defect pixel > normal pixel) + P(tie) / 2;
        NaN without pixels of both kinds."""
        w = _normalize_weights(weights, self.positive.shape[0])
        pos, neg = _weighted_sum(w, self.positive), _weighted_sum(w, self.negative)
        n_pos, n_neg = pos.sum(), neg.sum()
        if n_pos <= 0 or n_neg <= 0:
            return float("nan")
        below = np.cumsum(neg) - neg
        return float((pos @ below + 0.5 * (pos @ neg)) / (n_pos * n_neg))


def pixel_counts(maps: np.ndarray, masks: np.ndarray, *, num_bins: int = 4096) -> PixelCounts:
    """Histograms for :meth:`PixelCounts.auroc`: the bins are every distinct value when the
    maps hold at most ``num_bins`` of them (then the AUROC is exact), else ``num_bins``
    quantiles of the normal pixels, which bounds the error by about ``0.5 / num_bins``."""
    a, m = _check_maps(maps, masks)
    edges = _distinct_if_few(a.ravel(), num_bins)
    if edges is None:
        edges = np.unique(np.r_[_levels(_sample(a[~m]), np.linspace(0.0, 1.0, num_bins)), a.max()])
    edges = edges.astype(a.dtype)
    nb = edges.size + 1
    pos = np.zeros((len(a), nb), np.int64)
    neg = np.zeros((len(a), nb), np.int64)
    for i, (amap, mask) in enumerate(zip(a, m, strict=True)):
        bins = np.searchsorted(edges, amap, side="left")
        pos[i] = np.bincount(bins[mask], minlength=nb)
        neg[i] = np.bincount(bins[~mask], minlength=nb)
    return PixelCounts(edges=edges, positive=pos.astype(np.float64), negative=neg.astype(np.float64))
