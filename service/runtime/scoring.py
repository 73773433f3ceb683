"""Score components and their calibration (DESIGN.md section 4). Numpy only.

Components, for normalized inputs x and reconstructions x_hat = G(mu(x)):
  pixel   = mean((x - x_hat)^2)
  feature = mean((f_D(x) - f_D(x_hat))^2)
  disc    = softplus(-logit_D(x))
Calibration on held-out normal images gives each component a mean/std; the outlier score is
``sum_k w_k (s_k - mean_k) / std_k``; the threshold is the (1 - target_fpr) quantile of the
calibration scores; the tail probability is the share of calibration scores >= a score.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.runtime.errors import InvalidInput

__all__ = [
    "COMPONENTS",
    "Calibration",
    "anomaly_map",
    "raw_components",
    "softplus",
]

COMPONENTS = ("pixel", "feature", "disc")
MAX_STORED_SAMPLES = 4096  # calibration samples kept in the manifest (uniform subsample beyond)


def softplus(v: np.ndarray) -> np.ndarray:
    """log(1 + exp(v)), stable for large |v|."""
    v = np.asarray(v, np.float64)
    return np.maximum(v, 0.0) + np.log1p(np.exp(-np.abs(v)))


def raw_components(
    x: np.ndarray,
    x_hat: np.ndarray,
    feat_x: np.ndarray,
    feat_xhat: np.ndarray,
    logit_x: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-image components, each float64 (N,). x, x_hat: (N, C, H, W); feats: (N, F)."""
    n = x.shape[0]
    pixel = np.mean((x.reshape(n, -1).astype(np.float64) - x_hat.reshape(n, -1)) ** 2, axis=1)
    feature = np.mean((feat_x.astype(np.float64) - feat_xhat) ** 2, axis=1)
    disc = softplus(-logit_x.reshape(n))
    return {"pixel": pixel, "feature": feature, "disc": disc}


def anomaly_map(x: np.ndarray, x_hat: np.ndarray) -> np.ndarray:
    """|x - x_hat| averaged over channels: float32 (N, H, W)."""
    return np.abs(x - x_hat).mean(axis=1).astype(np.float32)


@dataclass
class Calibration:
    """Per-component statistics of held-out normal images, and what follows from them.

    ``samples`` holds the raw components of the calibration images, so the threshold and tail
    probabilities can be recomputed for per-request weights.
    """

    samples: dict[str, np.ndarray]  # component -> float64 (n,)
    weights: dict[str, float]
    target_fpr: float = 0.01
    map_quantile: float = 0.999  # anomaly-map threshold = this quantile of calibration map values
    map_threshold: float = float("inf")
    selection: dict[str, Any] = field(default_factory=dict)  # how the weights were chosen

    def __post_init__(self) -> None:
        missing = [k for k in COMPONENTS if k not in self.samples or k not in self.weights]
        if missing:
            raise ValueError(f"calibration lacks components {missing}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in (0, 1), got {self.target_fpr}")
        self.samples = {k: np.asarray(self.samples[k], np.float64) for k in COMPONENTS}
        self.weights = {k: float(self.weights[k]) for k in COMPONENTS}
        n = {len(v) for v in self.samples.values()}
        if len(n) != 1 or n.pop() < 2:
            raise ValueError("calibration needs the same number (>= 2) of samples per component")
        # derived once: per-component (mean, std), and sorted scores / thresholds per weighting
        self.stats: dict[str, tuple[float, float]] = {
            k: (float(v.mean()), max(float(v.std()), 1e-12)) for k, v in self.samples.items()
        }
        self._cache: dict[tuple[float, ...], tuple[np.ndarray, float]] = {}

    @property
    def n(self) -> int:
        return len(self.samples["pixel"])

    def _weights(self, weights: Mapping[str, float] | None) -> dict[str, float]:
        w = dict(self.weights)
        if weights:
            unknown = set(weights) - set(COMPONENTS)
            if unknown:
                raise InvalidInput(f"unknown score components {sorted(unknown)}; known: {COMPONENTS}")
            w.update({k: float(v) for k, v in weights.items()})
        return w

    def combine(
        self, components: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Weighted sum of standardized components: float64 (N,)."""
        w = self._weights(weights)
        stats = self.stats
        total = np.zeros_like(np.asarray(components["pixel"], np.float64))
        for k in COMPONENTS:
            if w[k] != 0.0:
                mean, std = stats[k]
                total += w[k] * (np.asarray(components[k], np.float64) - mean) / std
        return total

    def _reference(self, weights: Mapping[str, float] | None) -> tuple[np.ndarray, float]:
        """(sorted calibration scores, threshold) under ``weights``, computed once per weighting."""
        w = self._weights(weights)
        key = tuple(w[k] for k in COMPONENTS)
        if key not in self._cache:
            if len(self._cache) > 64:  # per-request weights: keep the memo bounded
                self._cache.clear()
            ref = np.sort(self.combine(self.samples, w))
            self._cache[key] = (ref, float(np.quantile(ref, 1.0 - self.target_fpr)))
        return self._cache[key]

    def calibration_scores(self, weights: Mapping[str, float] | None = None) -> np.ndarray:
        """Sorted scores of the calibration images under ``weights``."""
        return self._reference(weights)[0]

    def threshold(self, weights: Mapping[str, float] | None = None) -> float:
        """The (1 - target_fpr) quantile of calibration scores."""
        return self._reference(weights)[1]

    def tail_probability(
        self, scores: np.ndarray, weights: Mapping[str, float] | None = None
    ) -> np.ndarray:
        """Share of calibration scores >= each score: float64 (N,), non-increasing in score."""
        ref = self.calibration_scores(weights)
        below = np.searchsorted(ref, np.asarray(scores, np.float64), side="left")
        return (len(ref) - below) / len(ref)

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "n": self.n,
            "target_fpr": self.target_fpr,
            "weights": dict(self.weights),
            "components": {k: {"mean": stats[k][0], "std": stats[k][1]} for k in COMPONENTS},
            "threshold": self.threshold(),
            "map_quantile": self.map_quantile,
            "map_threshold": self.map_threshold,
            "selection": self.selection,
            "samples": {k: [float(a) for a in v] for k, v in self.samples.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls(
            samples={k: np.asarray(v, np.float64) for k, v in d["samples"].items()},
            weights=dict(d["weights"]),
            target_fpr=float(d["target_fpr"]),
            map_quantile=float(d.get("map_quantile", 0.999)),
            map_threshold=float(d.get("map_threshold", float("inf"))),
            selection=dict(d.get("selection", {})),
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
    ) -> Calibration:
        """Calibration from the components (and anomaly maps) of held-out normal images."""
        n = len(np.asarray(components["pixel"]))
        idx = np.arange(n)
        if n > MAX_STORED_SAMPLES:
            idx = np.sort(np.random.default_rng(seed).choice(n, MAX_STORED_SAMPLES, replace=False))
        map_thr = float(np.quantile(maps, map_quantile)) if maps is not None else float("inf")
        return cls(
            samples={k: np.asarray(components[k], np.float64)[idx] for k in COMPONENTS},
            weights=dict(weights),
            target_fpr=target_fpr,
            map_quantile=map_quantile,
            map_threshold=map_thr,
            selection=selection or {},
        )
