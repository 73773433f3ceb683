"""``vaegan evaluate``: detection metrics, report.json and plots for a bundle.

Scores go through the ONNX runtime that serves (``service.runtime``), so the figures are the
service's. Matplotlib draws the ROC curve and score histograms; Pillow the image grid.

With ground-truth masks the report adds MVTec AD's localisation metrics: pixel AUROC over the
pixels of *all* test images (defect-free images contribute normal pixels) and AU-PRO up to a
false positive rate of 0.3. Image AUROC, pixel AUROC and AU-PRO come with percentile bootstrap
intervals over the images (seeded, so a report is reproducible).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime import Runtime
from vaegan.service.runtime.regions import pixel_counts, pro_counts
from vaegan.service.runtime.stats import (
    auroc,
    average_precision,
    bootstrap_ci,
    rates_at_threshold,
    roc_curve,
)
from vaegan.service.runtime.visualize import save_grid
from vaegan.trainer.data import ImageSet

__all__ = ["AU_PRO_MAX_FPR", "CONFIDENCE", "Evaluation", "evaluate", "write_report"]

logger = logging.getLogger(__name__)

AU_PRO_MAX_FPR = 0.3  # MVTec AD's integration limit
CONFIDENCE = 0.95  # of the bootstrap intervals


@dataclass
class Evaluation:
    report: dict[str, Any]
    scores: np.ndarray
    labels: np.ndarray
    components: dict[str, np.ndarray]
    maps: np.ndarray
    reconstructions: np.ndarray


def evaluate(
    rt: Runtime,
    data: ImageSet,
    *,
    batch_size: int = 256,
    progress: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Score every image of ``data`` and compute the metrics of ``report.json``.

    Label 0 is normal, any other label anomalous. When the labels index ``data.class_names``
    (MVTec: ``["good", *defect types]``), the report also breaks image AUROC down by type:
    ``image_auroc_by_type`` (good vs that type only) and ``n_by_type``; ``None`` when the labels
    were already folded to 0/1 over a longer class list.

    With masks: ``pixel_auroc`` over the pixels of all images (as MVTec AD: defect-free images
    contribute normal pixels, defect pixels are the positives) and ``au_pro`` (per-region
    overlap integrated over FPR 0..0.3, normalized; see :func:`service.runtime.regions.au_pro`).
    ``image_auroc_ci``, ``pixel_auroc_ci`` and ``au_pro_ci`` are [low, high] 95% percentile
    bootstrap intervals from ``n_boot`` resamples of the images (seed ``seed``); the pixel ones
    are computed on per-image histograms (4096 bins; 2000+ thresholds for AU-PRO), which moves
    them by less than 1e-3. A metric that cannot be computed is ``None``.
    """
    from tqdm.auto import tqdm

    labels = (np.asarray(data.labels) != 0).astype(np.int64)
    parts = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(data), batch_size), desc="scoring", disable=None if progress else True, leave=False):
        parts.append(rt.score(data.images[i : i + batch_size], with_reconstruction=True))
    seconds = time.perf_counter() - t0
    scores = np.concatenate([p.score for p in parts])
    comps = {k: np.concatenate([p.components[k] for p in parts]) for k in parts[0].components}
    maps = np.concatenate([p.anomaly_map for p in parts])
    recon = np.concatenate([p.reconstruction for p in parts])  # type: ignore[misc]
    thr = parts[0].threshold
    rates = rates_at_threshold(scores, labels, thr)
    t_metrics = time.perf_counter()
    image_ci = None
    if labels.any() and not labels.all():
        image_ci = _interval(lambda idx: auroc(scores[idx], labels[idx]), len(labels), n_boot, seed)
    local = _localisation(maps, data.masks, n_boot, seed)
    by_type, n_by_type = _by_type(scores, data)
    cal = rt.bundle.calibration
    report = {
        "model": {"name": rt.bundle.name, "version": rt.bundle.version},
        "n_normal": int((labels == 0).sum()),
        "n_anomalous": int((labels == 1).sum()),
        "image_auroc": auroc(scores, labels),
        "image_auprc": average_precision(scores, labels),
        "f1": rates["f1"],
        "precision": rates["precision"],
        "threshold": thr,
        "target_fpr": cal.target_fpr if cal else None,
        "fpr_at_threshold": rates["fpr"],
        "tpr_at_threshold": rates["tpr"],
        "component_auroc": {k: auroc(v, labels) for k, v in comps.items()},
        "weights": cal.weights if cal else None,
        "image_auroc_ci": image_ci,
        "image_auroc_by_type": by_type,
        "n_by_type": n_by_type,
        **local,
        "bootstrap": {"resamples": n_boot, "seed": seed, "confidence": CONFIDENCE, "unit": "image"},
        "metrics_seconds": time.perf_counter() - t_metrics,
        "images_per_second": len(data) / seconds if seconds > 0 else None,
        "provider": rt.provider,
    }
    from vaegan.trainer.guards import collapse_report

    normal = labels == 0 if (labels == 0).any() else np.ones(len(labels), bool)
    report["collapse"] = collapse_report(recon[normal], data.images[normal])  # guard rails
    report["calibration_warnings"] = list(cal.warnings) if cal else []
    return Evaluation(report, scores, labels, comps, maps, recon)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _interval(fn: Callable[[np.ndarray], float], n: int, n_boot: int, seed: int) -> list[float] | None:
    lo, hi = bootstrap_ci(fn, n, n_boot=n_boot, seed=seed, confidence=CONFIDENCE)
    return None if not (np.isfinite(lo) and np.isfinite(hi)) else [lo, hi]


def _localisation(maps: np.ndarray, masks: np.ndarray | None, n_boot: int, seed: int) -> dict[str, Any]:
    """pixel_auroc, au_pro and their bootstrap intervals; None without defect and normal pixels."""
    out: dict[str, Any] = {"pixel_auroc": None, "pixel_auroc_ci": None, "au_pro": None, "au_pro_ci": None,
                           "au_pro_max_fpr": AU_PRO_MAX_FPR}
    if masks is None or not masks.any() or masks.all():
        return out
    n = len(maps)
    out["pixel_auroc"] = _finite(auroc(maps.ravel(), masks.ravel()))
    pixels = pixel_counts(maps, masks)
    out["pixel_auroc_ci"] = _interval(lambda idx: pixels.auroc(np.bincount(idx, minlength=n)), n, n_boot, seed)
    pro = pro_counts(maps, masks, max_fpr=AU_PRO_MAX_FPR)
    out["au_pro"] = _finite(pro.area(AU_PRO_MAX_FPR))
    out["au_pro_ci"] = _interval(
        lambda idx: pro.area(AU_PRO_MAX_FPR, np.bincount(idx, minlength=n)), n, n_boot, seed
    )
    return out


def _type_names(data: ImageSet) -> list[str] | None:
    """``data.class_names`` when the labels index them (0 = normal), else None."""
    labels, names = np.asarray(data.labels), list(data.class_names)
    if labels.size == 0 or labels.min() < 0 or labels.max() >= len(names):
        return None
    if len(names) != 2 and np.unique(labels).size <= 2:
        return None  # 0/1 labels over a longer class list: the classes were folded already
    return names


def _by_type(scores: np.ndarray, data: ImageSet) -> tuple[dict[str, float | None] | None, dict[str, int] | None]:
    """({anomaly type: AUROC of normal vs that type}, {class name: image count})."""
    names = _type_names(data)
    if names is None:
        return None, None
    types = np.asarray(data.labels)
    normal = types == 0
    aurocs: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for k, name in enumerate(names):
        this = types == k
        if not this.any():
            continue
        counts[name] = int(this.sum())
        if k:
            keep = normal | this
            aurocs[name] = _finite(auroc(scores[keep], this[keep])) if normal.any() else None
    return aurocs, counts


def write_report(ev: Evaluation, data: ImageSet, out: Path, n_grid: int = 8) -> list[Path]:
    """report.json, roc.png, histogram.png and extremes.png into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    (out / "report.json").write_text(json.dumps(ev.report, indent=2) + "\n")
    rep = ev.report
    if rep["n_normal"] and rep["n_anomalous"]:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        fpr, tpr = roc_curve(ev.scores, ev.labels)
        ax.plot(fpr, tpr, label=f"score (AUROC {rep['image_auroc']:.3f})", lw=2)
        for k, v in ev.components.items():
            f, t = roc_curve(v, ev.labels)
            ax.plot(f, t, lw=1, alpha=0.7, label=f"{k} alone ({rep['component_auroc'][k]:.3f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.scatter([rep["fpr_at_threshold"]], [rep["tpr_at_threshold"]], c="k", zorder=5, label="threshold")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC — {rep['model']['name']}")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=110)
        plt.close(fig)
        written.append(out / "roc.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(np.quantile(ev.scores, 0.001), np.quantile(ev.scores, 0.999), 60)
    ax.hist(ev.scores[ev.labels == 0], bins=bins, alpha=0.6, density=True, label="normal")
    if rep["n_anomalous"]:
        ax.hist(ev.scores[ev.labels == 1], bins=bins, alpha=0.6, density=True, label="anomalous")
    ax.axvline(rep["threshold"], color="k", ls="--", label=f"threshold {rep['threshold']:.2f}")
    ax.set(xlabel="outlier score", ylabel="density", title="score distribution")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "histogram.png", dpi=110)
    plt.close(fig)
    written.append(out / "histogram.png")
    order = np.argsort(ev.scores)
    pick = np.r_[order[-n_grid:][::-1], order[:n_grid]]
    titles = [f"{'hi' if j < n_grid else 'lo'} {ev.scores[i]:.1f}{'*' if ev.labels[i] else ''}" for j, i in enumerate(pick)]
    save_grid(out / "extremes.png", data.images[pick], ev.reconstructions[pick], ev.maps[pick], titles=titles)
    written.append(out / "extremes.png")
    return written
