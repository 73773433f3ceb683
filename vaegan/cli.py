"""``vaegan`` — one entry point. Every subcommand imports its heavy modules lazily, so
``vaegan serve`` and ``vaegan score`` run without torch installed.

Errors the user can fix (bad arguments, missing files, a bad bundle) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

logger = logging.getLogger("vaegan")

EXIT_USAGE = 2
# a module the code imports -> the extra that installs it
EXTRA_OF = {
    "torch": "train", "torchvision": "train", "onnx": "train", "tqdm": "train", "tensorboard": "train",
    "matplotlib": "train", "pyarrow": "batch",
}

# trainer.data.DATASETS and SPLITS, spelt out so that building the parser imports no trainer
# module (vaegan serve runs without the training code); a test checks that they agree
DATASETS = ("synthetic", "mnist", "fashion-mnist", "cifar10", "folder", "mvtec")
SPLITS = ("train", "validation", "test")


class CliError(Exception):
    """A user-fixable problem: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (plus a --help hint), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"VAEGAN_{name}", default)


# ---- train ------------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a VAE-GAN on normal images, export and calibrate a bundle",
                       description="Fit on normal images; writes checkpoints, logs and RUN_DIR/bundle/.")
    p.add_argument("--dataset", default="synthetic", choices=DATASETS)
    p.add_argument("--data-root", type=Path, help="folder with the dataset files (not for synthetic)")
    p.add_argument("--normal-class", type=int, help="one-class protocol: train on this class id only")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, logs, bundle/)")
    p.add_argument("--name", help="bundle name (default: dataset[-class])")
    _add_model_flags(p)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for E, G and D")
    g.add_argument("--kl-weight", type=float, default=1.0, help="KL weight per pixel element")
    g.add_argument("--feature-weight", type=float, default=1.0, help="reconstruction in D's feature layer")
    g.add_argument("--pixel-weight", type=float, default=1.0, help="pixel MSE reconstruction")
    g.add_argument("--adv-weight", type=float, default=0.01, help="adversarial weight (0 or --adv-loss none: plain VAE)")
    g.add_argument("--adv-loss", default="lsgan", choices=["lsgan", "bce", "none"])
    g.add_argument("--d-lr-scale", type=float, default=1.0, help="D's learning rate = --lr times this")
    g.add_argument("--d-noise", type=float, default=0.0, help="std of instance noise on D's inputs in its update")
    g.add_argument("--patch-weight", type=float, default=1.0,
                   help="weight of D's per-pixel (patch head) loss, relative to its image-level loss")
    g.add_argument("--d-negatives", default="erase,local",
                   help="comma list of erase,paste,swap,rot,local: real images altered in shape that D "
                        "must call fake (negative data augmentation; makes the disc score informative; "
                        "local: small defects, where D's per-pixel head learns to localize); "
                        "'' for none; default %(default)s")
    g.add_argument("--ema-decay", type=float, default=0.0,
                   help="> 0: select, calibrate and export a moving average of the weights (e.g. 0.999)")
    g.add_argument("--mask-prob", type=float, default=0.5,
                   help="share of batches trained with holes (inpainting; 0: none); default %(default)s")
    g.add_argument("--hole-kinds", default="rects,centre,strokes",
                   help="comma list of the training holes' shapes: rects, centre, strokes; default %(default)s")
    g.add_argument("--hole-weight", type=float, default=0.0,
                   help="extra pixel loss inside the holes of a masked batch (its weight); default %(default)s")
    g.add_argument("--input-noise", type=float, default=0.0, metavar="SIGMA",
                   help="denoising variant: the encoder sees the image plus Gaussian noise of this std "
                        "(normalized units, images in -1..1); every loss targets the clean image")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay on the encoder and generator (not D); default %(default)s")
    g.add_argument("--conditional", action="store_true",
                   help="the conditional VAE-GAN (CVAE-GAN): E, G and D take each image's class label; for "
                        "data with several normal classes (not with --normal-class); the bundle scores an "
                        "image against a given class or, by default, its best class")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the normal training images held out (never trained on), plus the "
                        "dataset's own validation split where it has one; default %(default)s")
    g.add_argument("--selection-fraction", type=float, default=0.5,
                   help="share of the held-out normals that choose the checkpoint, the weights and the "
                        "component mean/std; the rest only sets the threshold; default %(default)s")
    g.add_argument("--max-train", type=int, help="cap the number of training images")
    g.add_argument("--target-fpr", type=float, default=0.01)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 mixed precision for training; auto: on CUDA only; bf16 on a CPU with native "
                        "bf16 (AVX512-BF16/AMX) is 1.6x faster at some cost in AUROC; default %(default)s")
    g.add_argument("--no-channels-last", action="store_true",
                   help="train in NCHW memory format instead of channels-last (slower; bit-for-bit "
                        "equal results between 1 and N data-parallel processes)")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars and image grids")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, help="model image side, 28..256 (default: the dataset's)")
    g.add_argument("--channels", type=int, choices=[1, 3], help="model channels (default: the dataset's)")
    g.add_argument("--latent-dim", type=int, default=64)
    g.add_argument("--base-width", type=int, default=32)
    g.add_argument("--no-spectral-norm", action="store_true", help="plain discriminator layers")
    g.add_argument("--no-patch-head", action="store_true",
                   help="no per-pixel head on D (no disc_local component; the model of earlier versions)")


def _train_configs(a: argparse.Namespace):  # noqa: ANN202 - returns three configs
    from vaegan.models import ModelConfig
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.pipeline import image_spec_for

    if a.dataset != "synthetic" and a.data_root is None:
        raise CliError(f"--data-root is required for --dataset {a.dataset}")
    try:
        cfg = TrainConfig(
            dataset=a.dataset, data_root=str(a.data_root) if a.data_root else None,
            normal_class=a.normal_class, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
            kl_weight=a.kl_weight, feature_weight=a.feature_weight, pixel_weight=a.pixel_weight,
            adv_weight=a.adv_weight, adv_loss=a.adv_loss, d_lr_scale=a.d_lr_scale, d_noise=a.d_noise,
            d_negatives=a.d_negatives, patch_weight=a.patch_weight, ema_decay=a.ema_decay,
            mask_prob=a.mask_prob, hole_kinds=a.hole_kinds, hole_weight=a.hole_weight, input_noise=a.input_noise, weight_decay=a.weight_decay,
            conditional=a.conditional, val_fraction=a.val_fraction, selection_fraction=a.selection_fraction,
            max_train=a.max_train, target_fpr=a.target_fpr,
            seed=a.seed, device=a.device, autocast=a.autocast, channels_last=not a.no_channels_last,
            num_workers=a.num_workers,
        )
        spec = image_spec_for(a.dataset, a.image_size, a.channels, a.data_root)
        model_cfg = ModelConfig(
            num_channels=spec.channels, image_size=spec.height, latent_dim=a.latent_dim,
            base_width=a.base_width, spectral_norm=not a.no_spectral_norm, patch_head=not a.no_patch_head,
        )
    except ValueError as e:
        raise CliError(str(e)) from e
    return cfg, model_cfg, spec


def _cmd_train(a: argparse.Namespace) -> int:
    from vaegan.trainer.pipeline import train_and_export

    cfg, model_cfg, spec = _train_configs(a)
    out = train_and_export(
        cfg, model_cfg, spec, a.out, name=a.name, resume=a.resume,
        tensorboard=a.tensorboard, progress=not a.no_progress,
    )
    if not out.is_main:  # a torchrun rank > 0: rank 0 reports
        return 0
    last = out.run.history[-1] if out.run.history else {}
    print(f"trained {out.run.epochs} epochs in {out.run.seconds:.0f} s "
          f"(val pixel {last.get('val_pixel', float('nan')):.4f}); bundle: {out.bundle_dir}")
    return 0


# ---- export -----------------------------------------------------------------------------
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to an ONNX bundle (parity-checked)")
    p.add_argument("--checkpoint", type=Path, required=True, help="a .pt written by vaegan train")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--name", help="bundle name (default: dataset[-class])")
    p.add_argument("--version", type=int, default=1, help="bundle version (a positive integer)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip calibration on the training run's held-out normals")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="int8: ONNX Runtime static quantization calibrated on the held-out normals (CPU); "
                        "fp16: for GPUs; both recalibrated and refused when they detect worse than fp32 "
                        "(see --max-auroc-drop); default %(default)s")
    p.add_argument("--max-auroc-drop", type=float, default=0.002,
                   help="refuse a reduced-precision bundle whose AUROC on held-out normals vs corrupted "
                        "copies is lower than fp32's by more than this; default %(default)s")
    p.set_defaults(func=_cmd_export)


def _cmd_export(a: argparse.Namespace) -> int:
    from vaegan.trainer.pipeline import export_checkpoint

    if not a.checkpoint.is_file():
        raise CliError(f"--checkpoint {a.checkpoint}: no such file")
    if a.version < 1:
        raise CliError("--version must be a positive integer")
    if a.precision != "fp32":
        from vaegan.export.quantize import PrecisionRefused, export_at_precision

        if a.no_calibrate:
            raise CliError(f"--precision {a.precision} needs the held-out normals: drop --no-calibrate")
        try:
            manifest = export_at_precision(a.checkpoint, a.out, a.precision, name=a.name, version=a.version,
                                           max_auroc_drop=a.max_auroc_drop)
        except PrecisionRefused as e:
            print(f"vaegan export: {e}", file=sys.stderr)
            return 3
        p = manifest["precision"]
        errs = ", ".join(f"{k} {v:.1e}" for k, v in p["component_max_abs_error"].items())
        print(f"wrote {a.out} ({manifest['name']} v{manifest['version']}, {a.precision}; AUROC {p['auroc']:.4f} "
              f"vs fp32 {p['auroc_fp32']:.4f}; component max abs error: {errs})")
        return 0
    manifest = export_checkpoint(a.checkpoint, a.out, name=a.name, version=a.version, calibrate=not a.no_calibrate)
    errs = ", ".join(f"{k} {v:.1e}" for k, v in manifest["onnx"]["parity_max_abs_error"].items())
    print(f"wrote {a.out} ({manifest['name']} v{manifest['version']}; parity max abs error: {errs})")
    return 0


# ---- calibrate / evaluate -------------------------------------------------------------
def _add_data_source(p: argparse.ArgumentParser, *, pair: bool) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS,
                   help="mvtec: ROOT/test/good is normal, every ROOT/test/<type> anomalous (no --normal-class)")
    g.add_argument("--data-root", type=Path)
    g.add_argument("--normal-class", type=int, help="the normal class (others are anomalies)")
    g.add_argument("--split", default="test", choices=SPLITS,
                   help="default %(default)s; validation: mvtec's validation/good only")
    g.add_argument("--limit", type=int, help="use at most this many images")
    if pair:
        g.add_argument("--normal", type=Path, help="folder of normal images")
        g.add_argument("--anomalous", type=Path, help="folder of anomalous images")
        g.add_argument("--masks", type=Path, help="defect masks, same file names as --anomalous")
    else:
        g.add_argument("--data", type=Path, help="folder of normal images")


def _load_eval_data(a: argparse.Namespace, spec, pair: bool):  # noqa: ANN001, ANN202
    """The images to calibrate on (``pair=False``: normal images only) or to evaluate
    (``pair=True``: label 0 normal, label k > 0 anomalous of type ``class_names[k]``)."""
    from vaegan.trainer.data import load_dataset, load_folder_pair

    if pair and a.normal is not None:
        if a.anomalous is None:
            raise CliError("--normal needs --anomalous")
        return load_folder_pair(a.normal, a.anomalous, a.masks, spec)
    if not pair and a.data is not None:
        return load_dataset("folder", a.data, a.split, spec, limit=a.limit)
    if a.dataset is None:
        raise CliError("give --dataset (with --normal-class) or " + ("--normal/--anomalous" if pair else "--data"))
    if a.dataset != "synthetic" and a.data_root is None:
        raise CliError(f"--data-root is required for --dataset {a.dataset}")
    if a.dataset == "mvtec" and a.normal_class is not None:
        raise CliError("--normal-class does not apply to --dataset mvtec: its good images are the normal class")
    data = load_dataset(a.dataset, a.data_root, a.split, spec, limit=a.limit)
    if a.dataset == "mvtec":  # good = label 0 in every split; defect types keep their labels
        return data if pair else data.subset((data.labels == 0).nonzero()[0])
    if a.normal_class is not None:
        if not 0 <= a.normal_class < len(data.class_names):
            raise CliError(f"--normal-class {a.normal_class}: {a.dataset} has classes 0..{len(data.class_names) - 1}")
        if not pair:
            data = data.subset((data.labels == a.normal_class).nonzero()[0])
        else:
            data = _normal_class_first(data, a.normal_class)
    elif a.dataset != "synthetic":
        raise CliError("--normal-class is required for a labelled dataset")
    return data


def _normal_class_first(data, normal_class: int):  # noqa: ANN001, ANN202 - an ImageSet
    """Relabel so that ``normal_class`` is 0 and every other class keeps its own label and
    name (class_names reordered to match): evaluation reports each anomaly class apart."""
    import numpy as np

    names = list(data.class_names)
    order = [normal_class, *(c for c in range(len(names)) if c != normal_class)]
    new_label = np.empty(len(names), np.int64)
    new_label[order] = np.arange(len(names))
    data.labels = new_label[data.labels]
    data.class_names = [names[c] for c in order]
    return data


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="recalibrate a bundle on new normal data (new version)")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--out", type=Path, help="write the recalibrated bundle here (default: in place)")
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--weights", help="fixed weights pixel,feature,disc (default: chosen without labels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--selection-fraction", type=float,
                   help="share of the images that choose the weights and the component mean/std; the "
                        "rest sets the threshold (default: the training run's, else 0.5)")
    _add_data_source(p, pair=False)
    # never the test split by default: with --dataset, the calibration part training held out
    p.set_defaults(func=_cmd_calibrate, split="train")


def _same_data(a: argparse.Namespace, train_cfg: dict) -> bool:
    """Do --dataset/--data-root/--normal-class name the data the bundle was trained on?"""
    if a.dataset != train_cfg.get("dataset") or a.normal_class != train_cfg.get("normal_class"):
        return False
    if a.dataset == "synthetic":
        return True
    root = train_cfg.get("data_root")
    return a.data_root is not None and root is not None and Path(a.data_root).resolve() == Path(root).resolve()


def _calibration_parts(a: argparse.Namespace, bundle, need_selection: bool):  # noqa: ANN001, ANN202
    """(selection images or None, calibration images, parts record) for ``vaegan calibrate``.

    ``--dataset`` naming the bundle's training data (train split): the selection and
    calibration parts exactly as training built them. Anything else (``--data``, other data,
    an explicit ``--split test``): the images given, split into a selection and a calibration
    part by the function training uses when weights or mean/std must be chosen, else all for
    calibration.
    """
    import numpy as np

    from vaegan.trainer.selection import part_record, split_held_out

    train_cfg = (bundle.manifest.get("training") or {}).get("train_config")
    if a.data is None and a.dataset is not None and a.split == "train" and train_cfg and _same_data(a, train_cfg):
        from vaegan.trainer.config import TrainConfig
        from vaegan.trainer.pipeline import load_split

        split = load_split(TrainConfig.from_dict(train_cfg), bundle.spec)
        sel, cal = split.selection, split.calibration
        if a.limit is not None:
            sel, cal = sel.subset(np.arange(min(a.limit, len(sel)))), cal.subset(np.arange(min(a.limit, len(cal))))
        logger.info("calibrating on the parts training held out from %s: %d selection, %d calibration images",
                    a.dataset, len(sel), len(cal))
        parts = {**split.record(), "selection": part_record(sel), "calibration": part_record(cal),
                 "source": "the training run's held-out parts"}
        return sel, cal, parts
    data = _load_eval_data(a, bundle.spec, pair=False)
    if a.data is None and a.split == "test":
        logger.warning("calibrating on the TEST split's normal images: an evaluation on the same test split "
                       "will then overstate how well the threshold holds")
    elif a.data is None:
        logger.info("note: --dataset %s%s is not the data this bundle was trained on (%s); calibrating on its "
                    "train split (were these in fact training images, the threshold would come out too low)",
                    a.dataset,
                    "" if a.normal_class is None else f" --normal-class {a.normal_class}",
                    "unknown" if not train_cfg else f"{train_cfg.get('dataset')} class {train_cfg.get('normal_class')}")
    if len(data) < 20:
        raise CliError(f"calibration needs at least 20 normal images, got {len(data)}")
    source = str(a.data) if a.data is not None else f"{a.dataset}/{a.split}"
    if not need_selection:
        return None, data, {"calibration": part_record(data), "source": source}
    fraction = a.selection_fraction
    if fraction is None:
        fraction = float((train_cfg or {}).get("selection_fraction", 0.5))
    if not 0.0 < fraction < 1.0:
        raise CliError(f"--selection-fraction must be in (0, 1), got {fraction}")
    sel, cal = split_held_out(data, fraction, a.seed)
    logger.info("split %d images of %s into %d for selection (weights, mean/std) and %d for calibration",
                len(data), source, len(sel), len(cal))
    return sel, cal, {"selection": part_record(sel), "calibration": part_record(cal), "source": source}


def _cmd_calibrate(a: argparse.Namespace) -> int:
    import math

    from vaegan.service.runtime.bundle import load_bundle
    from vaegan.trainer.calibrate import calibrate_bundle

    bundle = load_bundle(a.model)
    weights = None
    if a.weights:
        try:
            vals = [float(v) for v in a.weights.split(",")]
        except ValueError as e:
            raise CliError(f"--weights: expected three numbers, got {a.weights!r}") from e
        if len(vals) != 3:
            raise CliError(f"--weights: expected three numbers, got {len(vals)}")
        weights = dict(zip(("pixel", "feature", "disc"), vals, strict=True))
        bad = [k for k, v in weights.items() if not math.isfinite(v)]
        if bad:
            raise CliError(f"--weights: the {bad[0]} weight is not a finite number ({a.weights!r})")
    if not 0.0 < a.target_fpr < 1.0:
        raise CliError(f"--target-fpr must be in (0, 1), got {a.target_fpr}")
    # mean/std come from a selection part, unless weights are fixed and the bundle keeps its own
    sel, cal_part, parts = _calibration_parts(a, bundle, need_selection=weights is None or bundle.calibration is None)
    cal = calibrate_bundle(
        a.model, cal_part.images, selection_images=None if sel is None else sel.images, target_fpr=a.target_fpr,
        weights=weights, seed=a.seed, out_dir=a.out, bump_version=True, parts=parts,
        size_remedy="calibrate on more normal images (--data / --dataset), or raise --target-fpr",
    )
    print(f"calibrated on {cal.n} images: weights {cal.weights}, threshold {cal.threshold():.3f} "
          f"(target FPR {cal.target_fpr}); bundle: {a.out or a.model}")
    if cal.warnings:
        print(f"WARNING: {', '.join(w['kind'] for w in cal.warnings)}: see the log above and "
              f"calibration.warnings in the manifest", file=sys.stderr)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="AUROC/AUPRC/F1, report.json and plots for a bundle")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and PNGs")
    p.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    p.add_argument("--no-progress", action="store_true")
    _add_data_source(p, pair=True)
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(a: argparse.Namespace) -> int:
    from vaegan.service.runtime import Runtime
    from vaegan.trainer.evaluate import evaluate, write_report

    rt = Runtime.load(a.model, providers=a.providers)
    data = _load_eval_data(a, rt.spec, pair=True)
    ev = evaluate(rt, data, progress=not a.no_progress)
    write_report(ev, data, a.out)
    r = ev.report
    comp = ", ".join(f"{k} {v:.3f}" for k, v in r["component_auroc"].items())
    print(f"image AUROC {r['image_auroc']:.4f}{_ci(r['image_auroc_ci'])}  AUPRC {r['image_auprc']:.4f}  "
          f"F1 {r['f1']:.3f}  FPR {r['fpr_at_threshold']:.3f} TPR {r['tpr_at_threshold']:.3f} "
          f"at threshold {r['threshold']:.2f}")
    print(f"components alone: {comp}")
    if r["pixel_auroc"] is not None:
        print(f"pixel AUROC {r['pixel_auroc']:.4f}{_ci(r['pixel_auroc_ci'])}  "
              f"AU-PRO (FPR <= {r['au_pro_max_fpr']}) {_num(r['au_pro'])}{_ci(r['au_pro_ci'])}")
    if r["image_auroc_by_type"] and len(r["image_auroc_by_type"]) > 1:
        n = r["n_by_type"]
        print("image AUROC by type: " + ", ".join(
            f"{k} {_num(v, 3)} ({n[k]})" for k, v in r["image_auroc_by_type"].items()))
    print(f"wrote {a.out}/report.json")
    return 0


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: list[float] | None) -> str:
    """' [lo, hi]' for a bootstrap interval, '' without one."""
    return "" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]"


# ---- inpaint ----------------------------------------------------------------------------
def _add_inpaint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint", help="fill a masked region (--mask) or repair anomalies (--auto); one image or a folder"
    )
    p.add_argument("image", type=Path, help="input image (any size, grey or RGB), or a folder of images")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--mask", type=Path,
                   help="mask image of the same size, non-zero = fill; for a folder: a folder of masks with the "
                   "images' relative paths (any image extension)")
    g.add_argument("--auto", action="store_true", help="repair: fill where the anomaly map is above threshold")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--out", type=Path, required=True,
                   help="output image file (PNG/JPEG by extension), or for a folder the output folder (PNGs)")
    p.add_argument("--save-mask", type=Path, help="with --auto: also write the mask used (a folder for a folder)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call in folder mode")
    p.set_defaults(func=_cmd_inpaint)


def _cmd_inpaint(a: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from vaegan.service.runtime import Runtime

    if a.image.is_dir():
        return _inpaint_folder(a)
    rt = Runtime.load(a.model)
    if a.auto:
        (out,), (mask,) = rt.repair([a.image])
        if a.save_mask:
            Image.fromarray(mask.astype(np.uint8) * 255).save(a.save_mask)
        print(f"repaired {mask.mean():.2%} of the pixels")
    else:
        (out,) = rt.inpaint([a.image], [a.mask])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out[:, :, 0] if out.shape[2] == 1 else out).save(a.out)
    print(f"wrote {a.out}")
    return 0


def _inpaint_folder(a: argparse.Namespace) -> int:
    """Every image below ``a.image``, in one model load: out/<relative path>.png (masks matched by
    relative path without extension). Images that fail are named on stderr; exit 3 if any did."""
    import numpy as np

    from vaegan.service.batch.inputs import resolve_inputs
    from vaegan.service.runtime import Runtime, ServiceError

    if a.mask is not None and not a.mask.is_dir():
        raise CliError(f"--mask {a.mask}: with a folder of images, give a folder of masks")
    if a.out.exists() and not a.out.is_dir():
        raise CliError(f"--out {a.out}: with a folder of images, give an output folder")
    if a.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {a.batch_size}")
    items = resolve_inputs([str(a.image)])
    masks: dict[str, str] = {}
    if a.mask is not None:
        masks = {_stem(item.id): item.path for item in resolve_inputs([str(a.mask)])}
    rt = Runtime.load(a.model)
    done = failed = 0
    save = functools.partial(_save_image, fmt="PNG")

    for start in range(0, len(items), a.batch_size):
        chunk = items[start : start + a.batch_size]
        todo = []
        for item in chunk:
            if a.mask is not None and _stem(item.id) not in masks:
                print(f"error: {item.path}: no mask with its relative path under {a.mask}", file=sys.stderr)
                failed += 1
            else:
                todo.append(item)
        try:  # the chunk in one call; if one image in it is bad, one at a time (the others are kept)
            results = _inpaint_chunk(rt, a, todo, masks)
        except ServiceError:
            results = []
            for item in todo:
                try:
                    results += _inpaint_chunk(rt, a, [item], masks)
                except ServiceError as e:
                    print(f"error: {item.path}: {e}", file=sys.stderr)
                    failed += 1
        for item, out, mask in results:
            rel = _stem(item.id) + ".png"
            save(out, a.out / rel)
            if a.save_mask is not None and mask is not None:
                save(mask.astype(np.uint8) * 255, a.save_mask / rel)
            done += 1
    print(f"inpainted {done} images into {a.out}" + (f"; {failed} failed (named above)" if failed else ""))
    return EXIT_PARTIAL if failed else 0


def _save_image(arr: Any, path: Path, fmt: str | None = None) -> None:
    """A uint8 image (H, W), (H, W, 1) or (H, W, 3) -> ``path``, written to a temporary file
    and renamed (never half a file); one channel is saved grey. ``fmt``: a Pillow format
    name (default: by ``path``'s extension)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fmt = fmt or Image.registered_extensions().get(path.suffix.lower(), "PNG")
    Image.fromarray(arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(tmp, format=fmt)
    tmp.replace(path)


def _stem(image_id: str) -> str:
    """An image's relative path without its extension: how images meet their masks and outputs."""
    return image_id.rsplit(".", 1)[0]


def _inpaint_chunk(rt: Any, a: argparse.Namespace, items: list[Any], masks: dict[str, str]) -> list[tuple[Any, Any, Any]]:
    if not items:
        return []
    paths = [Path(item.path) for item in items]
    if a.auto:
        outs, used = rt.repair(paths)
        return list(zip(items, outs, used, strict=True))
    outs = rt.inpaint(paths, [Path(masks[_stem(item.id)]) for item in items])
    return [(item, out, None) for item, out in zip(items, outs, strict=True)]


# ---- sample, interpolate ----------------------------------------------------------------
# --out names one picture when it ends in one of these (vaegan sample: else a folder of PNGs)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
GUTTER = 2  # pixels between the images of a grid or strip


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw new images from a model: one grid picture, or a folder of PNGs",
        description="Draw images from the generator: z ~ N(0, T^2 I) decoded at the model's size.",
    )
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--n", type=int, default=64, help="images to draw, 1..1024 (default %(default)s)")
    p.add_argument("--seed", type=int,
                   help="seed of the draws: the same seed gives the same images (default: a random one, printed)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="spread of the latent draws, > 0; lower: more typical, less varied (default %(default)s)")
    p.add_argument("--out", type=Path, required=True,
                   help=f"an image file ({', '.join(IMAGE_SUFFIXES)}): one square-ish grid; anything else: a "
                        "folder of sample_00000.png, sample_00001.png, ...")
    p.set_defaults(func=_cmd_sample)


def _cmd_sample(a: argparse.Namespace) -> int:
    from vaegan.service.runtime import Runtime
    from vaegan.service.runtime.generative import check_n, check_seed, check_temperature, draw_seed
    from vaegan.service.runtime.visualize import tile

    n, temperature, seed = check_n(a.n), check_temperature(a.temperature), check_seed(a.seed)
    grid = a.out.suffix.lower() in IMAGE_SUFFIXES
    if not grid and a.out.exists() and not a.out.is_dir():
        raise CliError(f"--out {a.out}: not a folder; name an image file ({', '.join(IMAGE_SUFFIXES)}) for a grid")
    seed = draw_seed() if seed is None else seed
    images = Runtime.load(a.model).sample(n, seed, temperature)  # uint8 (n, H, W, C)
    how = f"{n} samples (seed {seed}, temperature {temperature:g})"
    if grid:
        cols = math.ceil(math.sqrt(n))
        _save_image(tile(images, cols, GUTTER), a.out)
        print(f"wrote {how} as a {math.ceil(n / cols)}x{cols} grid to {a.out}")
    else:
        for i, img in enumerate(images):
            _save_image(img, a.out / f"sample_{i:05d}.png", "PNG")
        print(f"wrote {how} to {a.out}/sample_00000.png .. sample_{n - 1:05d}.png")
    return 0


def _add_interpolate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "interpolate", help="decode the latent path between two images: one strip picture",
        description="Encode A and B, walk from mu(A) to mu(B) in --steps, decode; the ends are the reconstructions.",
    )
    p.add_argument("image_a", type=Path, metavar="A", help="first image (any size, grey or RGB)")
    p.add_argument("image_b", type=Path, metavar="B", help="last image")
    p.add_argument("--model", type=Path, required=True, help="bundle directory")
    p.add_argument("--steps", type=int, default=8, help="images on the path, both ends included, 2..256 (default %(default)s)")
    p.add_argument("--method", choices=["linear", "slerp", "both"], default="linear",
                   help="along the line or the great circle between the codes; both: two rows, linear then slerp")
    p.add_argument("--out", type=Path, required=True, help=f"the strip picture ({', '.join(IMAGE_SUFFIXES)})")
    p.set_defaults(func=_cmd_interpolate)


def _cmd_interpolate(a: argparse.Namespace) -> int:
    import numpy as np

    from vaegan.service.runtime import Runtime
    from vaegan.service.runtime.generative import check_steps
    from vaegan.service.runtime.visualize import tile

    if a.out.suffix.lower() not in IMAGE_SUFFIXES:
        raise CliError(f"--out {a.out}: name an image file ({', '.join(IMAGE_SUFFIXES)})")
    for path in (a.image_a, a.image_b):
        if not path.is_file():
            raise CliError(f"{path}: no such file")
    steps = check_steps(a.steps)
    methods = ["linear", "slerp"] if a.method == "both" else [a.method]
    rt = Runtime.load(a.model)
    rows = np.concatenate([rt.interpolate(a.image_a, a.image_b, steps, m) for m in methods])  # (R*steps, H, W, C)
    _save_image(tile(rows, steps, GUTTER), a.out)
    print(f"wrote {len(methods)} row(s) of {steps} images ({', '.join(methods)}) from {a.image_a} to {a.image_b} "
          f"to {a.out}")
    return 0


# ---- score (batch) ----------------------------------------------------------------------
EXIT_PARTIAL = 3  # vaegan score: some inputs could not be scored (their rows carry the error)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise CliError(f"environment variable {name}={value!r} is not an integer") from None


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score", help="batch-score files, folders, globs or @lists into Parquet/CSV/JSONL (resumable, sharded)",
        description="Score images into a table, one row per input. Exit code 0: all scored; 3: some inputs "
                    "failed (their rows say why); 2: a usage error.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (recursive, image extensions only), globs ('data/**/*.png'), or "
                        "@LIST (.txt, .csv, .jsonl, .parquet with a 'path' column; other columns are carried over)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="score in this process with this bundle directory")
    src.add_argument("--server", metavar="HOST:PORT", help="score on a vaegan serve server (ScoreStream)")
    p.add_argument("--out", type=Path, required=True, help="output table: .parquet, .csv or .jsonl")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call / request (default 64)")
    p.add_argument("--workers", type=int, help="decoding processes (default: cores - 1; 0 decodes in this process)")
    p.add_argument("--weights", help="component weights as the service takes them, e.g. pixel=1,disc=0")
    p.add_argument("--threshold", type=float, help="decision threshold instead of the calibrated one")
    p.add_argument("--maps-dir", type=Path, help="write each anomaly map as a PNG named by id (sub-folders mirrored)")
    p.add_argument("--repaired-dir", type=Path, help="write each repaired image as a PNG named by id")
    p.add_argument("--only-outliers", action="store_true", help="pictures for flagged images only")
    p.add_argument("--resume", action="store_true", help="keep what an earlier run of this job wrote; score the rest")
    p.add_argument("--overwrite", action="store_true", help="discard an existing output (and its parts) first")
    p.add_argument("--shard-index", type=int, help="this job's shard (default: $JOB_COMPLETION_INDEX, else 0)")
    p.add_argument("--num-shards", type=int, help="number of shards (default: $VAEGAN_NUM_SHARDS, else 1); each "
                                                  "shard writes OUT with .shard-IIIII-of-NNNNN before its extension")
    p.add_argument("--report", type=Path, metavar="DIR", help="write summary.json, histogram.png and top_k.png here")
    p.add_argument("--top-k", type=int, default=16, help="images in the report's top-k grid (default 16)")
    p.add_argument("--part-rows", type=int, default=2_000,
                   help="commit a part file every this many rows (default 2000): the most a kill can lose")
    p.add_argument("--part-seconds", type=float, default=60.0, help="... or every this many seconds (default 60)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (a log line every 30 s instead)")
    m = p.add_argument_group("--model options")
    m.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    m.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: ONNX Runtime's)")
    r = p.add_argument_group("--server options")
    r.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca-file)")
    r.add_argument("--tls-ca-file", type=Path, help="PEM root certificates to verify the server with (implies --tls)")
    r.add_argument("--tls-cert-file", type=Path, help="PEM client certificate chain (mutual TLS, with --tls-key-file)")
    r.add_argument("--tls-key-file", type=Path, help="PEM client private key")
    r.add_argument("--token-file", type=Path, help="a file holding the bearer token the server asks for")
    r.add_argument("--timeout", type=float, help="deadline of the whole stream in seconds (default: none)")
    p.set_defaults(func=_cmd_score)


def _check_score_args(a: argparse.Namespace) -> None:
    if a.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {a.batch_size}")
    if a.workers is not None and a.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {a.workers}")
    if a.part_rows < 1 or not a.part_seconds > 0:
        raise CliError("--part-rows and --part-seconds must be positive")
    if a.threshold is not None and not math.isfinite(a.threshold):
        raise CliError(f"--threshold must be a finite number, got {a.threshold}")
    if a.resume and a.overwrite:
        raise CliError("--resume and --overwrite exclude each other")
    if a.only_outliers and a.maps_dir is None and a.repaired_dir is None:
        raise CliError("--only-outliers applies to --maps-dir / --repaired-dir; give one of them")
    if a.num_shards < 1:
        raise CliError(f"--num-shards must be at least 1, got {a.num_shards}")
    if not 0 <= a.shard_index < a.num_shards:
        raise CliError(f"--shard-index must be in 0..{a.num_shards - 1}, got {a.shard_index}")
    if (a.tls_cert_file is None) != (a.tls_key_file is None):
        raise CliError("--tls-cert-file and --tls-key-file go together")
    if a.model is not None and (a.tls or a.tls_ca_file or a.tls_cert_file or a.timeout is not None or a.token_file):
        raise CliError("--tls*, --token-file, --timeout apply to --server only")


def _score_weights(text: str | None) -> dict[str, float] | None:
    from vaegan.service.runtime.scoring import ALL_COMPONENTS

    if not text:
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in ALL_COMPONENTS:
            raise CliError(f"--weights: expected name=value with a name in {', '.join(ALL_COMPONENTS)}, got {part!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise CliError(f"--weights: {name}={value!r} is not a number") from None
        if not math.isfinite(out[name]):
            raise CliError(f"--weights: {name} must be finite, got {value}")
    return out


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise CliError(f"{what} {path}: {e.strerror or e}") from None


def _scorer(a: argparse.Namespace, weights: dict[str, float] | None):  # noqa: ANN202 - a Scorer
    if a.model is not None:
        from vaegan.service.batch.score import LocalScorer
        from vaegan.service.runtime import Runtime

        rt = Runtime.load(a.model, providers=a.providers, intra_op_threads=a.threads)
        if weights or a.threshold is not None:  # refuse bad weights now, not on the first batch
            if rt.bundle.calibration is None and weights:
                raise CliError("--weights needs a calibrated bundle")
            if rt.bundle.calibration is not None:
                rt.bundle.calibration.threshold(weights)
        return LocalScorer(rt, weights, a.threshold), None
    from vaegan.service.batch.score import RemoteScorer
    from vaegan.service.client import OutlierClient

    client = OutlierClient(
        a.server, timeout=30.0, tls=a.tls or a.tls_ca_file is not None,
        root_certificates=_read_pem(a.tls_ca_file, "--tls-ca-file"),
        private_key=_read_pem(a.tls_key_file, "--tls-key-file"),
        certificate_chain=_read_pem(a.tls_cert_file, "--tls-cert-file"),
        token=(_read_pem(a.token_file, "--token-file") or b"").decode("utf-8").strip() or None,
    )
    return RemoteScorer(client, weights, a.threshold, timeout=a.timeout or 10 * 86400.0), client


def _cmd_score(a: argparse.Namespace) -> int:
    import pyarrow  # noqa: F401 - without it: one line naming the batch extra (main)

    from vaegan.service.batch.decode import DecodeWorkerDied
    from vaegan.service.batch.job import JobConfig, run_job
    from vaegan.service.batch.table import OutputError
    from vaegan.service.client import OutlierClientError

    a.shard_index = _env_int("JOB_COMPLETION_INDEX", 0) if a.shard_index is None else a.shard_index
    a.num_shards = _env_int("VAEGAN_NUM_SHARDS", 1) if a.num_shards is None else a.num_shards
    _check_score_args(a)
    weights = _score_weights(a.weights)
    cfg = JobConfig(
        inputs=a.inputs, out=a.out, batch_size=a.batch_size, workers=a.workers, maps_dir=a.maps_dir,
        repaired_dir=a.repaired_dir, only_outliers=a.only_outliers, resume=a.resume, overwrite=a.overwrite,
        shard_index=a.shard_index, num_shards=a.num_shards, report_dir=a.report, top_k=a.top_k,
        part_rows=a.part_rows, part_seconds=a.part_seconds, progress=False if a.no_progress else None,
    )
    try:
        scorer, client = _scorer(a, weights)
    except OutlierClientError as e:
        raise CliError(f"--server {a.server}: {e.code.name}: {e.details}") from None
    try:
        summary = run_job(cfg, scorer)
    except OutputError as e:
        raise CliError(str(e)) from None
    except DecodeWorkerDied as e:
        print(f"vaegan score: error: {e}", file=sys.stderr)
        return 1
    except OutlierClientError as e:
        print(f"vaegan score: error: the server failed mid-job ({e.code.name}: {e.details}); the parts written "
              "so far are kept: run the same command with --resume to go on", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    print(summary.line())
    return EXIT_PARTIAL if summary.exit_code else 0


def _add_score_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score-merge", help="join the shard files of a sharded vaegan score job into one table")
    p.add_argument("out", type=Path, help="merged table: .parquet, .csv or .jsonl (rows sorted by id)")
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD_FILE")
    p.set_defaults(func=_cmd_score_merge)


def _cmd_score_merge(a: argparse.Namespace) -> int:
    from vaegan.service.batch.table import merge_tables

    missing = [p for p in a.shards if not p.is_file()]
    if missing:
        raise CliError(f"{missing[0]}: no such file")
    stats = merge_tables(a.out, a.shards)
    print(f"merged {len(a.shards)} files: {stats.rows:,} rows ({stats.errors:,} with errors); wrote {a.out}")
    return 0


# ---- serve ------------------------------------------------------------------------------
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the gRPC service and /metrics")
    try:
        from vaegan.service.server.config import add_serve_arguments
    except ImportError:  # the server package is not installed in this build
        p.set_defaults(func=lambda a: _fail("the gRPC server is not available in this installation"))
        return
    add_serve_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a: argparse.Namespace) -> int:
    from vaegan.service.server.main import run_serve

    return run_serve(a)


# ---- demo -------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end to end on the built-in synthetic data: train, export, serve, score, pictures")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-train", type=int, default=3000, help="training images (default %(default)s)")
    p.add_argument("--test-images", type=int, default=400, help="held-out test images to score")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a: argparse.Namespace) -> int:
    from vaegan.demo import run_demo

    return run_demo(a.out, epochs=a.epochs, max_train=a.max_train, seed=a.seed, n_test=a.test_images)


def _one_line(e: BaseException) -> str:
    """An exception's message as one line (its first line; the type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(msg: str) -> int:
    raise CliError(msg)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train, _add_export, _add_calibrate, _add_evaluate, _add_inpaint, _add_sample, _add_interpolate,
    _add_score, _add_score_merge, _add_serve, _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vaegan", description="VAE-GAN anomaly detection and inpainting.")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (env VAEGAN_LOG_LEVEL)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from vaegan.service.runtime.errors import ServiceError

    try:
        return int(args.func(args) or 0)
    except (CliError, ServiceError, OSError, ValueError) as e:
        logger.debug("%s failed", args.command, exc_info=True)
        print(f"vaegan {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if top not in EXTRA_OF:
            raise
        logger.debug("%s failed", args.command, exc_info=True)
        print(f"vaegan {args.command}: error: this command needs {top}, which this installation lacks: "
              f"pip install 'vaegan[{EXTRA_OF[top]}]'", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if type(e).__name__ != "DecompressionBombError":  # Pillow's: an image too large to decode
            raise
        print(f"vaegan {args.command}: error: an image is too large to decode safely ({_one_line(e)})", file=sys.stderr)
        return EXIT_USAGE
