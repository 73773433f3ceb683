"""Train -> export -> calibrate, as ``vaegan train`` runs it."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.models import ModelConfig
from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.trainer.config import TrainConfig
from vaegan.trainer.data import NATIVE, DatasetError, ImageSet, load_dataset
from vaegan.trainer.loop import RunResult, fit, split_normal
from vaegan.trainer.selection import part_record, split_held_out

__all__ = [
    "NormalSplit",
    "TrainOutcome",
    "conditional_config",
    "export_checkpoint",
    "image_spec_for",
    "load_split",
    "train_and_export",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What ``vaegan train`` produced; ``warnings``: the guard-rail reports that fired."""

    run: RunResult
    bundle_dir: Path
    warnings: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # False on ranks > 0 of a torchrun job: they train but write nothing


@dataclass
class NormalSplit:
    """A run's normal images in three disjoint parts (no image id is in two of them).

    ``train`` is trained on; ``selection`` (per-epoch validation, checkpoint choice, score
    weights, component mean/std) and ``calibration`` (the threshold, nothing else) are the
    held-out normals. ``held_out_from``: how many held-out images each source gave.
    """

    train: ImageSet
    selection: ImageSet
    calibration: ImageSet
    held_out_from: dict[str, int] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Sizes and id hashes of the parts, for the manifest's ``calibration.parts``."""
        return {
            "train": part_record(self.train),
            "selection": part_record(self.selection),
            "calibration": part_record(self.calibration),
            "held_out_from": dict(self.held_out_from),
        }


def _normal_only(data: ImageSet, cfg: TrainConfig, split: str) -> ImageSet:
    if cfg.normal_class is None:
        return data
    keep = (data.labels == cfg.normal_class).nonzero()[0]
    if len(keep) == 0 and split == "train":
        raise ValueError(f"--normal-class {cfg.normal_class}: no such class in {cfg.dataset}")
    return data.subset(keep)


def _concat(a: ImageSet, b: ImageSet, names: tuple[str, str]) -> ImageSet:
    """``a`` then ``b``; ids that collide get their split's name as a prefix."""
    ids_a, ids_b = list(a.ids or []), list(b.ids or [])
    if set(ids_a) & set(ids_b):
        ids_a, ids_b = [f"{names[0]}:{i}" for i in ids_a], [f"{names[1]}:{i}" for i in ids_b]
    masks = None if a.masks is None or b.masks is None else np.concatenate([a.masks, b.masks])
    return ImageSet(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]), masks,
                    list(a.class_names), ids_a + ids_b)


def image_spec_for(
    dataset: str, image_size: int | None, channels: int | None, data_root: str | Path | None = None
) -> ImageSpec:
    """Model input spec: the dataset's native channels/size unless overridden.

    For ``folder`` with a ``data_root``, what is not given follows the images' headers
    (:func:`trainer.data.folder.folder_defaults`): 1 channel when all are grey, else 3; the
    largest side seen, clamped to 28..256. So a folder of 28x28 grey images trains as 28x28x1.
    """
    native_c, native_s = NATIVE[dataset]
    if dataset == "folder" and data_root is not None and (image_size is None or channels is None):
        from vaegan.trainer.data.folder import folder_defaults

        found = folder_defaults(Path(data_root).expanduser())
        if found is not None:
            native_c, native_s = found
            logger.info("folder defaults from the images in %s: %d channel(s), %dx%d", data_root, *found, found[1])
    size = image_size or native_s
    return ImageSpec(channels=channels or native_c, height=size, width=size, mean=(0.5,), std=(0.5,))


def load_split(cfg: TrainConfig, spec: ImageSpec) -> NormalSplit:
    """The normal training images and the two held-out parts, deterministically.

    Held-out normals = ``val_fraction`` of the train split (seeded) plus, when the dataset has
    one (``mvtec``), its whole ``validation`` split; they are then cut (seeded,
    ``selection_fraction``) into the selection and calibration parts. The same (dataset,
    root, normal class, seed, fractions) always gives the same parts, so ``vaegan export`` and
    ``vaegan calibrate --dataset`` rebuild exactly the images training held out.
    """
    data = _normal_only(load_dataset(cfg.dataset, cfg.data_root, "train", spec, seed=cfg.seed), cfg, "train")
    train, held = split_normal(data, cfg.val_fraction, cfg.seed)
    held_out_from = {"train": len(held)}
    try:
        val = load_dataset(cfg.dataset, cfg.data_root, "validation", spec, seed=cfg.seed)
    except DatasetError as e:  # most datasets have no validation split
        logger.debug("no validation split: %s", e)
    else:
        val = _normal_only(val, cfg, "validation")
        held = _concat(held, val, ("train", "validation"))
        held_out_from["validation"] = len(val)
    if cfg.max_train is not None and len(train) > cfg.max_train:
        train = train.subset(np.arange(cfg.max_train))
    selection, calibration = split_held_out(held, cfg.selection_fraction, cfg.seed)
    return NormalSplit(train, selection, calibration, held_out_from)


def conditional_config(cfg: TrainConfig, model_cfg: ModelConfig, train: ImageSet) -> ModelConfig:
    """The model config for ``cfg``: with ``cfg.conditional``, one label per class of the
    training images (``num_classes`` = the dataset's class count, so a label is its class id);
    otherwise ``model_cfg`` as it is.

    Raises ValueError (one line, for the CLI) when the training images do not carry at least
    two classes, e.g. the synthetic, mvtec or flat-folder normals; or when ``model_cfg`` asks
    for classes without ``cfg.conditional``, or for another count than the data has.
    """
    if not cfg.conditional:
        if model_cfg.num_classes:
            raise ValueError(f"the model config has num_classes {model_cfg.num_classes} but conditional training is off (--conditional)")
        return model_cfg
    present = np.unique(train.labels)
    if len(present) < 2:
        names = ", ".join(repr(train.class_names[int(c)]) if 0 <= c < len(train.class_names) else str(int(c)) for c in present)
        raise ValueError(
            f"--conditional needs training images of at least 2 classes, but the {cfg.dataset} training images "
            f"are all of one ({names or 'none'}); use a labelled dataset (mnist, fashion-mnist, cifar10, or a folder "
            "with one sub-folder per class) or drop --conditional"
        )
    k = max(len(train.class_names), int(present.max()) + 1)
    if model_cfg.num_classes not in (0, k):
        raise ValueError(f"the model config has num_classes {model_cfg.num_classes} but {cfg.dataset} has {k} classes")
    return dataclasses.replace(model_cfg, num_classes=k)


def select_checkpoint(run: RunResult, how: str) -> Path:
    """``last``, or the epoch whose selection-part normals are best separated from their
    corrupted copies (``val_selection_auroc``); no test labels, no calibration images."""
    if how == "last" or not run.history:
        return run.checkpoint
    best = max(run.history, key=lambda r: r.get("val_selection_auroc", float("-inf")))
    path = run.checkpoint.parent / f"epoch_{int(best['epoch']):03d}.pt"
    logger.info("selected epoch %d (selection AUROC %.4f)", best["epoch"], best.get("val_selection_auroc", float("nan")))
    return path if path.is_file() else run.checkpoint


def training_summary(
    cfg: TrainConfig, history: list[dict[str, float]], n_train: int, n_val: int, n_selection: int = 0,
    distributed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``training`` block (``n_val``: the calibration part's size;
    ``distributed``: world size and backend of the run, :meth:`DistContext.record`)."""
    last = history[-1] if history else {}
    distributed = distributed or {"world_size": 1, "backend": None}
    return {
        "dataset": cfg.dataset,
        "normal_class": cfg.normal_class,
        "epochs": int(last.get("epoch", 0)),
        "seed": cfg.seed,
        "n_train": n_train,
        "n_selection": n_selection,
        "n_calibration": n_val,
        "losses": {k: v for k, v in last.items() if k not in ("epoch", "seconds")},
        "train_seconds": last.get("seconds"),
        "world_size": int(distributed.get("world_size", 1)),
        "backend": distributed.get("backend"),
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
    split: NormalSplit | None,
) -> dict[str, Any]:
    """Export a checkpoint (its configs and image spec travel inside it) and, given the
    held-out parts, calibrate the bundle on them (weights and mean/std from the selection
    part, threshold from the calibration part; guard rails logged and recorded). Returns the
    manifest as written."""
    from vaegan.export import write_bundle
    from vaegan.trainer.calibrate import calibrate_bundle
    from vaegan.trainer.checkpoint import model_from_checkpoint

    cfg = TrainConfig.from_dict(ckpt["train_config"])
    training = training_summary(
        cfg, list(ckpt["history"]), n_train,
        0 if split is None else len(split.calibration), 0 if split is None else len(split.selection),
        ckpt.get("distributed"),
    )
    training["selected_checkpoint"] = source
    default_name = cfg.dataset + (f"-{cfg.normal_class}" if cfg.normal_class is not None else "")
    manifest = write_bundle(
        model_from_checkpoint(ckpt), ImageSpec.from_dict(ckpt["image_spec"]), out_dir,
        name=name or default_name, version=version, training=training, class_names=ckpt.get("class_names"),
    )
    if split is not None:
        calibrate_bundle(
            out_dir, split.calibration.images, selection_images=split.selection.images,
            target_fpr=cfg.target_fpr, seed=cfg.seed, parts=split.record(), record_in_training=True,
        )
        manifest = json.loads((out_dir / "manifest.json").read_text())
    return manifest


def checkpoint_split(ckpt: dict[str, Any]) -> NormalSplit:
    """The held-out parts a checkpoint's training used, rebuilt from the configs inside it."""
    return load_split(TrainConfig.from_dict(ckpt["train_config"]), ImageSpec.from_dict(ckpt["image_spec"]))


def export_checkpoint(
    checkpoint: Path, out_dir: Path, *, name: str | None = None, version: int = 1, calibrate: bool = True,
    split: NormalSplit | None = None,
) -> dict[str, Any]:
    """``vaegan export``: ONNX + manifest from a checkpoint; calibrated on the held-out split
    that training used (rebuilt from the configs inside the checkpoint, unless the caller has
    it already: ``split``) unless told not to."""
    from vaegan.trainer.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    n_train = 0
    if not calibrate:
        split = None
    elif split is None:
        split = checkpoint_split(ckpt)
    if split is not None:
        n_train = len(split.train)
    return _bundle_from_checkpoint(ckpt, checkpoint.name, out_dir, name=name, version=version, n_train=n_train, split=split)


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
    """The whole ``vaegan train``: load data, fit, export ``run_dir/bundle``, calibrate it.

    The selection part validates every epoch and chooses the checkpoint and weights; the
    calibration part only sets the threshold. With ``cfg.conditional`` the model gets one class
    per dataset class (:func:`conditional_config`; ``model_cfg.num_classes`` is filled in). Guard-rail warnings (collapsed generator,
    calibration set too small) are logged loudly and returned in ``TrainOutcome.warnings``.

    Under ``torchrun`` every process trains its share of each global batch
    (:mod:`trainer.distributed`); rank 0 alone selects, exports and calibrates, and the other
    ranks return an outcome with ``is_main=False`` once training is over.
    """
    from vaegan.trainer.distributed import setup, teardown

    ctx, device = setup(cfg.device)
    try:
        return _train_and_export(cfg, model_cfg, spec, run_dir, name=name, resume=resume, tensorboard=tensorboard,
                                 progress=progress, ctx=ctx, device=device)
    finally:
        teardown(ctx)


def _train_and_export(
    cfg: TrainConfig, model_cfg: ModelConfig, spec: ImageSpec, run_dir: Path, *, name: str | None, resume: bool,
    tensorboard: bool, progress: bool, ctx: Any, device: Any,
) -> TrainOutcome:
    split = load_split(cfg, spec)
    train = split.train
    model_cfg = conditional_config(cfg, model_cfg, train)  # before any training: a clear error
    logger.info(
        "training on %d normal images; held out %d for selection (checkpoint, weights, mean/std) "
        "and %d for calibration (threshold only)", len(train), len(split.selection), len(split.calibration),
    )
    fill = tuple(float(v) for v in (train.images.reshape(-1, spec.channels).mean(0) / 255.0))
    spec = dataclasses.replace(spec, fill=fill)

    run = fit(cfg, model_cfg, spec, train, split.selection, run_dir, resume=resume, tensorboard=tensorboard,
              progress=progress, dist=ctx, device=device)
    bundle_dir = run_dir / "bundle"
    if not ctx.is_main:
        return TrainOutcome(run, bundle_dir, is_main=False)
    chosen = select_checkpoint(run, cfg.select_checkpoint)
    from vaegan.trainer.checkpoint import load_checkpoint

    manifest = _bundle_from_checkpoint(
        load_checkpoint(chosen), chosen.name, bundle_dir, name=name, version=1, n_train=len(train), split=split,
    )
    (run_dir / "history.json").write_text(json.dumps(run.history, indent=2) + "\n")
    warnings = list((manifest.get("calibration") or {}).get("warnings", []))
    if warnings:
        logger.warning(
            "training finished with %d guard-rail warning(s) (%s): review the bundle %s before "
            "deploying it; details above and under calibration.warnings in its manifest.json",
            len(warnings), ", ".join(w["kind"] for w in warnings), bundle_dir,
        )
    return TrainOutcome(run, bundle_dir, warnings)
