"""Train -> export -> calibrate, as ``vaegan train`` runs it."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models import ModelConfig
from service.runtime.preprocess import ImageSpec
from trainer.config import TrainConfig
from trainer.data import NATIVE, ImageSet, load_dataset
from trainer.loop import RunResult, fit, split_normal

__all__ = ["TrainOutcome", "export_checkpoint", "image_spec_for", "load_split", "train_and_export"]

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run: RunResult
    bundle_dir: Path


def image_spec_for(dataset: str, image_size: int | None, channels: int | None) -> ImageSpec:
    """Model input spec: the dataset's native channels/size unless overridden."""
    native_c, native_s = NATIVE[dataset]
    size = image_size or native_s
    return ImageSpec(channels=channels or native_c, height=size, width=size, mean=(0.5,), std=(0.5,))


def load_split(cfg: TrainConfig, spec: ImageSpec) -> tuple[ImageSet, ImageSet]:
    """The normal training images and the held-out calibration images, deterministically.

    The same (dataset, root, normal class, seed, val_fraction) always gives the same split, so
    ``vaegan export`` can calibrate a checkpoint on exactly the images training held out.
    """
    data = load_dataset(cfg.dataset, cfg.data_root, "train", spec, seed=cfg.seed)
    if cfg.normal_class is not None:
        keep = (data.labels == cfg.normal_class).nonzero()[0]
        if len(keep) == 0:
            raise ValueError(f"--normal-class {cfg.normal_class}: no such class in {cfg.dataset}")
        data = data.subset(keep)
    train, val = split_normal(data, cfg.val_fraction, cfg.seed)
    if cfg.max_train is not None and len(train) > cfg.max_train:
        train = train.subset(np.arange(cfg.max_train))
    return train, val


def select_checkpoint(run: RunResult, how: str) -> Path:
    """``last``, or the epoch whose held-out normals are best separated from their corrupted
    copies (``val_selection_auroc``); no test labels involved."""
    if how == "last" or not run.history:
        return run.checkpoint
    best = max(run.history, key=lambda r: r.get("val_selection_auroc", float("-inf")))
    path = run.checkpoint.parent / f"epoch_{int(best['epoch']):03d}.pt"
    logger.info("selected epoch %d (selection AUROC %.4f)", best["epoch"], best.get("val_selection_auroc", float("nan")))
    return path if path.is_file() else run.checkpoint


def training_summary(cfg: TrainConfig, history: list[dict[str, float]], n_train: int, n_val: int) -> dict[str, Any]:
    last = history[-1] if history else {}
    return {
        "dataset": cfg.dataset,
        "normal_class": cfg.normal_class,
        "epochs": int(last.get("epoch", 0)),
        "seed": cfg.seed,
        "n_train": n_train,
        "n_calibration": n_val,
        "losses": {k: v for k, v in last.items() if k not in ("epoch", "seconds")},
        "train_seconds": last.get("seconds"),
        "train_config": cfg.to_dict(),
    }


def _bundle_from_checkpoint(
    ckpt: dict[str, Any],
    source: str,
    out_dir: Path,
    *,
    name: str | None,
    version: int,
    n_train: int,
    val: ImageSet | None,
) -> dict[str, Any]:
    """Export a checkpoint (its configs and image spec travel inside it) and, given the
    held-out normals, calibrate the bundle on them. Returns the manifest as exported."""
    from export import write_bundle
    from trainer.calibrate import calibrate_bundle
    from trainer.checkpoint import model_from_checkpoint

    cfg = TrainConfig.from_dict(ckpt["train_config"])
    training = training_summary(cfg, list(ckpt["history"]), n_train, 0 if val is None else len(val))
    training["selected_checkpoint"] = source
    default_name = cfg.dataset + (f"-{cfg.normal_class}" if cfg.normal_class is not None else "")
    manifest = write_bundle(
        model_from_checkpoint(ckpt), ImageSpec.from_dict(ckpt["image_spec"]), out_dir,
        name=name or default_name, version=version, training=training,
    )
    if val is not None:
        calibrate_bundle(out_dir, val.images, target_fpr=cfg.target_fpr, seed=cfg.seed)
    return manifest


def export_checkpoint(
    checkpoint: Path, out_dir: Path, *, name: str | None = None, version: int = 1, calibrate: bool = True
) -> dict[str, Any]:
    """``vaegan export``: ONNX + manifest from a checkpoint; calibrated on the held-out split
    that training used (rebuilt from the configs inside the checkpoint) unless told not to."""
    from trainer.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    n_train, val = 0, None
    if calibrate:
        train, val = load_split(TrainConfig.from_dict(ckpt["train_config"]), ImageSpec.from_dict(ckpt["image_spec"]))
        n_train = len(train)
    return _bundle_from_checkpoint(ckpt, checkpoint.name, out_dir, name=name, version=version, n_train=n_train, val=val)


def train_and_export(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    spec: ImageSpec,
    run_dir: Path,
    *,
    name: str | None = None,
    resume: bool = False,
    tensorboard: bool = False,
    progress: bool = True,
) -> TrainOutcome:
    """The whole ``vaegan train``: load data, fit, export ``run_dir/bundle``, calibrate it."""
    train, val = load_split(cfg, spec)
    logger.info("training on %d normal images, %d held out for calibration", len(train), len(val))
    fill = tuple(float(v) for v in (train.images.reshape(-1, spec.channels).mean(0) / 255.0))
    spec = dataclasses.replace(spec, fill=fill)

    run = fit(cfg, model_cfg, spec, train, val, run_dir, resume=resume, tensorboard=tensorboard, progress=progress)
    bundle_dir = run_dir / "bundle"
    chosen = select_checkpoint(run, cfg.select_checkpoint)
    from trainer.checkpoint import load_checkpoint

    _bundle_from_checkpoint(load_checkpoint(chosen), chosen.name, bundle_dir, name=name, version=1, n_train=len(train), val=val)
    (run_dir / "history.json").write_text(json.dumps(run.history, indent=2) + "\n")
    return TrainOutcome(run, bundle_dir)
