"""Score components and their calibration (docs/scoring.md). Numpy only.

Components, for normalized inputs x and reconstructions x_hat = G(mu(x)):
  pixel   = mean((x - x_hat)^2)
  feature = mean((f_D(x) - f_D(x_hat))^2)
  disc    = softplus(-logit_D(x))
and the localized ones (a small defect barely moves a mean over the whole image, but it is the
top of a map):
  pixel_local = max of the Gaussian-smoothed residual map |x - x_hat| (channel mean)
  disc_local  = max of the smoothed map softplus(-patch_logit_D(x)) from D's per-pixel head
                (bundles whose discriminator has one)
The anomaly map is the weighted sum of the local maps in use, each scaled by its component's
normal spread (:func:`combined_map`), or the plain residual map when none is.
Held-out normal images come in two parts. The *selection* part gives each component a
mean/std (and chooses the weights); the outlier score is ``sum_k w_k (s_k - mean_k) / std_k``.
The *calibration* part, used for nothing else, sets the threshold (a conformal order
statistic of its scores) and the tail probability (the conformal p-value of a score).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vaegan.service.runtime.errors import InvalidInput

if TYPE_CHECKING:
    from vaegan.service.runtime.preprocess import ImageSpec

__all__ = [
    "ALL_COMPONENTS",
    "COMPONENTS",
    "LOCAL_COMPONENTS",
    "Calibration",
    "anomaly_map",
    "combined_map",
    "gaussian_blur",
    "local_maps",
    "map_full_scale",
    "map_to_uint8",
    "smoothing_sigma",
    "component_stats",
    "conformal_rank",
    "raw_components",
    "softplus",
]

logger = logging.getLogger(__name__)

COMPONENTS = ("pixel", "feature", "disc")  # in every calibration and every response
LOCAL_COMPONENTS = ("pixel_local", "disc_local")  # maxima of smoothed maps
ALL_COMPONENTS = COMPONENTS + LOCAL_COMPONENTS
_WARNED_CAPPED: set[tuple[int, float]] = set()
MAX_WEIGHT = 1e6  # largest |weight| a request may set: scores stay far from float overflow
MAX_STORED_SAMPLES = 4096  # calibration samples kept in the manifest (uniform subsample beyond)


def softplus(v: np.ndarray) -> np.ndarray:
    """log(1 + exp(v)), stable for large |v|."""
    v = np.asarray(v, np.float64)
    return np.maximum(v, 0.0) + np.log1p(np.exp(-np.abs(v)))


def smoothing_sigma(height: int, width: int) -> float:
    """Gaussian sigma (pixels) of the local maps: 1/64 of the longer side, at least 1."""
    return max(1.0, max(height, width) / 64.0)


def gaussian_blur(maps: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of float maps (N, H, W) (truncated at 3 sigma, reflected edges;
    H, W larger than 3 sigma): float32."""
    r = max(1, int(3.0 * sigma + 0.5))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.asarray(maps, np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        window: list[slice] = [slice(None)] * 3
        for j, kj in enumerate(k.astype(np.float32)):
            window[axis] = slice(j, j + n)
            acc += kj * p[tuple(window)]  # a view: no copy per tap
        out = acc
    return out


def local_maps(
    x: np.ndarray, x_hat: np.ndarray, patch: np.ndarray | None, residual: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The smoothed maps behind the local components, float32 (N, H, W) each: ``pixel_local``
    from |x - x_hat| (channel mean), ``disc_local`` from softplus(-patch logits) when D has a
    per-pixel head (``patch`` (N, 1, H, W)). ``residual``: :func:`anomaly_map` of (x, x_hat)
    when the caller already has it."""
    sigma = smoothing_sigma(*x.shape[2:])
    residual = anomaly_map(x, x_hat) if residual is None else residual
    out = {"pixel_local": gaussian_blur(residual, sigma)}
    if patch is not None:
        out["disc_local"] = gaussian_blur(np.logaddexp(np.float32(0.0), -patch[:, 0], dtype=np.float32), sigma)
    return out


def raw_components(
    x: np.ndarray,
    x_hat: np.ndarray,
    feat_x: np.ndarray,
    feat_xhat: np.ndarray,
    logit_x: np.ndarray,
    patch_x: np.ndarray | None = None,
    maps: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per-image components, each float64 (N,). x, x_hat: (N, C, H, W); feats: (N, F); patch_x:
    D's per-pixel logits (N, 1, H, W) or None; ``maps``: :func:`local_maps`, if already made."""
    n = x.shape[0]
    pixel = np.mean((x.reshape(n, -1).astype(np.float64) - x_hat.reshape(n, -1)) ** 2, axis=1)
    feature = np.mean((feat_x.astype(np.float64) - feat_xhat) ** 2, axis=1)
    disc = softplus(-logit_x.reshape(n))
    out = {"pixel": pixel, "feature": feature, "disc": disc}
    maps = local_maps(x, x_hat, patch_x) if maps is None else maps
    for k, m in maps.items():
        out[k] = m.reshape(n, -1).max(axis=1).astype(np.float64)
    return out


def anomaly_map(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """|x - x_hat| averaged over channels: float32 (N, H, W)."""
    return np.abs(x - x_hat).mean(axis=1).astype(np.float32)


def combined_map(
    maps: Mapping[str, np.ndarray],
    residual: np.ndarray,
    calibration: Calibration | None,
    weights: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The anomaly map a response carries, float32 (N, H, W), >= 0: the weighted sum of the local
    maps (:func:`local_maps`) in use, each divided by its component's std (the normal spread of
    its maximum), so maps in different units add up and 0 still means "nothing" (subtracting
    the means too would only shift every pixel by one constant). The weights are the
    calibration's ``map_weights``
    (chosen for localization), else the score weights (with ``weights`` overrides).
    ``residual`` (|x - x_hat|, :func:`anomaly_map`) when no local map has weight, or the bundle
    is uncalibrated or older than local components."""
    if calibration is not None:
        w = dict(calibration.map_weights) or calibration.effective_weights(weights)
        active = [k for k in LOCAL_COMPONENTS if w.get(k, 0.0) != 0.0 and k in maps]
        if active:
            total = np.zeros(maps[active[0]].shape, np.float32)
            for k in active:
                total += np.float32(w[k] / calibration.stats[k][1]) * maps[k]
            return total
    return residual


def component_stats(components: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per-component (mean, std) of raw components, std floored at 1e-12 (a constant component)."""
    return {
        k: (float(np.mean(components[k])), max(float(np.std(components[k])), 1e-12))
        for k in ALL_COMPONENTS
        if k in components
    }


def conformal_rank(n: int, target_fpr: float) -> int:
    """k = ceil((n + 1)(1 - target_fpr)): the 1-indexed rank, among n calibration scores, of the
    conformal threshold. k > n means n is too small for ``target_fpr`` (n < 1/target_fpr - 1)."""
    return math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)  # 1e-9: (n+1)(1-a) exact in decimal


def _check_finite(what: str, name: str, values: np.ndarray | float) -> None:
    bad = ~np.isfinite(np.asarray(values, np.float64))
    if np.any(bad):
        first = np.asarray(values, np.float64).reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
        raise ValueError(f"calibration {what} of component {name!r} is not finite ({first})")


@dataclass
class Calibration:
    """Component statistics, weights and the conformal threshold of a bundle.

    ``samples`` holds the raw components of the *calibration part* of the held-out normals,
    so the threshold and tail probabilities can be recomputed for per-request weights.
    ``stats`` is the per-component (mean, std) used to standardize; it comes from the
    *selection part* (the images that also chose the weights and the checkpoint), never from
    ``samples``. Empty ``stats`` (manifests written before the two parts existed) are derived
    from ``samples``.

    **Threshold** (split conformal): with the n calibration scores sorted, the threshold is the
    k-th smallest, k = ceil((n + 1)(1 - a)), a = ``target_fpr``. For a new normal image
    exchangeable with the calibration images (same distribution, scored by a function that
    did not look at them), ``P(score > threshold) <= a``, and ``>= a - 1/(n + 1)`` when
    scores do not tie. This needs n >= 1/a - 1 (99 at a = 0.01); below that k > n, the
    threshold is the largest calibration score, the false positive rate can reach 1/(n + 1),
    and ``capped`` says so (a warning is logged).

    **Tail probability**: the conformal p-value ``(1 + #{calibration scores >= s}) / (n + 1)``,
    so ``tail_probability <= a`` exactly when ``score > threshold`` (unless ``capped``).

    Every sample, weight and statistic must be finite: a ValueError names the component.
    """

    samples: dict[str, np.ndarray]  # component -> float64 (n,), the calibration part
    weights: dict[str, float]
    target_fpr: float = 0.01
    map_quantile: float = 0.999  # anomaly-map threshold = this quantile of calibration map values
    map_threshold: float = float("inf")
    selection: dict[str, Any] = field(default_factory=dict)  # how the weights were chosen
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # component -> (mean, std)
    stats_source: str = ""  # where ``stats`` came from ("" -> derived from samples)
    parts: dict[str, Any] = field(default_factory=dict)  # the held-out parts: sizes, id hashes
    warnings: list[dict[str, Any]] = field(default_factory=list)  # guard-rail reports that fired
    # weights of the local maps in the served anomaly map, chosen for localization (how well
    # each map finds synthetic corruptions pixel by pixel); empty: the score weights
    map_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in COMPONENTS if k not in self.samples or k not in self.weights]
        if missing:
            raise ValueError(f"calibration lacks components {missing}")
        unknown = sorted(set(self.samples) - set(ALL_COMPONENTS))
        if unknown:
            raise ValueError(f"calibration has unknown components {unknown}; known: {ALL_COMPONENTS}")
        # the bundle's own set: the three base components, plus the local ones it was fitted with
        self.components: tuple[str, ...] = tuple(k for k in ALL_COMPONENTS if k in self.samples)
        if set(self.weights) - set(self.components):
            raise ValueError(f"calibration weights {sorted(self.weights)} for components {self.components}")
        comps = self.components
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        self.samples = {k: np.asarray(self.samples[k], np.float64).reshape(-1) for k in comps}
        self.weights = {k: float(self.weights.get(k, 0.0)) for k in comps}
        n = {len(v) for v in self.samples.values()}
        if len(n) != 1 or n.pop() < 2:
            raise ValueError("calibration needs the same number (>= 2) of samples per component")
        for k in comps:
            _check_finite("samples", k, self.samples[k])
            _check_finite("weight", k, self.weights[k])
        if self.stats:
            lacking = [k for k in comps if k not in self.stats]
            if lacking:
                raise ValueError(f"calibration stats lack components {lacking}")
            self.stats = {k: (float(self.stats[k][0]), float(self.stats[k][1])) for k in comps}
            self.stats_source = self.stats_source or "given"
        else:
            self.stats = component_stats(self.samples)
            self.stats_source = "calibration samples"
        for k, (mean, std) in self.stats.items():
            _check_finite("mean", k, mean)
            _check_finite("std", k, std)
            if std <= 0.0:
                raise ValueError(f"calibration std of component {k!r} must be > 0, got {std}")
        self.map_weights = {k: float(v) for k, v in self.map_weights.items() if k in comps}
        for k, v in self.map_weights.items():
            _check_finite("map weight", k, v)
        if math.isnan(self.map_threshold):
            raise ValueError("calibration map_threshold is NaN")
        self.rank = conformal_rank(self.n, self.target_fpr)
        self.capped = self.rank > self.n
        if self.capped and (self.n, self.target_fpr) not in _WARNED_CAPPED:
            _WARNED_CAPPED.add((self.n, self.target_fpr))  # once per process and size
            logger.warning(
                "calibration: %d images cannot set a threshold at target FPR %g (need >= %d); "
                "the threshold is the largest calibration score and the false positive rate "
                "can reach 1/(n+1) = %.3f",
                self.n, self.target_fpr, self.n_needed, 1.0 / (self.n + 1),
            )
        self._cache: dict[tuple[float, ...], tuple[np.ndarray, float]] = {}

    @property
    def n(self) -> int:
        """Number of calibration samples."""
        return len(self.samples["pixel"])

    @property
    def n_needed(self) -> int:
        """Fewest calibration images for which the conformal threshold exists: ceil(1/a - 1)."""
        return math.ceil(1.0 / self.target_fpr - 1.0 - 1e-9)

    def effective_weights(self, weights: Mapping[str, float] | None = None) -> dict[str, float]:
        """The bundle's weights with per-request overrides applied (validated)."""
        return self._weights(weights)

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        w = dict(self.weights)
        if weights:
            unknown = set(weights) - set(self.components)
            if unknown:
                raise InvalidInput(f"unknown score components {sorted(unknown)}; this model has: {', '.join(self.components)}")
            bad = sorted(k for k, v in weights.items() if not math.isfinite(float(v)))
            if bad:
                raise InvalidInput(f"score weights must be finite; got {bad[0]}={weights[bad[0]]}")
            huge = sorted(k for k, v in weights.items() if abs(float(v)) > MAX_WEIGHT)
            if huge:  # 1e308 overflowed the sum to inf and the threshold to NaN
                raise InvalidInput(f"score weights must be within +-{MAX_WEIGHT:g}; got {huge[0]}={weights[huge[0]]}")
            w.update({k: float(v) for k, v in weights.items()})
        return w

    def combine(
        self, components: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Weighted sum of standardized components: float64 (N,)."""
        w = self._weights(weights)
        stats = self.stats
        total = np.zeros_like(np.asarray(components["pixel"], np.float64))
        for k in self.components:
            if w[k] != 0.0:
                mean, std = stats[k]
                total += w[k] * (np.asarray(components[k], np.float64) - mean) / std
        return total

    def _reference(self, weights: Mapping[str, float] | None) -> tuple[np.ndarray, float]:
        """(sorted calibration scores, threshold) under ``weights``, computed once per weighting."""
        w = self._weights(weights)
        key = tuple(w[k] for k in self.components)
        if key not in self._cache:
            if len(self._cache) > 64:  # per-request weights: keep the memo bounded
                self._cache.clear()
            ref = np.sort(self.combine(self.samples, w))
            self._cache[key] = (ref, float(ref[min(self.rank, self.n) - 1]))
        return self._cache[key]

    def calibration_scores(self, weights: Mapping[str, float] | None = None) -> np.ndarray:
        """Sorted scores of the calibration images under ``weights``."""
        return self._reference(weights)[0]

    def threshold(self, weights: Mapping[str, float] | None = None) -> float:
        """The conformal threshold: the ceil((n + 1)(1 - target_fpr))-th smallest calibration
        score (the largest one when n is too small; see ``capped``)."""
        return self._reference(weights)[1]

    def tail_probability(
        self, scores: np.ndarray, weights: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Conformal p-value (1 + #{calibration scores >= s}) / (n + 1) of each score: float64
        (N,) in [1/(n+1), 1], non-increasing in score."""
        ref = self.calibration_scores(weights)
        below = np.searchsorted(ref, np.asarray(scores, np.float64), side="left")
        return (1.0 + len(ref) - below) / (len(ref) + 1.0)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's calibration block (JSON-ready)."""
        stats = self.stats
        return {
            "n": self.n,
            "target_fpr": self.target_fpr,
            "weights": dict(self.weights),
            "components": {k: {"mean": stats[k][0], "std": stats[k][1]} for k in self.components},
            "stats_source": self.stats_source,
            "threshold": self.threshold(),
            "threshold_rule": {
                "method": "split conformal: k-th smallest calibration score, k = ceil((n+1)(1-a))",
                "k": self.rank,
                "n_needed": self.n_needed,
                "capped": self.capped,
            },
            "map_quantile": self.map_quantile,
            "map_threshold": self.map_threshold,
            "map_weights": dict(self.map_weights),
            "selection": self.selection,
            "parts": self.parts,
            "warnings": list(self.warnings),
            "samples": {k: [float(a) for a in v] for k, v in self.samples.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Read a calibration block; older blocks (no ``stats_source``) derive the stats from
        their samples, as they were written."""
        stats: dict[str, tuple[float, float]] = {}
        if d.get("stats_source"):
            stats = {k: (float(v["mean"]), float(v["std"])) for k, v in d["components"].items()}
        return cls(
            samples={k: np.asarray(v, np.float64) for k, v in d["samples"].items()},
            weights=dict(d["weights"]),
            target_fpr=float(d["target_fpr"]),
            map_quantile=float(d.get("map_quantile", 0.999)),
            map_threshold=float(d.get("map_threshold", float("inf"))),
            map_weights={k: float(v) for k, v in d.get("map_weights", {}).items()},
            selection=dict(d.get("selection", {})),
            stats=stats,
            stats_source=str(d.get("stats_source", "")),
            parts=dict(d.get("parts", {})),
            warnings=list(d.get("warnings", [])),
        )

    @classmethod
    def fit(
        cls,
        components: Mapping[str, np.ndarray],
        weights: Mapping[str, float],
        target_fpr: float = 0.01,
        maps: np.ndarray | None = None,
        map_quantile: float = 0.999,
        selection: dict[str, Any] | None = None,
        seed: int = 0,
        *,
        stats: Mapping[str, tuple[float, float]] | None = None,
        stats_source: str = "selection part",
        parts: dict[str, Any] | None = None,
        warnings: list[dict[str, Any]] | None = None,
    ) -> Calibration:
        """Calibration from the components (and anomaly maps) of the calibration part.

        ``stats``: per-component (mean, std) from the selection part (see
        :func:`component_stats`); ``None`` derives them from ``components`` themselves (then
        the score depends on the calibration images and the guarantee is only approximate).
        """
        n = len(np.asarray(components["pixel"]))
        idx = np.arange(n)
        if n > MAX_STORED_SAMPLES:
            idx = np.sort(np.random.default_rng(seed).choice(n, MAX_STORED_SAMPLES, replace=False))
        map_thr = float(np.quantile(maps, map_quantile)) if maps is not None else float("inf")
        return cls(
            samples={k: np.asarray(components[k], np.float64)[idx] for k in ALL_COMPONENTS if k in components},
            weights=dict(weights),
            target_fpr=target_fpr,
            map_quantile=map_quantile,
            map_threshold=map_thr,
            selection=selection or {},
            stats=dict(stats) if stats is not None else {},
            stats_source=stats_source if stats is not None else "",
            parts=parts or {},
            warnings=list(warnings or []),
        )


def map_full_scale(spec: ImageSpec, calibration: Calibration | None = None) -> float:
    """The anomaly-map value drawn as 255 in PNG maps: twice the calibrated map threshold when
    the served map is made of local maps (:func:`combined_map`), else
    the largest possible |x - x_hat|, max(1 / std)."""
    if calibration is not None and any((calibration.map_weights or calibration.weights).get(k, 0.0) for k in LOCAL_COMPONENTS):
        if math.isfinite(calibration.map_threshold) and calibration.map_threshold > 0:
            return 2.0 * calibration.map_threshold
    return float(max(1.0 / s for s in spec.std))


def map_to_uint8(amap: np.ndarray, full_scale: float) -> np.ndarray:
    """A float anomaly map -> uint8 with ``full_scale`` (:func:`map_full_scale`) drawn as 255:
    the PNG maps of the service and of ``vaegan score --maps-dir``."""
    return np.clip(np.rint(np.asarray(amap) * (255.0 / full_scale)), 0, 255).astype(np.uint8)
