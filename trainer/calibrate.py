"""Calibration on held-out normal images, through the exact ONNX scoring path that serves.

Two parts of held-out normals go in: the *selection* part chooses the score weights and gives
the component mean/std; the *calibration* part, looked at by nothing else, sets the conformal
threshold (:class:`service.runtime.Calibration`). The guard rails (:mod:`trainer.guards`) run
on the way: a collapsed generator or a calibration set too small for the target FPR is logged
loudly and recorded under the manifest's ``calibration.warnings``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime import Calibration, Runtime
from vaegan.service.runtime.bundle import bundle_files, load_bundle, write_manifest
from vaegan.service.runtime.preprocess import denormalize
from vaegan.service.runtime.scoring import (
    anomaly_map,
    combined_map,
    component_stats,
    local_maps,
    raw_components,
)
from vaegan.trainer.guards import (
    calibration_size_report,
    collapse_report,
    fired_warnings,
    log_warnings,
)
from vaegan.trainer.selection import corrupt, select_map_weights, select_weights

__all__ = ["calibrate_bundle", "components_of"]

logger = logging.getLogger(__name__)


def _forward_all(
    rt: Runtime, images: np.ndarray, batch: int = 256, reconstructions: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None]:
    """(raw components, maps: the local maps and ``residual``, reconstructions if asked)."""
    comps: dict[str, list[np.ndarray]] = {}
    maps: dict[str, list[np.ndarray]] = {}
    recon = []
    for i in range(0, len(images), batch):
        fwd = rt.forward_images(images[i : i + batch])
        residual = anomaly_map(fwd.x, fwd.x_hat)
        local = local_maps(fwd.x, fwd.x_hat, fwd.patch, residual)
        for k, v in raw_components(fwd.x, fwd.x_hat, fwd.feat_x, fwd.feat_xhat, fwd.logit, fwd.patch, local).items():
            comps.setdefault(k, []).append(v)
        for k, v in {**local, "residual": residual}.items():
            maps.setdefault(k, []).append(v)
        if reconstructions:
            recon.append(denormalize(fwd.x_hat, rt.spec))
    return (
        {k: np.concatenate(v) for k, v in comps.items()},
        {k: np.concatenate(v) for k, v in maps.items()},
        np.concatenate(recon) if reconstructions else None,
    )


def components_of(rt: Runtime, images: np.ndarray, batch: int = 256) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Raw components and maps (local maps and ``residual``) of uint8 (N, H, W, C) images at
    model size."""
    comps, maps, _ = _forward_all(rt, images, batch)
    return comps, maps


def calibrate_bundle(
    bundle_dir: str | Path,
    normal_images: np.ndarray,
    *,
    selection_images: np.ndarray | None = None,
    target_fpr: float = 0.01,
    weights: dict[str, float] | None = None,
    selection: dict[str, Any] | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    bump_version: bool = False,
    parts: dict[str, Any] | None = None,
    size_remedy: str | None = None,
    record_in_training: bool = False,
) -> Calibration:
    """Fit the calibration and store it in the bundle's manifest.

    Args:
        normal_images: the *calibration part*, uint8 (N, H, W, C) at model size: sets the
            threshold and tail probabilities, nothing else.
        selection_images: the *selection part*: gives the component mean/std and, with
            ``weights=None``, chooses the weights without labels
            (:func:`trainer.selection.select_weights`: the weighting that best separates these
            normals from corrupted copies of them). ``None``: ``weights`` must be given and the
            mean/std are kept from the bundle's current calibration.
        parts: sizes and id hashes of the parts, stored as ``calibration.parts``.
        size_remedy: what the too-small-calibration warning tells the user to do.
        record_in_training: also store the guard reports under ``training.checks`` and the
            fired ones under ``training.warnings`` (``vaegan train`` / ``vaegan export``).

    Writes into ``out_dir`` (default: the bundle itself) with the sha256 entries recomputed;
    ``bump_version`` increments the manifest's version (recalibrating an existing bundle).

    A conditional bundle is calibrated in the mode its runtime scores by default, each image
    against its best class: the selection part (and its corrupted copies) as an uncalibrated
    bundle scores them (best class = lowest pixel error), the calibration part as the
    calibrated bundle will (best class = lowest score under the weights and mean/std just
    chosen), so the threshold is a conformal quantile of exactly the served scores.
    """
    bundle = load_bundle(bundle_dir)
    # the selection part is scored as an uncalibrated bundle scores (this only matters for a
    # conditional bundle, whose best class depends on the calibration)
    rt = Runtime(dataclasses.replace(bundle, calibration=None), providers="cpu")
    for k, v in (weights or {}).items():  # a NaN weight fails here, before any scoring
        if not np.isfinite(float(v)):
            raise ValueError(f"calibration weight of component {k!r} is not finite ({v})")
    if selection_images is not None:
        sel_comps, _, _ = _forward_all(rt, selection_images)
        stats, stats_source = component_stats(sel_comps), "selection part"
        corrupted_images = corrupt(selection_images, seed=seed)[0]
        corrupted, corrupted_maps = components_of(rt, corrupted_images)
        if weights is None:
            weights, report = select_weights(sel_comps, corrupted)
            selection = {**report, **(selection or {})}
        else:
            selection = {"method": "given", **(selection or {})}
        changed = (corrupted_images != selection_images).any(axis=-1)  # (N, H, W)
        map_weights, map_report = select_map_weights(corrupted_maps, changed, stats, seed=seed)
        selection["map_weights"] = map_report
        reference = sel_comps
    else:
        if weights is None:
            raise ValueError("choosing weights without labels needs a selection part (selection_images)")
        if bundle.calibration is None:
            raise ValueError("fixed weights without a selection part need a calibrated bundle (its component mean/std)")
        stats = dict(bundle.calibration.stats)
        stats_source = f"kept from the previous calibration ({bundle.calibration.stats_source})"
        map_weights = dict(bundle.calibration.map_weights)
        selection = {"method": "given", **(selection or {})}
        reference = bundle.calibration.samples
    if bundle.conditional:
        # the calibration part, scored as the calibrated bundle will score: best classes under
        # these weights and mean/std (the scorer's samples and threshold play no part in that)
        scorer = Calibration.fit(reference, weights, target_fpr=0.5, stats=stats)
        rt.bundle = dataclasses.replace(bundle, calibration=scorer)
    comps, maps, recon = _forward_all(rt, normal_images, reconstructions=True)
    assert recon is not None
    comps = {k: v for k, v in comps.items() if k in stats}  # the components the stats are of
    checks = {
        "collapse": collapse_report(recon, normal_images),
        "calibration_size": calibration_size_report(len(normal_images), target_fpr, size_remedy),
    }
    warnings = fired_warnings(checks.values())
    log_warnings(warnings, f"calibrating {bundle.path}", logger)
    cal = Calibration.fit(
        comps, weights, target_fpr=target_fpr, selection=selection, seed=seed,
        stats=stats, stats_source=stats_source, parts=parts, warnings=warnings,
    )
    cal = dataclasses.replace(cal, map_weights=map_weights)
    # the repair threshold: a high quantile of the calibration images' served anomaly maps,
    # which depend on the weights and stats just fixed
    served = combined_map(maps, maps["residual"], cal)
    cal = dataclasses.replace(cal, map_threshold=float(np.quantile(served, cal.map_quantile)))
    manifest = dict(bundle.manifest)
    manifest["calibration"] = cal.to_dict()
    if record_in_training:
        training = dict(manifest.get("training") or {})
        training["checks"] = checks
        training["warnings"] = [w["kind"] for w in warnings]
        manifest["training"] = training
    if bump_version:
        manifest["version"] = int(manifest.get("version", 1)) + 1
    dest = Path(out_dir) if out_dir is not None else bundle.path
    if dest != bundle.path:
        import shutil

        dest.mkdir(parents=True, exist_ok=True)
        for f in bundle_files(bundle.path):
            shutil.copy2(bundle.path / f, dest / f)
    write_manifest(dest, manifest)
    logger.info(
        "calibrated on %d normal images (mean/std from the %s): weights %s, threshold %.3f at "
        "target FPR %g (conformal rank %d of %d)",
        cal.n, stats_source, cal.weights, cal.threshold(), target_fpr, min(cal.rank, cal.n), cal.n,
    )
    return cal
