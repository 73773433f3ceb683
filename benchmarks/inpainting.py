"""Inpainting against classical inpainting, measured in one run on the same images and holes.

    python benchmarks/inpainting.py --model runs/bench/mnist-2-vaegan-lsgan-erase/bundle \\
        --data-root DATA/mnist --digit 2 --n 300

Methods: the bundle (``Runtime.inpaint``: ONNX Runtime only), OpenCV's Telea and Navier-Stokes
(``cv2.inpaint``, radius 3), the mean fill (the training images' mean intensity everywhere in
the hole) and the class-mean fill (the pixel-wise mean of the training images of the class).
Holes, drawn per image with a fixed seed: ``centre`` (a centred square of 25% of the area),
``rects`` (random rectangles covering 10-30%) and ``strokes`` (random thick free-form strokes
covering 10-30%). Metrics, images in 0..255: hole PSNR pooled over all hole pixels of all
images, per-image hole PSNR (mean), SSIM over the whole image (11x11 Gaussian window, sigma
1.5) and images/s (wall clock of the method on the whole set, one process). Prints a table
and writes JSON (default ``benchmarks/results/inpainting.json``) and a PNG grid of examples.

With ``--repair-model`` (a bundle trained on the built-in synthetic textures) it adds the repair
table (:func:`repair_table`): ``Runtime.repair`` finding and fixing the synthetic defects
without a mask, against OpenCV given the true mask, scored against each image's clean original.

OpenCV is a baseline only (``pip install opencv-python-headless``); the service never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def centre_masks(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    side_h, side_w = round(h / 2), round(w / 2)  # 25% of the area
    m = np.zeros((n, h, w), bool)
    t, left = (h - side_h) // 2, (w - side_w) // 2
    m[:, t : t + side_h, left : left + side_w] = True
    return m


def rect_masks(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        target = rng.uniform(0.10, 0.30)
        while out[i].mean() < target:
            rh, rw = rng.integers(h // 8, h // 2 + 1), rng.integers(w // 8, w // 2 + 1)
            t, left = rng.integers(0, h - rh + 1), rng.integers(0, w - rw + 1)
            out[i, t : t + rh, left : left + rw] = True
    return out


def stroke_masks(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        target = rng.uniform(0.10, 0.30)
        y, x = rng.uniform(0, h), rng.uniform(0, w)
        radius = max(1.0, min(h, w) / 14)
        angle = rng.uniform(0, 2 * np.pi)
        while out[i].mean() < target:
            angle += rng.normal(0, 0.6)
            y = float(np.clip(y + np.sin(angle) * radius, 0, h - 1))
            x = float(np.clip(x + np.cos(angle) * radius, 0, w - 1))
            out[i] |= (yy - y) ** 2 + (xx - x) ** 2 <= radius**2
    return out


HOLES: dict[str, Callable[[int, int, int, np.random.Generator], np.ndarray]] = {
    "centre": centre_masks, "rects": rect_masks, "strokes": stroke_masks,
}


def _gauss(img: np.ndarray, sigma: float = 1.5, size: int = 11) -> np.ndarray:
    ax = np.arange(size) - size // 2
    k = np.exp(-(ax**2) / (2 * sigma**2))
    k /= k.sum()
    pad = size // 2
    p = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    p = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 2, p)
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 1, p)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of grey uint8 batches (N, H, W) (Wang et al. 2004 constants, L = 255)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _gauss(a), _gauss(b)
    va = _gauss(a * a) - mu_a**2
    vb = _gauss(b * b) - mu_b**2
    cov = _gauss(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2))
    return float(s.mean())


def hole_psnr(truth: np.ndarray, filled: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
    """(pooled over every hole pixel, mean of per-image values) in dB."""
    d = (truth.astype(np.float64) - filled.astype(np.float64)) ** 2
    pooled = d[masks].mean()
    per = [d[i][masks[i]].mean() for i in range(len(d)) if masks[i].any()]
    to_db = lambda mse: float(10 * np.log10(255.0**2 / max(mse, 1e-10)))  # noqa: E731
    return to_db(pooled), float(np.mean([to_db(x) for x in per]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="bundle trained on the class (grey 28x28 for MNIST)")
    p.add_argument("--data-root", type=Path, required=True, help="folder with the MNIST idx files")
    p.add_argument("--digit", type=int, default=2, help="class of the test images (-1: all digits)")
    p.add_argument("--n", type=int, default=300, help="test images (the first n of the class)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inpainting.json")
    p.add_argument("--repair-model", type=Path,
                   help="a bundle trained on the built-in synthetic textures: adds the repair table")
    p.add_argument("--repair-n", type=int, default=300, help="defective synthetic test images for the repair table")
    args = p.parse_args(argv)

    import cv2

    from vaegan.service.runtime import Runtime
    from vaegan.trainer.data import load_dataset

    test = load_dataset("mnist", args.data_root, "test")
    train = load_dataset("mnist", args.data_root, "train")
    pick = (lambda d: np.ones(len(d.labels), bool)) if args.digit < 0 else (lambda d: d.labels == args.digit)
    truth = test.images[pick(test)][: args.n, :, :, 0]  # (N, 28, 28) uint8
    class_mean = train.images[pick(train)][:, :, :, 0].astype(np.float64).mean(0)  # (28, 28)
    global_mean = float(class_mean.mean())
    rt = Runtime.load(args.model, providers="cpu")

    def ours(imgs: np.ndarray, masks: np.ndarray) -> np.ndarray:
        filled = rt.inpaint(list(imgs), list(masks.astype(np.uint8)))
        return np.stack([f[..., 0] if f.ndim == 3 else f for f in filled])

    def opencv(flag: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        return lambda imgs, masks: np.stack(
            [cv2.inpaint(i, m.astype(np.uint8), 3, flag) for i, m in zip(imgs, masks, strict=True)]
        )

    def fill_with(values: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        v = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return lambda imgs, masks: np.where(masks, v, imgs)

    methods = {
        "vaegan": ours,
        "opencv_telea": opencv(cv2.INPAINT_TELEA),
        "opencv_ns": opencv(cv2.INPAINT_NS),
        "mean_fill": fill_with(np.full(truth.shape[1:], global_mean)),
        "class_mean_fill": fill_with(class_mean),
    }
    rows = []
    examples = {}
    for hole, make in HOLES.items():
        masks = make(len(truth), truth.shape[1], truth.shape[2], np.random.default_rng(args.seed))
        holed = np.where(masks, 0, truth).astype(np.uint8)
        examples[hole] = {"masked": holed[:6], "truth": truth[:6]}
        for name, fn in methods.items():
            fn(holed[:4], masks[:4])  # warm-up
            t0 = time.perf_counter()
            out = fn(holed, masks)
            seconds = time.perf_counter() - t0
            assert np.array_equal(out[~masks], truth[~masks]), f"{name} changed known pixels"
            pooled, per_image = hole_psnr(truth, out, masks)
            rows.append({"holes": hole, "method": name, "hole_psnr_db": pooled, "hole_psnr_per_image_db": per_image,
                         "ssim": ssim(truth, out), "images_per_s": len(truth) / seconds,
                         "coverage": float(masks.mean())})
            examples[hole][name] = out[:6]
    head = f"{'holes':<9}{'method':<17}{'hole PSNR':>10}{'per image':>10}{'SSIM':>8}{'img/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['holes']:<9}{r['method']:<17}{r['hole_psnr_db']:>10.2f}{r['hole_psnr_per_image_db']:>10.2f}"
              f"{r['ssim']:>8.3f}{r['images_per_s']:>9.0f}")
    for hole in HOLES:
        by = {r["method"]: r for r in rows if r["holes"] == hole}
        best_cv = max(by["opencv_telea"]["hole_psnr_db"], by["opencv_ns"]["hole_psnr_db"])
        print(f"{hole}: vaegan - best OpenCV = {by['vaegan']['hole_psnr_db'] - best_cv:+.2f} dB, "
              f"vaegan - class mean = {by['vaegan']['hole_psnr_db'] - by['class_mean_fill']['hole_psnr_db']:+.2f} dB")
    repairs = None
    if args.repair_model is not None:
        repairs = repair_table(args.repair_model, args.repair_n, args.seed)
        _print_repairs(repairs)
    report = {
        "model": str(args.model), "digit": args.digit, "n": len(truth), "seed": args.seed, "rows": rows,
        "repair": repairs,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    _grid(examples, list(methods), args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


def repair_table(bundle: Path, n: int, seed: int = 0) -> dict:
    """Repair on the synthetic set, whose every defective test image can be rendered without
    its defect: ``Runtime.repair`` (no mask given: the calibrated anomaly map decides) against
    OpenCV Telea and Navier-Stokes given the *true* defect mask. Per image: IoU of the repair
    mask with the true mask, whether the defect was found (the repair mask covers at least half
    of its pixels), and the PSNR of the repaired image against the clean original inside the
    true defect (pooled over those pixels, RGB 0..255). Also the share of clean images a repair
    changes (repairing the normal test images)."""
    import cv2

    from vaegan.service.runtime import Runtime
    from vaegan.trainer.data.synthetic import DEFECT_KINDS, make_synthetic, make_synthetic_repairs

    rt = Runtime.load(bundle, providers="cpu")
    h, w = rt.spec.height, rt.spec.width
    images, clean, truth, kinds = make_synthetic_repairs(2 * n, h, w, seed=seed)

    def psnr_inside(out: np.ndarray) -> float:
        err = (out.astype(np.float64) - clean.astype(np.float64))[truth]
        return float(10 * np.log10(255.0**2 / max(np.mean(err**2), 1e-12)))

    t0 = time.perf_counter()
    fixed, masks = rt.repair(list(images))
    seconds = time.perf_counter() - t0
    ours = np.stack([f if f.ndim == 3 else np.repeat(f[..., None], 3, -1) for f in fixed])
    masks = np.stack(masks)
    inter, union = (masks & truth).sum((1, 2)), (masks | truth).sum((1, 2))
    iou = inter / np.maximum(union, 1)
    found = inter >= 0.5 * truth.sum((1, 2))
    opencv = {
        name: np.stack([cv2.inpaint(img, m.astype(np.uint8), 3, flag) for img, m in zip(images, truth, strict=True)])
        for name, flag in (("opencv_telea_true_mask", cv2.INPAINT_TELEA), ("opencv_ns_true_mask", cv2.INPAINT_NS))
    }
    normals = make_synthetic("test", 2 * n, h, w, seed=seed)[0][0::2]
    _, normal_masks = rt.repair(list(normals))
    return {
        "bundle": str(bundle), "n_defective": len(images), "n_normal": len(normals),
        "mask_iou_mean": float(iou.mean()),
        "found_share": float(found.mean()),
        "found_by_kind": {DEFECT_KINDS[k]: float(found[kinds == k].mean()) for k in np.unique(kinds)},
        "iou_by_kind": {DEFECT_KINDS[k]: float(iou[kinds == k].mean()) for k in np.unique(kinds)},
        "psnr_in_defect_db": {"vaegan_repair": psnr_inside(ours), "defective_input": psnr_inside(images),
                              **{k: psnr_inside(v) for k, v in opencv.items()}},
        "normal_images_changed": float(np.mean([m.any() for m in normal_masks])),
        "images_per_s": len(images) / seconds,
    }


def _print_repairs(r: dict) -> None:
    print(f"\nrepair on {r['n_defective']} synthetic defective images (bundle {r['bundle']}):")
    print(f"  repair-mask IoU with the true defect {r['mask_iou_mean']:.3f}; found (>= half covered) "
          f"{r['found_share']:.1%}; by kind: " + ", ".join(f"{k} {v:.0%} (IoU {r['iou_by_kind'][k]:.2f})"
                                                       for k, v in r["found_by_kind"].items()))
    print("  PSNR inside the defect against the clean original: "
          + ", ".join(f"{k} {v:.2f} dB" for k, v in r["psnr_in_defect_db"].items()))
    print(f"  normal images changed by a repair: {r['normal_images_changed']:.1%} of {r['n_normal']}; "
          f"{r['images_per_s']:.0f} images/s")


def _grid(examples: dict, methods: list[str], path: Path) -> None:
    """Rows: per hole kind, masked input / each method / truth, six images each."""
    from PIL import Image

    tiles = []
    for ex in examples.values():
        for key in ["masked", *methods, "truth"]:
            tiles.append(np.concatenate(list(ex[key]), axis=1))
        tiles.append(np.full((4, tiles[-1].shape[1]), 128, np.uint8))
    Image.fromarray(np.concatenate(tiles, axis=0)).resize(
        (tiles[0].shape[1] * 3, sum(t.shape[0] for t in tiles) * 3), Image.Resampling.NEAREST
    ).save(path)


if __name__ == "__main__":
    sys.exit(main())
