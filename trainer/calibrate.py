"""Calibration on held-out normal images, through the exact ONNX scoring path that serves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.runtime import Calibration, Runtime
from service.runtime.bundle import GRAPHS, load_bundle, write_manifest
from service.runtime.scoring import COMPONENTS, anomaly_map, raw_components
from trainer.selection import corrupt, select_weights

__all__ = ["calibrate_bundle", "components_of"]

logger = logging.getLogger(__name__)

def components_of(rt: Runtime, images: np.ndarray, batch: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Raw components and anomaly maps of uint8 (N, H, W, C) images at model size."""
    comps: dict[str, list[np.ndarray]] = {k: [] for k in COMPONENTS}
    maps = []
    for i in range(0, len(images), batch):
        fwd = rt.forward_images(images[i : i + batch])
        for k, v in raw_components(fwd.x, fwd.x_hat, fwd.feat_x, fwd.feat_xhat, fwd.logit).items():
            comps[k].append(v)
        maps.append(anomaly_map(fwd.x, fwd.x_hat))
    return {k: np.concatenate(v) for k, v in comps.items()}, np.concatenate(maps)


def calibrate_bundle(
    bundle_dir: str | Path,
    normal_images: np.ndarray,
    *,
    target_fpr: float = 0.01,
    weights: dict[str, float] | None = None,
    selection: dict[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    bump_version: bool = False,
) -> Calibration:
    """Fit the calibration on normal images (uint8 (N, H, W, C), model size) and store it.

    ``weights=None`` chooses them without labels (:func:`trainer.selection.select_weights`: the
    weighting that best separates these normals from corrupted copies of them). Writes into
    ``out_dir`` (default: the bundle itself) with the sha256 entries recomputed;
    ``bump_version`` increments the manifest's version (recalibrating an existing bundle).
    """
    bundle = load_bundle(bundle_dir)
    rt = Runtime(bundle, providers="cpu")
    comps, maps = components_of(rt, normal_images)
    if weights is None:
        corrupted, _ = components_of(rt, corrupt(normal_images, seed=seed)[0])
        weights, report = select_weights(comps, corrupted)
        selection = {**report, **(selection or {})}
    else:
        selection = {"method": "given", **(selection or {})}
    cal = Calibration.fit(comps, weights, target_fpr=target_fpr, maps=maps, selection=selection)
    manifest = dict(bundle.manifest)
    manifest["calibration"] = cal.to_dict()
    if bump_version:
        manifest["version"] = int(manifest.get("version", 1)) + 1
    dest = Path(out_dir) if out_dir is not None else bundle.path
    if dest != bundle.path:
        import shutil

        dest.mkdir(parents=True, exist_ok=True)
        for f in GRAPHS.values():
            shutil.copy2(bundle.path / f, dest / f)
    write_manifest(dest, manifest)
    logger.info(
        "calibrated on %d normal images: weights %s, threshold %.3f at target FPR %.3f",
        cal.n, cal.weights, cal.threshold(), target_fpr,
    )
    return cal
