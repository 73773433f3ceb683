"""One-class benchmark: train on class K of the training set, test on the full test set.

For each class: train (the same `vaegan train` pipeline: label-free checkpoint and weight
selection, calibration on held-out normals), export, then score the whole test split through the
ONNX runtime that serves. Prints a table (per class and mean AUROC, per component too), writes
JSON, and records train time and scoring throughput. Ablation rows retrain a few classes as a
plain VAE, with the BCE loss, and without the shape negatives.

    python benchmarks/one_class.py --dataset mnist --data-root ../shared/data/mnist --quick
    python benchmarks/one_class.py --dataset mnist --data-root ../shared/data/mnist --classes 0-9

``--dataset mvtec`` (an MVTec AD category, default ../shared/data/mvtec3d_tire) trains on
train/good once per ``--seeds`` entry and reports image AUROC (per defect type too), pixel AUROC
and AU-PRO in each image's own frame, numpy baselines and published anchors; see
benchmarks/mvtec_report.py.

    python benchmarks/one_class.py --dataset mvtec --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaegan.models import ModelConfig  # noqa: E402
from vaegan.service.runtime import Runtime  # noqa: E402
from vaegan.trainer.config import TrainConfig  # noqa: E402
from vaegan.trainer.data import load_dataset  # noqa: E402
from vaegan.trainer.evaluate import evaluate  # noqa: E402
from vaegan.trainer.pipeline import image_spec_for, train_and_export  # noqa: E402

# published mean AUROC (%) on the same protocol: (MNIST, CIFAR-10)
ANCHORS = {"Deep SVDD": (94.8, 64.8), "OCGAN": (97.5, 65.6), "DCAE": (89.7, 59.4), "AnoGAN": (91.3, 61.8)}
MAIN = "vaegan-lsgan-erase"  # the defaults (TrainConfig.adv_loss, TrainConfig.d_negatives)
VARIANTS = {
    MAIN: {"adv_loss": "lsgan", "d_negatives": "erase"},
    "vaegan-lsgan (no negatives)": {"adv_loss": "lsgan", "d_negatives": ""},
    "vaegan-bce-erase": {"adv_loss": "bce", "d_negatives": "erase"},
    "vae (no adversarial term)": {"adv_loss": "none", "d_negatives": ""},
    # the training variants of `vaegan train` (README, Training variants), on top of the main row
    "vaegan-lsgan-erase + input-noise 0.2 (denoising)": {"adv_loss": "lsgan", "d_negatives": "erase", "input_noise": 0.2},
    "vaegan-lsgan-erase + weight-decay 1e-5": {"adv_loss": "lsgan", "d_negatives": "erase", "weight_decay": 1e-5},
}


def parse_classes(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> TrainConfig overrides, each value cast to the field's type."""
    from dataclasses import fields

    types = {f.name: type(getattr(TrainConfig(), f.name)) for f in fields(TrainConfig)}
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY a TrainConfig field")
        cast = types[key] if types[key] is not type(None) else str
        out[key] = cast(value)
    return out


def run_class(args: argparse.Namespace, k: int, variant: str, test, spec) -> dict:  # noqa: ANN001
    options = {**VARIANTS[variant], **({"adv_weight": args.adv_weight} if args.adv_weight is not None else {})}
    options.update(args.train_overrides)  # --set wins
    cfg = TrainConfig(
        dataset=args.dataset, data_root=str(args.data_root), normal_class=k, epochs=args.epochs,
        batch_size=args.batch_size, max_train=args.max_train or None, seed=args.seed, lr=args.lr,
        **options,
    )
    model_cfg = ModelConfig(
        num_channels=spec.channels, image_size=spec.height,
        latent_dim=args.latent_dim, base_width=args.base_width, spectral_norm=not args.no_spectral_norm,
    )
    slug = "".join(ch if ch.isalnum() else "-" for ch in variant).strip("-")
    run_dir = args.work / f"{args.dataset}-{k}-{slug}"
    t0 = time.perf_counter()
    out = train_and_export(cfg, model_cfg, spec, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    rt = Runtime.load(out.bundle_dir, providers="cpu")
    labels = (test.labels != k).astype(np.int64)
    data = type(test)(test.images, labels, None, test.class_names)
    ev = evaluate(rt, data, progress=False)
    r = ev.report
    sel = rt.bundle.calibration.selection if rt.bundle.calibration else {}
    row = {
        "class": k,
        "variant": variant,
        "image_auroc": r["image_auroc"],
        "component_auroc": r["component_auroc"],
        "image_auprc": r["image_auprc"],
        "fpr_at_threshold": r["fpr_at_threshold"],
        "tpr_at_threshold": r["tpr_at_threshold"],
        "weights": r["weights"],
        "selection_auroc": sel.get("selection_auroc"),
        "selected_checkpoint": rt.bundle.manifest["training"].get("selected_checkpoint"),
        "train_seconds": train_s,
        "images_per_second": r["images_per_second"],
    }
    logging.info("class %d %s: AUROC %.4f %s", k, variant, row["image_auroc"],
                 {c: round(v, 4) for c, v in row["component_auroc"].items()})
    return row


def mean(rows: list[dict], key: str, sub: str | None = None) -> float:
    vals = [r[key][sub] if sub else r[key] for r in rows]
    return float(np.mean(vals)) if vals else float("nan")


def print_table(rows: list[dict], dataset: str) -> None:
    print(f"\n{'class':>5} {'variant':<26} {'AUROC':>7} {'pixel':>7} {'feature':>8} {'disc':>7} "
          f"{'FPR@thr':>8} {'TPR@thr':>8} {'train s':>8} {'img/s':>7}  weights p/f/d")
    for r in rows:
        c = r["component_auroc"]
        w = r["weights"]
        print(f"{r['class']:>5} {r['variant']:<26} {r['image_auroc']:>7.4f} {c['pixel']:>7.4f} {c['feature']:>8.4f} "
              f"{c['disc']:>7.4f} {r['fpr_at_threshold']:>8.4f} {r['tpr_at_threshold']:>8.4f} "
              f"{r['train_seconds']:>8.0f} {r['images_per_second']:>7.0f}  {w['pixel']:g}/{w['feature']:g}/{w['disc']:g}")
    main = [r for r in rows if r["variant"] == MAIN]
    if main:
        print(f"\nmean over {len(main)} classes: AUROC {mean(main, 'image_auroc'):.4f} "
              f"(pixel {mean(main, 'component_auroc', 'pixel'):.4f}, feature {mean(main, 'component_auroc', 'feature'):.4f}, "
              f"disc {mean(main, 'component_auroc', 'disc'):.4f}); min class {min(r['image_auroc'] for r in main):.4f}; "
              f"mean FPR at threshold {mean(main, 'fpr_at_threshold'):.4f}")
    col = 0 if dataset in ("mnist", "fashion-mnist") else 1
    print("published mean AUROC on the same protocol: " + ", ".join(f"{k} {v[col]:.1f}" for k, v in ANCHORS.items()))


def run_mvtec(args: argparse.Namespace) -> int:
    """``--dataset mvtec``: benchmarks/mvtec_report.py with this script's training options."""
    from benchmarks.mvtec_report import run

    if args.quick:
        args.epochs, args.tag = 3, args.tag or "quick"
    args.image_size = args.image_size or 256
    args.seeds = args.seeds or str(args.seed)
    args.variant_options = dict(VARIANTS[MAIN])
    args.results = REPO / "benchmarks" / "results"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("trainer", "export", "service"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return run(args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist", "cifar10", "mvtec"])
    p.add_argument("--data-root", type=Path, help="default: ../shared/data/<mnist|cifar10|mvtec3d_tire>")
    p.add_argument("--classes", default="0-9")
    p.add_argument("--epochs", type=int, help="default 5; 30 for mvtec")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-train", type=int, help="cap on training images per class (0: all); default 4000, mvtec all")
    p.add_argument("--image-size", type=int, help="model input size (mvtec: default 256, letterbox; others: native)")
    p.add_argument("--seeds", help="mvtec: comma list of seeds, one run each plus their mean (default: --seed)")
    p.add_argument("--tag", default="", help="mvtec: JSON name one_class_mvtec_<tag>.json and run-dir suffix")
    p.add_argument("--n-boot", type=int, default=1000, help="mvtec: bootstrap resamples of the intervals")
    p.add_argument("--baselines-only", action="store_true",
                   help="mvtec: re-measure the baselines and reprint the table, keeping the model rows of the existing JSON")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--no-spectral-norm", action="store_true", help="plain discriminator layers")
    p.add_argument("--adv-weight", type=float)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other TrainConfig field, e.g. --set kl_weight=2 (repeatable)")
    p.add_argument("--ablation-classes", default="", help="classes for the ablation rows (no negatives, BCE, VAE only, "
                   "the training variants)")
    p.add_argument("--ablation-variants", default="",
                   help="comma list of words: only the ablation rows whose name contains one of them (default: all)")
    p.add_argument("--quick", action="store_true", help="about 10 minutes on 2 CPU cores: 3 classes, few epochs")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/one_class_<dataset>[_quick].json)")
    args = p.parse_args(argv)
    args.train_overrides = parse_overrides(args.set)
    mvtec = args.dataset == "mvtec"
    if args.epochs is None:
        args.epochs = 30 if mvtec else 5
    if args.max_train is None:
        args.max_train = 0 if mvtec else 4000
    if args.data_root is None:
        folder = {"cifar10": "cifar10", "mvtec": "mvtec3d_tire"}.get(args.dataset, "mnist")
        args.data_root = REPO.parent / "shared" / "data" / folder
    if mvtec:
        return run_mvtec(args)
    if args.quick:
        args.classes, args.epochs, args.max_train = "0,1,2", 3, 1500
        args.ablation_classes = args.ablation_classes or ""
    out = args.out or REPO / "benchmarks" / "results" / f"one_class_{args.dataset}{'_quick' if args.quick else ''}.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("trainer", "export", "service"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    spec = image_spec_for(args.dataset, None, None)
    test = load_dataset(args.dataset, args.data_root, "test", spec)
    rows: list[dict] = []
    jobs = [(k, MAIN) for k in parse_classes(args.classes)]
    wanted = [w.strip() for w in args.ablation_variants.split(",") if w.strip()]
    ablations = [v for v in VARIANTS if v != MAIN and (not wanted or any(w in v for w in wanted))]
    jobs += [(k, v) for k in parse_classes(args.ablation_classes) for v in ablations]
    t0 = time.perf_counter()
    for k, variant in jobs:
        rows.append(run_class(args, k, variant, test, spec))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                   "anchors": ANCHORS, "seconds": time.perf_counter() - t0}, indent=2) + "\n")
    print_table(rows, args.dataset)
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
