"""The pictures a training run leaves beside ``history.json``.

- ``RUN_DIR/losses.png``: every named loss term per epoch, the training mean beside the same
  term on held-out normals (the selection part), one panel per term.
- ``RUN_DIR/samples.png``: one row per epoch (at most :data:`MAX_ROWS`, evenly spaced), prior
  samples from a fixed set of latent codes, then reconstructions of a fixed set of held-out
  images; the top row shows those images. Built from ``RUN_DIR/samples/epoch_NNN.png``, written
  as each epoch ends, so a resumed run still shows every epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["MAX_ROWS", "LOSS_TERMS", "epoch_row", "write_epoch_row", "write_losses_png", "write_samples_png"]

logger = logging.getLogger(__name__)

MAX_ROWS = 24
# the terms train_step returns; history rows carry them as "kl" (train) and "val_kl" (held out)
LOSS_TERMS = ("kl", "recon_feature", "recon_pixel", "adv_g", "adv_d", "patch_d")
GAP = 4  # pixels between the samples and the reconstructions


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """Normalized float (N, C, H, W) in -1..1 -> uint8 (N, H, W, C)."""
    return np.clip((x.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def _strip(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) side by side -> (H, N * W, C)."""
    return np.concatenate(list(images), axis=1)


def epoch_row(samples: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """One row of samples.png: float (N, C, H, W) prior samples, a gap, float reconstructions;
    uint8 (H, W_total, C)."""
    s, r = _strip(_to_uint8(samples)), _strip(_to_uint8(reconstructions))
    gap = np.full((s.shape[0], GAP, s.shape[2]), 255, np.uint8)
    return np.concatenate([s, gap, r], axis=1)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(tmp)
    tmp.replace(path)


def write_epoch_row(run_dir: Path, epoch: int, samples: np.ndarray, reconstructions: np.ndarray, real: np.ndarray) -> None:
    """Save epoch ``epoch``'s row (and, once, the row of the ``real`` images under their
    reconstructions) under ``run_dir/samples``; all inputs normalized float (N, C, H, W)."""
    _save(epoch_row(samples, reconstructions), run_dir / "samples" / f"epoch_{epoch:03d}.png")
    real_path = run_dir / "samples" / "real.png"
    if not real_path.exists():
        _save(epoch_row(np.ones_like(samples), real), real_path)  # white where the samples go


def write_samples_png(run_dir: Path) -> Path | None:
    """Assemble ``run_dir/samples.png`` from the per-epoch rows, each labelled with its epoch."""
    folder = run_dir / "samples"
    rows = sorted(folder.glob("epoch_*.png")) if folder.is_dir() else []
    if not rows:
        return None
    if len(rows) > MAX_ROWS:
        keep = np.unique(np.linspace(0, len(rows) - 1, MAX_ROWS).round().astype(int))
        rows = [rows[i] for i in keep]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in rows]
    labels = [f"epoch {int(p.stem.removeprefix('epoch_'))}" for p in rows]
    real = folder / "real.png"
    if real.exists():
        images.insert(0, np.asarray(Image.open(real).convert("RGB")))
        labels.insert(0, "held-out images")
    label_w = 64
    h, w = images[0].shape[:2]
    canvas = Image.new("RGB", (label_w + w, (h + 2) * len(images) + 16), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((label_w, 2), "prior samples (fixed codes)", fill="black")
    draw.text((label_w + (w + GAP) // 2, 2), "reconstructions", fill="black")
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        top = 16 + i * (h + 2)
        canvas.paste(Image.fromarray(img[:, :w]), (label_w, top))
        draw.text((2, top + max(0, h // 2 - 6)), label, fill="black")
    out = run_dir / "samples.png"
    canvas.save(out)
    return out


def write_losses_png(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
    """``run_dir/losses.png``: one panel per loss term, train and held-out per epoch."""
    terms = [t for t in LOSS_TERMS if any(t in r for r in history)]
    if not history or not terms:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = 3
    nrows = (len(terms) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    epochs = [r["epoch"] for r in history]
    for ax, term in zip(axes.flat, terms, strict=False):
        for key, label, style in ((term, "train", "-o"), (f"val_{term}", "held out", "--s")):
            ys = [r.get(key, np.nan) for r in history]
            if not all(np.isnan(ys)):
                ax.plot(epochs, ys, style, label=label, markersize=3)
        ax.set_title(term)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(terms):]:
        ax.axis("off")
    fig.tight_layout()
    out = run_dir / "losses.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
