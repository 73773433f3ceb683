"""Detection metrics on numpy arrays (no scikit-learn needed at serving time).

Label 1 = anomalous (positive), 0 = normal; higher score = more anomalous.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["auroc", "average_precision", "bootstrap_ci", "roc_curve", "rates_at_threshold"]


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in length")
    return s, y


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, P(positive > negative) with
    ties counted half; NaN if one class is missing.

    Exact. The larger class is sorted once and the other one's scores are binary-searched in
    it, so millions of pixels with few defect pixels cost one sort without an argsort.
    """
    s, y = _check(scores, labels)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    if pos.size <= neg.size:
        ref = np.sort(neg)
        below = np.searchsorted(ref, pos, side="left")  # negatives under each positive
        ties = np.searchsorted(ref, pos, side="right") - below
        u = float(below.sum()) + 0.5 * float(ties.sum())
    else:
        ref = np.sort(pos)
        upto = np.searchsorted(ref, neg, side="right")  # positives at or under each negative
        ties = upto - np.searchsorted(ref, neg, side="left")
        u = float((pos.size - upto).sum()) + 0.5 * float(ties.sum())
    return u / (pos.size * neg.size)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0.0, tps / max(1, y.sum())]
    fpr = np.r_[0.0, fps / max(1, (~y).sum())]
    return fpr, tpr


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn's AP)."""
    s, y = _check(scores, labels)
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    precision = tps / (distinct + 1)
    recall = tps / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def rates_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """FPR, TPR, precision and F1 of the decision ``score > threshold``."""
    s, y = _check(scores, labels)
    pred = s > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn = int((~pred & y).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "fpr": fp / max(1, int((~y).sum())),
        "tpr": recall,
        "precision": precision,
        "f1": f1,
    }


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over ``n_items`` items (e.g. images).

    Each of ``n_boot`` resamples draws ``n_items`` indices with replacement (numpy's
    ``default_rng(seed)``, so the interval is reproducible) and calls ``statistic(indices)``.
    Resamples whose statistic is not finite (e.g. an AUROC drawn without one class) are
    dropped. Returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles, or
    ``(nan, nan)`` when no resample gave a finite value.
    """
    if n_items < 1 or n_boot < 1:
        raise ValueError(f"need at least one item and one resample, got {n_items} and {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(n_boot)], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)
