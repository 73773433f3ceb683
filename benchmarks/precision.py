"""Reduced-precision bundles: speed and detection quality of int8 and fp16 against fp32.

    python benchmarks/precision.py --bundles runs/bench/mnist-{0,2,8}-vaegan-lsgan-erase/bundle

For each fp32 bundle written by ``vaegan train`` (its manifest holds the training config, so the
held-out selection and calibration parts are rebuilt exactly as training cut them), the bundle
is converted to int8 and fp16 with :func:`export.quantize.convert_bundle` (which also records
the parity figures and refuses a drop in AUROC on its label-free check; the benchmark passes a
generous limit so that every row is measured). Then, for each precision, in the same run:

- one-class test AUROC: the bundle's normal class against every other class of the test split;
- FPR at the calibrated threshold on the test normals;
- images/s on one core at batch 64 (``Runtime.score``, wall and per CPU-second), precisions
  interleaved over ``--repeats`` rounds and the median kept, so all see the same machine.

Prints a table and writes ``benchmarks/results/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from vaegan.export.quantize import convert_bundle  # noqa: E402
from vaegan.service.runtime import Runtime  # noqa: E402
from vaegan.service.runtime.bundle import load_bundle  # noqa: E402
from vaegan.service.runtime.stats import auroc  # noqa: E402
from vaegan.trainer.config import TrainConfig  # noqa: E402
from vaegan.trainer.data import load_dataset  # noqa: E402
from vaegan.trainer.pipeline import load_split  # noqa: E402

PRECISIONS = ("fp32", "int8", "fp16")


def _speed(rt: Runtime, images: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(images/s wall, images/s per CPU-second) of ``rt.score`` over ``images``."""
    rt.score(images[:batch])
    w, c = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch):
        rt.score(images[i : i + batch])
    return len(images) / (time.perf_counter() - w), len(images) / max(1e-9, time.process_time() - c)


def _scores(rt: Runtime, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(combined scores (N,), flagged at the calibrated threshold (N,) bool)."""
    parts = [rt.score(images[i : i + 256]) for i in range(0, len(images), 256)]
    return np.concatenate([r.score for r in parts]), np.concatenate([r.is_outlier for r in parts])


def run_bundle(src: Path, work: Path, repeats: int, n_speed: int) -> list[dict]:
    bundle = load_bundle(src)
    training = bundle.manifest["training"]
    cfg = TrainConfig.from_dict(training["train_config"])
    split = load_split(cfg, bundle.spec)
    dirs = {"fp32": src}
    records: dict[str, dict] = {}
    for precision in PRECISIONS[1:]:
        dirs[precision] = work / f"{bundle.name}-{precision}"
        t0 = time.perf_counter()
        records[precision] = convert_bundle(
            src, dirs[precision], precision, calibration_images=split.calibration.images,
            selection_images=split.selection.images, max_auroc_drop=1.0, seed=cfg.seed,
        )
        records[precision]["convert_seconds"] = time.perf_counter() - t0
    test = load_dataset(cfg.dataset, cfg.data_root, "test", bundle.spec)
    labels = test.labels != cfg.normal_class
    runtimes = {p: Runtime.load(d, providers="cpu", intra_op_threads=1) for p, d in dirs.items()}
    speed: dict[str, list[tuple[float, float]]] = {p: [] for p in dirs}
    for _ in range(repeats):  # interleaved: every precision sees the same machine
        for p, rt in runtimes.items():
            speed[p].append(_speed(rt, test.images[:n_speed]))
    rows = []
    for p, rt in runtimes.items():
        scores, flagged = _scores(rt, test.images)
        rows.append({
            "bundle": bundle.name, "normal_class": cfg.normal_class, "precision": p,
            "test_auroc": auroc(scores, labels),
            "fpr_at_threshold": float(np.mean(flagged[~labels])),
            "images_per_second": float(np.median([s[0] for s in speed[p]])),
            "images_per_cpu_second": float(np.median([s[1] for s in speed[p]])),
            "check": records.get(p),
        })
    base = rows[0]
    for r in rows:
        r["speedup_per_cpu_second"] = r["images_per_cpu_second"] / base["images_per_cpu_second"]
        r["auroc_change"] = r["test_auroc"] - base["test_auroc"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", type=Path, nargs="+", required=True, help="fp32 bundles written by vaegan train")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--speed-images", type=int, default=2048)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "precision.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        for b in args.bundles:
            rows += run_bundle(b, Path(tmp), args.repeats, args.speed_images)
    print(f"{'bundle':<12} {'precision':<9} {'test AUROC':>10} {'change':>8} {'FPR@thr':>8} {'img/s':>8} "
          f"{'img/CPU-s':>10} {'speed-up':>8} {'check AUROC drop':>16}")
    for r in rows:
        drop = "" if r["check"] is None else f"{r['check']['auroc_drop']:+.4f}"
        print(f"{r['bundle']:<12} {r['precision']:<9} {r['test_auroc']:>10.4f} {r['auroc_change']:>+8.4f} "
              f"{r['fpr_at_threshold']:>8.4f} {r['images_per_second']:>8.0f} {r['images_per_cpu_second']:>10.0f} "
              f"{r['speedup_per_cpu_second']:>8.2f} {drop:>16}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "bundles": [str(b) for b in args.bundles],
        "repeats": args.repeats, "speed_images": args.speed_images, "rows": rows,
        "seconds": time.perf_counter() - t0,
    }, indent=2) + "\n")
    print(f"\nwrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
