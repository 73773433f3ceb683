"""``vaegan score --report DIR``: what a finished table says, as ``summary.json`` and two PNGs.

* ``summary.json``: row, error and flagged counts, the flagged share beside the calibrated
  target FPR (on normal data the share should be near it; far above it means anomalies or a
  shift in the data), score quantiles, the histogram and the top-k ids.
* ``histogram.png``: the score histogram with the threshold marked.
* ``top_k.png``: the most anomalous images, each above its anomaly map (scored again, a few
  images only).

Pillow only: no plotting library needed where batch jobs run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from vaegan.service.batch.decode import decode_chunk
from vaegan.service.batch.score import Scorer
from vaegan.service.batch.table import read_table
from vaegan.service.runtime.visualize import heatmap

__all__ = ["summarize", "write_report"]

BINS = 40
TILE = 128  # pixels: the longer side of a top-k picture


def summarize(table: pa.Table, target_fpr: float | None, top_k: int = 16) -> dict[str, Any]:
    """The numbers of ``summary.json`` from a ``vaegan score`` table."""
    scored = table.filter(pc.is_null(table.column("error")))
    scores = np.asarray(scored.column("score").to_numpy(zero_copy_only=False), np.float64)
    flagged = int(np.count_nonzero(scored.column("is_outlier").to_numpy(zero_copy_only=False)))
    thresholds = scored.column("threshold").to_numpy(zero_copy_only=False) if scored.num_rows else np.array([])
    finite = scores[np.isfinite(scores)]
    out: dict[str, Any] = {
        "rows": table.num_rows,
        "scored": scored.num_rows,
        "errors": table.num_rows - scored.num_rows,
        "flagged": flagged,
        "flagged_share": flagged / scored.num_rows if scored.num_rows else None,
        "target_fpr": target_fpr,
        "flagged_over_target": (flagged / scored.num_rows / target_fpr) if scored.num_rows and target_fpr else None,
        "threshold": float(np.median(thresholds)) if len(thresholds) else None,
        "score_quantiles": {},
        "histogram": {"edges": [], "counts": []},
        "top_k": [],
    }
    if len(finite):
        qs = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)
        out["score_quantiles"] = {str(q): float(v) for q, v in zip(qs, np.quantile(finite, qs), strict=True)}
        counts, edges = np.histogram(finite, bins=BINS)
        out["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        order = np.argsort(-np.where(np.isfinite(scores), scores, -np.inf), kind="stable")[:top_k]
        ids = scored.column("id").to_pylist()
        tails = scored.column("tail_probability").to_pylist()
        out["top_k"] = [{"id": ids[i], "score": float(scores[i]), "tail_probability": tails[i]} for i in order]
    return out


def _histogram_png(path: Path, summary: dict[str, Any]) -> None:
    w, h, pad = 640, 320, 40
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    counts, edges = summary["histogram"]["counts"], summary["histogram"]["edges"]
    d.line([(pad, h - pad), (w - 10, h - pad)], fill=(0, 0, 0))
    d.line([(pad, 10), (pad, h - pad)], fill=(0, 0, 0))
    if counts:
        lo, hi, top = edges[0], edges[-1], max(counts) or 1
        span = (hi - lo) or 1.0
        bw = (w - 10 - pad) / len(counts)
        for i, c in enumerate(counts):
            x0 = pad + i * bw
            y0 = h - pad - (h - pad - 20) * c / top
            d.rectangle([x0 + 1, y0, x0 + bw - 1, h - pad], fill=(70, 110, 180))
        thr = summary["threshold"]
        if thr is not None and lo <= thr <= hi:
            x = pad + (thr - lo) / span * (w - 10 - pad)
            d.line([(x, 10), (x, h - pad)], fill=(200, 30, 30), width=2)
            d.text((x + 3, 12), f"threshold {thr:.2f}", fill=(200, 30, 30))
        d.text((pad, h - pad + 6), f"{lo:.2f}", fill=(0, 0, 0))
        d.text((w - 60, h - pad + 6), f"{hi:.2f}", fill=(0, 0, 0))
        d.text((4, 12), f"{top}", fill=(0, 0, 0))
    share = summary["flagged_share"]
    target = summary["target_fpr"]
    d.text((pad, h - 16), f"score, {summary['scored']} images; flagged "
           f"{'n/a' if share is None else f'{share:.3%}'} (target FPR {'n/a' if target is None else f'{target:.2%}'})",
           fill=(0, 0, 0))
    im.save(path)


def _fit(arr: np.ndarray) -> Image.Image:
    img = Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert("RGB")
    scale = TILE / max(img.width, img.height)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)


def _top_k_png(path: Path, summary: dict[str, Any], paths: Mapping[str, str], scorer: Scorer) -> None:
    top = [t for t in summary["top_k"] if t["id"] in paths]
    if not top:
        return
    chunk = decode_chunk([paths[t["id"]] for t in top], scorer.spec, keep_originals=True)
    if not chunk.ok:
        return
    (_, result), = list(scorer.run(iter([chunk]), maps=True))
    assert result is not None and result.maps is not None
    cols = min(8, len(chunk.ok))
    rows = (len(chunk.ok) + cols - 1) // cols
    cell_w, cell_h = TILE + 6, 2 * TILE + 22
    canvas = Image.new("RGB", (cols * cell_w, rows * cell_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for j, i in enumerate(chunk.ok):
        x, y = (j % cols) * cell_w, (j // cols) * cell_h
        m = result.maps[j]
        assert m is not None and chunk.originals is not None
        canvas.paste(_fit(chunk.originals[j]), (x, y + 12))
        canvas.paste(_fit(heatmap(m.astype(np.float32), 255.0)), (x, y + 14 + TILE))
        d.text((x + 1, y), f"{top[i]['score']:.2f} {top[i]['id'][-14:]}", fill=(0, 0, 0))
    canvas.save(path)


def write_report(report_dir: Path, table_path: Path, schema: pa.Schema, paths: Mapping[str, str],
                 scorer: Scorer, top_k: int = 16) -> dict[str, Any]:
    """Write summary.json, histogram.png and top_k.png for a finished table."""
    report_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(read_table(table_path, schema), scorer.target_fpr, top_k)
    summary["model"] = {"name": scorer.model_name, "version": scorer.model_version}
    summary["table"] = str(table_path)
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _histogram_png(report_dir / "histogram.png", summary)
    _top_k_png(report_dir / "top_k.png", summary, paths, scorer)
    return summary
