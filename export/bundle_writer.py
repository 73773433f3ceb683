"""Writes a complete bundle: the three graphs, their composed pipeline, then manifest.json with
checksums."""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from pathlib import Path
from typing import Any

from vaegan.export.onnx_export import IR_VERSION, OPSET, PARITY_TOLERANCE, export_graphs
from vaegan.models import VAEGAN
from vaegan.service.runtime.bundle import (
    FORMAT_VERSION,
    GRAPHS,
    PIPELINE,
    graph_signatures,
    write_manifest,
)
from vaegan.service.runtime.compose import compose_pipeline
from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.service.runtime.scoring import Calibration

__all__ = ["build_manifest", "git_revision", "write_bundle", "write_pipeline"]

logger = logging.getLogger(__name__)


def git_revision() -> str | None:
    """The source tree's git commit, if it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_pipeline(out_dir: Path, spec: ImageSpec) -> bool:
    """Compose the three exported graphs into ``pipeline.onnx`` (uint8 images in, normalization
    inside; see service.runtime.compose), so that serving loads one graph and never imports
    onnx. False, with a warning, when they cannot be composed (the runtime then runs three)."""
    paths = [out_dir / GRAPHS[g] for g in ("encoder", "generator", "discriminator")]
    try:
        model = compose_pipeline(*paths, mean=spec.mean, std=spec.std)
    except ValueError as e:
        logger.warning("%s: no composed pipeline graph (%s); the runtime will run the three graphs", out_dir, e)
        (out_dir / PIPELINE).unlink(missing_ok=True)
        return False
    (out_dir / PIPELINE).write_bytes(model)
    return True


def build_manifest(
    model: VAEGAN,
    spec: ImageSpec,
    *,
    name: str,
    version: int,
    parity: dict[str, float],
    training: dict[str, Any],
    calibration: Calibration | None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """The manifest of a bundle (its ``files`` are filled in by ``write_manifest``). A
    conditional model's manifest also has ``classes``: the name of each class id, in order
    (``class_names``, or the ids as text)."""
    cfg = model.cfg
    classes: dict[str, Any] = {}
    if cfg.conditional:
        names = [str(n) for n in (class_names or [])]
        classes["classes"] = names if len(names) == cfg.num_classes else [str(i) for i in range(cfg.num_classes)]
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "image": spec.to_dict(),
        "latent_dim": cfg.latent_dim,
        "feature_dim": cfg.feature_dim,
        "model_config": cfg.to_dict(),
        "onnx": {
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "parity_tolerance": PARITY_TOLERANCE,
            "parity_max_abs_error": parity,
        },
        **classes,
        "graphs": graph_signatures(spec, cfg.latent_dim, cfg.feature_dim, cfg.patch_head, cfg.num_classes),
        "calibration": calibration.to_dict() if calibration is not None else None,
        "training": training,
    }


def write_bundle(
    model: VAEGAN,
    spec: ImageSpec,
    out_dir: Path,
    *,
    name: str = "vaegan",
    version: int = 1,
    training: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Export the graphs (parity-checked) and write the manifest. Returns the manifest.
    ``class_names``: a conditional model's class names (index = label)."""
    out_dir = Path(out_dir)
    parity = export_graphs(model, spec, out_dir)
    write_pipeline(out_dir, spec)
    training = dict(training or {})
    training.setdefault("git_revision", git_revision())
    manifest = build_manifest(
        model, spec, name=name, version=version, parity=parity,
        training=training, calibration=calibration, class_names=class_names,
    )
    return write_manifest(out_dir, manifest)
