"""``vaegan evaluate``: detection metrics, report.json and plots for a bundle.

Scores go through the ONNX runtime that serves (``service.runtime``), so the figures are the
service's. Matplotlib draws the ROC curve and score histograms; Pillow the image grid.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime import Runtime
from service.runtime.stats import auroc, average_precision, rates_at_threshold, roc_curve
from service.runtime.visualize import save_grid
from trainer.data import ImageSet

__all__ = ["Evaluation", "evaluate", "write_report"]

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    report: dict[str, Any]
    scores: np.ndarray
    labels: np.ndarray
    components: dict[str, np.ndarray]
    maps: np.ndarray
    reconstructions: np.ndarray


def evaluate(rt: Runtime, data: ImageSet, *, batch_size: int = 256, progress: bool = True) -> Evaluation:
    """Score every image of ``data`` (label != 0 is anomalous) and compute the metrics."""
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
    pixel_auroc = None
    if data.masks is not None and labels.any():
        anomalous = labels == 1
        pixel_auroc = auroc(maps[anomalous].ravel(), data.masks[anomalous].ravel())
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
        "pixel_auroc": pixel_auroc,
        "images_per_second": len(data) / seconds if seconds > 0 else None,
        "provider": rt.provider,
    }
    return Evaluation(report, scores, labels, comps, maps, recon)


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
