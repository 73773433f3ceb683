"""MVTec AD one-class benchmark (``benchmarks/one_class.py --dataset mvtec``).

One row per seed: train on ``train/good`` with the project's own pipeline
(:func:`trainer.pipeline.train_and_export`: label-free checkpoint and weight selection,
conformal threshold on held-out normals), then score ``test/*`` through the ONNX runtime that
serves (:func:`trainer.evaluate.evaluate`).

**Pixel metrics in the image's own frame.** With the letterbox policy a 192x256 tyre sits in a
256x256 model frame between two black bands. Those band pixels are trivially "normal" and
would inflate pixel AUROC and AU-PRO, so this benchmark crops every anomaly map and mask to
:func:`~service.runtime.preprocess.model_region` of the test images (one box: they all have
the same size, which is asserted) before computing pixel AUROC and AU-PRO.
``evaluate``'s own frame-wide figures are kept in the JSON for reference.

**Baselines, same run / split / crop / metric code** (numpy only): a per-pixel z-score
against the ``train/good`` images (image score = mean of the map), raw brightness (image
score = mean brightness) and the z-score map smoothed with a Gaussian (sigma 4 model pixels;
image score = its maximum). Their thresholds come from the same split-conformal rule on
``validation/good`` (which the baselines never fit on), so they get an FPR column too.

**Published anchors** (the tyre README) are printed in the same table, marked as published,
at a different resolution (and partly with 3D data), not measured here.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vaegan.service.runtime.preprocess import Box, ImageSpec, model_region
from vaegan.service.runtime.regions import pixel_counts, pro_counts
from vaegan.service.runtime.scoring import conformal_rank, gaussian_blur
from vaegan.service.runtime.stats import auroc, bootstrap_ci, rates_at_threshold
from vaegan.trainer.data import ImageSet
from vaegan.trainer.evaluate import AU_PRO_MAX_FPR, CONFIDENCE

__all__ = [
    "PUBLISHED",
    "TYPE_ORDER",
    "baseline_rows",
    "crop",
    "fpr_guarantee",
    "format_table",
    "image_box",
    "measure",
    "mean_row",
    "run",
    "save_top10",
]

logger = logging.getLogger("benchmarks.mvtec")

TYPE_ORDER = ("cut", "hole", "contamination", "combined")  # the tyre's types, in table order
_SHORT = {"contamination": "contam.", "combined": "combined"}  # table column heads (8 wide)
Z_EPS = 1e-3  # z-score denominator floor, in [0, 1] intensity units (train/good std is ~0.05)
SMOOTH_SIGMA = 4.0  # model pixels
PRIOR_SIGMA = 8.0  # model pixels: the location-prior baselines (a wide blob on the bright tyre)
BASELINES = {
    "z-score mean": "per-pixel |x - mean| / (std + eps) vs train/good, channel mean; image score = map mean",
    "brightness": "map = pixel brightness (channel mean); image score = mean brightness",
    "z-score smooth max": f"z-score map, Gaussian sigma {SMOOTH_SIGMA:g} px; image score = map max",
    "brightness smooth": f"map = brightness, Gaussian sigma {PRIOR_SIGMA:g} px; image score = its max",
    "constant prior": f"the SAME map for every image: mean train/good brightness, Gaussian sigma {PRIOR_SIGMA:g} px "
                      "(where defects usually are, nothing about the image); image score = 0",
}
# Published one-class results for MVTec 3D-AD "tire" (from the data set's README.txt). Not
# measured here: other input resolutions (224x224 or native 600x800), some with 3D data.
PUBLISHED: list[dict[str, Any]] = [
    {"name": "PatchCore-style RGB iNet", "image_auroc": 0.724, "pixel_auroc": 0.975, "au_pro": 0.899,
     "input": "RGB, ImageNet features, 224x224", "source": "Horwitz & Hoshen arXiv:2203.05550 (3D-ADS README, raw)"},
    {"name": "f-AnoGAN-style Depth GAN", "image_auroc": 0.577, "pixel_auroc": None, "au_pro": 0.631,
     "input": "depth + RGB", "source": "Bergmann et al. VISAPP 2022 Tables 2/5 (third-party transcription)"},
    {"name": "Voxel VM (3D only)", "image_auroc": 0.690, "pixel_auroc": None, "au_pro": 0.346,
     "input": "voxels, no RGB", "source": "Bergmann et al. VISAPP 2022 Tables 2/5 (third-party transcription)"},
    {"name": "M3DM", "image_auroc": 0.850, "pixel_auroc": None, "au_pro": None,
     "input": "RGB + point cloud, pretrained features", "source": "Wang et al. CVPR 2023 (third-party transcription)"},
]


# ---- geometry ---------------------------------------------------------------------------
def image_box(root: str | Path, ids: Sequence[str], spec: ImageSpec) -> Box:
    """The model-frame box (top, left, height, width) the images ``ids`` (paths relative to
    ``root``) land in: :func:`model_region` of their decoded size. All must share one size."""
    from vaegan.trainer.data.folder import read_image

    sizes = {read_image(Path(root) / i).shape[:2] for i in ids}
    assert len(sizes) == 1, f"test images differ in size ({sorted(sizes)}); one crop cannot fit them all"
    h, w = sizes.pop()
    return model_region(h, w, spec)


def crop(a: np.ndarray, box: Box) -> np.ndarray:
    """(N, H, W[, C]) -> the (N, h, w[, C]) part inside ``box``."""
    t, left, h, w = box
    return a[:, t : t + h, left : left + w]


# ---- metrics ----------------------------------------------------------------------------
def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _interval(fn, n: int, n_boot: int, seed: int) -> list[float] | None:  # noqa: ANN001
    lo, hi = bootstrap_ci(fn, n, n_boot=n_boot, seed=seed, confidence=CONFIDENCE)
    return [lo, hi] if np.isfinite(lo) and np.isfinite(hi) else None


def measure(
    scores: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    types: np.ndarray,
    names: Sequence[str],
    box: Box,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Image AUROC [CI], AUROC per defect type (good vs that type), and pixel AUROC [CI] and
    AU-PRO [CI] on the maps and masks cropped to ``box`` (the images' own frame).

    ``maps`` and ``masks`` are in the model frame (N, H, W); ``types`` index ``names``
    (0 = good). The bootstrap resamples images (seed ``seed``), as ``trainer.evaluate`` does.
    """
    scores = np.asarray(scores, np.float64)
    types = np.asarray(types)
    labels = types != 0
    m, k = crop(np.asarray(masks, bool), box), crop(np.asarray(maps, np.float32), box)
    assert int(m.sum()) == int(np.asarray(masks, bool).sum()), "a defect pixel lies outside the image region"
    n = len(scores)
    out: dict[str, Any] = {"image_auroc": _finite(auroc(scores, labels)), "image_auroc_ci": None}
    if labels.any() and not labels.all():
        out["image_auroc_ci"] = _interval(lambda idx: auroc(scores[idx], labels[idx]), n, n_boot, seed)
    good = types == 0
    out["auroc_by_type"] = {
        names[t]: _finite(auroc(scores[good | (types == t)], (types == t)[good | (types == t)]))
        for t in range(1, len(names)) if (types == t).any()
    }
    out.update({"pixel_auroc": None, "pixel_auroc_ci": None, "au_pro": None, "au_pro_ci": None})
    if m.any() and not m.all():
        out["pixel_auroc"] = _finite(auroc(k.ravel(), m.ravel()))
        px = pixel_counts(k, m)
        out["pixel_auroc_ci"] = _interval(lambda idx: px.auroc(np.bincount(idx, minlength=n)), n, n_boot, seed)
        pro = pro_counts(k, m, max_fpr=AU_PRO_MAX_FPR)
        out["au_pro"] = _finite(pro.area(AU_PRO_MAX_FPR))
        out["au_pro_ci"] = _interval(lambda idx: pro.area(AU_PRO_MAX_FPR, np.bincount(idx, minlength=n)), n, n_boot, seed)
    out["pixel_frame"] = {"box": list(box), "pixels_per_image": int(box[2] * box[3]), "au_pro_max_fpr": AU_PRO_MAX_FPR}
    return out


def conformal_threshold(scores: np.ndarray, target_fpr: float) -> float:
    """The split-conformal threshold of the runtime's rule on ``scores`` (the largest one
    when there are too few for ``target_fpr``)."""
    s = np.sort(np.asarray(scores, np.float64))
    return float(s[min(conformal_rank(len(s), target_fpr), len(s)) - 1])


def _binomial_range(m: int, pmf: np.ndarray) -> list[float]:
    """Central 95% range of a count on 0..m with probabilities ``pmf``, as rates."""
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, 0.025 - 1e-12))
    hi = int(np.searchsorted(cdf, 0.975 - 1e-12))
    return [lo / m, min(hi, m) / m]


def fpr_guarantee(n: int, target_fpr: float, n_test_normal: int) -> dict[str, Any]:
    """What the bundle's split-conformal threshold promises for the FPR on normal images.

    With n calibration images and k = min(ceil((n+1)(1-a)), n), a new exchangeable normal is
    flagged with probability (n+1-k)/(n+1) (exact for untied scores, an upper bound with
    ties); uncapped this lies in [a - 1/(n+1), a]. On ``n_test_normal`` test normals the
    count of false positives is then Binomial(n_test_normal, that rate) if the calibration set
    is seen as random per image; for one fixed calibration draw the rate itself is
    Beta(n+1-k, k), so the count is beta-binomial (wider). Both central 95% ranges are given.
    """
    rank = conformal_rank(n, target_fpr)
    k = min(rank, n)
    rate = (n + 1 - k) / (n + 1)
    m = n_test_normal
    xs = np.arange(m + 1)
    binom = np.array([math.comb(m, x) * rate**x * (1 - rate) ** (m - x) for x in xs])
    alpha, beta = n + 1 - k, k
    lb = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    bb = np.array([
        math.exp(math.log(math.comb(m, x)) + math.lgamma(x + alpha) + math.lgamma(m - x + beta)
                 - math.lgamma(m + alpha + beta) - lb)
        for x in xs
    ])
    return {
        "n_calibration": n,
        "target_fpr": target_fpr,
        "rank": rank,
        "capped": rank > n,
        "expected_fpr": rate,
        "band": [max(0.0, target_fpr - 1 / (n + 1)), target_fpr],
        "n_test_normal": m,
        "binomial_95": _binomial_range(m, binom),
        "beta_binomial_95": _binomial_range(m, bb / bb.sum()),
    }


# ---- baselines --------------------------------------------------------------------------
def _z_maps(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = np.empty(images.shape[:3], np.float32)
    for i in range(0, len(images), 32):
        x = images[i : i + 32].astype(np.float32) / 255.0
        out[i : i + 32] = (np.abs(x - mean) / (std + Z_EPS)).mean(axis=3)
    return out


def baseline_maps(train_images: np.ndarray, images: np.ndarray, box: Box) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{baseline: (image scores (N,), maps (N, H, W) in the model frame)} for ``images``.

    Statistics and scores are computed inside ``box`` only (the smoothing reflects at the
    image's edge, not at the padding); the maps are 0 outside it.
    """
    tr = crop(train_images, box).astype(np.float32) / 255.0
    mean, std = tr.mean(axis=0), tr.std(axis=0)
    x = crop(images, box)
    z = _z_maps(x, mean, std)
    bright = x.astype(np.float32).mean(axis=3) / 255.0
    smooth = gaussian_blur(z, SMOOTH_SIGMA)
    t, left, h, w = box

    def frame(a: np.ndarray) -> np.ndarray:
        out = np.zeros(images.shape[:3], np.float32)
        out[:, t : t + h, left : left + w] = a
        return out

    bright_smooth = gaussian_blur(bright, PRIOR_SIGMA)
    prior = gaussian_blur(tr.mean(axis=3).mean(axis=0)[None], PRIOR_SIGMA)[0]
    return {
        "z-score mean": (z.mean(axis=(1, 2)), frame(z)),
        "brightness": (bright.mean(axis=(1, 2)), frame(bright)),
        "z-score smooth max": (smooth.max(axis=(1, 2)), frame(smooth)),
        "brightness smooth": (bright_smooth.max(axis=(1, 2)), frame(bright_smooth)),
        "constant prior": (np.zeros(len(x)), frame(np.broadcast_to(prior, bright.shape))),
    }


def baseline_rows(
    train_images: np.ndarray,
    validation_images: np.ndarray | None,
    test: ImageSet,
    box: Box,
    *,
    target_fpr: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """The three numpy baselines measured exactly as the model rows (:func:`measure`); with
    ``validation_images`` each also gets a conformal threshold from them and its FPR on the
    test normals."""
    assert test.masks is not None, "the test split needs ground-truth masks"
    test_b = baseline_maps(train_images, test.images, box)
    val_b = baseline_maps(train_images, validation_images, box) if validation_images is not None else None
    good = test.labels == 0
    rows: dict[str, dict[str, Any]] = {}
    for name, (scores, maps) in test_b.items():
        row = {"row": name, "kind": "baseline", "description": BASELINES[name],
               **measure(scores, maps, test.masks, test.labels, test.class_names, box, n_boot=n_boot, seed=seed)}
        row["fpr_at_threshold"] = row["threshold"] = None
        if val_b is not None and good.any():
            thr = conformal_threshold(val_b[name][0], target_fpr)
            row["threshold"] = thr
            row["fpr_at_threshold"] = rates_at_threshold(scores[good], np.zeros(int(good.sum())), thr)["fpr"]
            row["threshold_from"] = f"validation/good (n={len(validation_images)}), target FPR {target_fpr:g}"
        rows[name] = row
    return rows


# ---- rows and table ---------------------------------------------------------------------
def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of the numeric fields (and of the dynamic dicts' values) over seed rows."""

    def avg(vals: list[Any]) -> float | None:
        v = [float(a) for a in vals if a is not None]
        return float(np.mean(v)) if v else None

    out: dict[str, Any] = {"row": f"mean of {len(rows)} seed(s)", "kind": "mean"}
    for key in ("image_auroc", "pixel_auroc", "au_pro", "fpr_at_threshold", "train_seconds"):
        out[key] = avg([r.get(key) for r in rows])
    out["image_auroc_std"] = float(np.std([r["image_auroc"] for r in rows])) if rows else None
    for key in ("auroc_by_type", "component_auroc", "weights"):
        keys = list(dict.fromkeys(k for r in rows for k in (r.get(key) or {})))
        out[key] = {k: avg([(r.get(key) or {}).get(k) for r in rows]) for k in keys}
    return out


def ordered_types(names: Sequence[str]) -> list[str]:
    """Defect types in table order: the tyre's four first, then any others."""
    rest = [n for n in names if n not in TYPE_ORDER and n != "good"]
    return [t for t in TYPE_ORDER if t in names] + rest


def _f(v: Any, width: int = 6) -> str:
    return f"{v:>{width}.3f}" if isinstance(v, (int, float)) and np.isfinite(v) else f"{'—':>{width}}"


def _ci(v: Any, ci: Any) -> str:
    if not isinstance(v, (int, float)):
        return f"{'—':<19}"
    return f"{v:.3f} [{ci[0]:.3f},{ci[1]:.3f}]" if ci else f"{v:.3f}{'':14}"


def _kv(d: dict[str, Any] | None, fmt: str = ".3f") -> str:
    return " ".join(f"{k}={v:{fmt}}" if isinstance(v, (int, float)) else f"{k}=—" for k, v in (d or {}).items())


def format_table(
    rows: list[dict[str, Any]],
    baselines: dict[str, dict[str, Any]],
    types: Sequence[str],
    published: list[dict[str, Any]] | None = None,
) -> str:
    """The benchmark table: the model rows (one per seed, then their mean), the baselines,
    the published anchors; dynamic component and weight keys printed as ``key=value``."""
    published = PUBLISHED if published is None else published
    box = next((r["pixel_frame"]["box"] for r in [*rows, *baselines.values()] if r.get("pixel_frame")), None)
    lines = [
        "pixel AUROC* and AU-PRO* (FPR <= 0.3): in each image's own frame (model_region crop "
        f"{box} = top,left,h,w: the letterbox bands are excluded); [95% bootstrap CI over images]",
        f"{'row':<26} {'image AUROC [CI]':<19} " + " ".join(f"{_SHORT.get(t, t)[:8]:>8}" for t in types)
        + f" {'pixel AUROC* [CI]':<19} {'AU-PRO* [CI]':<19} {'FPR@thr':>7} {'train s':>7}  components / weights",
    ]

    def line(r: dict[str, Any], name: str) -> str:
        by = r.get("auroc_by_type") or {}
        tail = ""
        if r.get("component_auroc"):
            tail = f"  comp: {_kv(r['component_auroc'])}  w: {_kv(r.get('weights'), '.2f')}"
        ts = r.get("train_seconds")
        return (f"{name[:26]:<26} {_ci(r.get('image_auroc'), r.get('image_auroc_ci')):<19} "
                + " ".join(_f(by.get(t), 8) for t in types)
                + f" {_ci(r.get('pixel_auroc'), r.get('pixel_auroc_ci')):<19} {_ci(r.get('au_pro'), r.get('au_pro_ci')):<19}"
                + f" {_f(r.get('fpr_at_threshold'), 7)} {(f'{ts:7.0f}' if ts is not None else '      —')}{tail}")

    for r in rows:
        lines.append(line(r, r["row"]))
    if len(rows) > 1:
        m = mean_row(rows)
        lines.append(line(m, m["row"]) + f"  (image AUROC std {m['image_auroc_std']:.3f})")
    if baselines:
        lines.append("baselines (numpy, same split / resolution / crop / metric code; threshold from validation/good):")
        for name, r in baselines.items():
            lines.append(line(r, f"  {name}"))
    if published:
        lines.append("published anchors (NOT measured here: other resolution, 224x224 or native; partly 3D data):")
        for p in published:
            lines.append(f"{'  ' + p['name']:<26} {_f(p.get('image_auroc'), 5):<19} " + " ".join(_f(None, 8) for _ in types)
                         + f" {_f(p.get('pixel_auroc'), 5):<19} {_f(p.get('au_pro'), 5):<19}  [published: {p['input']}]")
    return "\n".join(lines)


def format_guarantee(row: dict[str, Any]) -> str:
    g = row["fpr_guarantee"]
    cap = " CAPPED: n < 1/a - 1, threshold = largest calibration score" if g["capped"] else ""
    return (f"{row['row']}: FPR at threshold {row['fpr_at_threshold']:.3f} "
            f"({row['n_false_positives']}/{g['n_test_normal']} test/good flagged); n_calibration {g['n_calibration']}, "
            f"target a {g['target_fpr']:g}, k {g['rank']}{cap}; E[FPR] = {g['expected_fpr']:.4f}, "
            f"uncapped band [a - 1/(n+1), a] = [{g['band'][0]:.4f}, {g['band'][1]:.4f}]; "
            f"95% range on {g['n_test_normal']} normals: binomial [{g['binomial_95'][0]:.2f}, {g['binomial_95'][1]:.2f}], "
            f"beta-binomial (one calibration draw) [{g['beta_binomial_95'][0]:.2f}, {g['beta_binomial_95'][1]:.2f}]")


# ---- picture ----------------------------------------------------------------------------
def save_top10(
    path: Path,
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray,
    types: np.ndarray,
    names: Sequence[str],
    box: Box,
    k: int = 10,
) -> Path:
    """The ``k`` highest-scoring images (contrast-stretched, mask outlined in cyan) over their
    anomaly maps (heat colormap, one colour scale for all, mask outlined), cropped to ``box``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(-np.asarray(scores))[:k]
    im, mp, mk = crop(images[order], box), crop(maps[order], box), crop(masks[order], box)
    # one colour scale for all ten (maps may be signed: standardized, combined components)
    vmin, vmax = (float(v) for v in np.quantile(crop(maps, box), [0.01, 0.999]))
    vmax = max(vmax, vmin + 1e-6)
    fig, axes = plt.subplots(2, len(order), figsize=(1.9 * len(order), 5.0), squeeze=False)
    for j, i in enumerate(order):
        x = im[j].astype(np.float32)
        x = x / max(float(np.quantile(x, 0.995)), 1.0)
        top, bottom = axes[0, j], axes[1, j]
        top.imshow(np.clip(x, 0, 1).squeeze())
        bottom.imshow(mp[j], cmap="hot", vmin=vmin, vmax=vmax)
        for ax in (top, bottom):
            if mk[j].any():
                ax.contour(mk[j].astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
        top.set_title(f"#{j + 1} {names[int(types[i])]}\nscore {scores[i]:.2f}", fontsize=8)
    axes[0, 0].set_ylabel("image (stretched)", fontsize=8)
    axes[1, 0].set_ylabel("anomaly map", fontsize=8)
    fig.suptitle(f"ten highest-scoring test images; cyan = ground-truth defect outline; map scale "
                 f"[{vmin:.3g}, {vmax:.3g}] (1st..99.9th percentile of all test maps)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run ----------------------------------------------------------------------------
def _model_row(args: argparse.Namespace, seed: int, spec: ImageSpec, test: ImageSet, box: Box) -> tuple[dict, Any]:
    from vaegan.models import ModelConfig
    from vaegan.service.runtime import Runtime
    from vaegan.trainer.config import TrainConfig
    from vaegan.trainer.evaluate import evaluate
    from vaegan.trainer.pipeline import train_and_export

    options = {**args.variant_options, **({"adv_weight": args.adv_weight} if args.adv_weight is not None else {})}
    options.update(args.train_overrides)
    cfg = TrainConfig(
        dataset="mvtec", data_root=str(args.data_root), normal_class=None, epochs=args.epochs,
        batch_size=args.batch_size, max_train=args.max_train or None, seed=seed, lr=args.lr, **options,
    )
    model_cfg = ModelConfig(
        num_channels=spec.channels, image_size=spec.height, latent_dim=args.latent_dim,
        base_width=args.base_width, spectral_norm=not args.no_spectral_norm,
    )
    run_dir = args.work / f"mvtec-{spec.height}px-seed{seed}{'-' + args.tag if args.tag else ''}"
    t0 = time.perf_counter()
    out = train_and_export(cfg, model_cfg, spec, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    rt = Runtime.load(out.bundle_dir, providers="cpu")
    s = rt.bundle.spec
    assert (s.height, s.width, s.resize) == (spec.height, spec.width, spec.resize), "bundle geometry differs"
    ev = evaluate(rt, test, batch_size=32, progress=False, n_boot=args.n_boot, seed=0)
    r = ev.report
    cal = rt.bundle.calibration
    good = test.labels == 0
    row = {
        "row": f"vaegan seed {seed}", "kind": "model", "seed": seed,
        **measure(ev.scores, ev.maps, test.masks, test.labels, test.class_names, box, n_boot=args.n_boot, seed=0),
        "component_auroc": r["component_auroc"],
        "weights": r["weights"],
        "threshold": r["threshold"],
        "fpr_at_threshold": r["fpr_at_threshold"],
        "n_false_positives": int((ev.scores[good] > r["threshold"]).sum()),
        "tpr_at_threshold": r["tpr_at_threshold"],
        "image_auprc": r["image_auprc"],
        "train_seconds": train_s,
        "images_per_second": r["images_per_second"],
        "selected_checkpoint": rt.bundle.manifest["training"].get("selected_checkpoint"),
        "selection_auroc": (cal.selection if cal else {}).get("selection_auroc"),
        "collapse": r.get("collapse"),
        "calibration_warnings": r.get("calibration_warnings"),
        "train_warnings": [w.get("kind") for w in out.warnings],
        "evaluate_frame_wide": {k: r.get(k) for k in ("pixel_auroc", "pixel_auroc_ci", "au_pro", "au_pro_ci",
                                                     "image_auroc", "image_auroc_ci", "image_auroc_by_type")},
        "bundle": str(out.bundle_dir),
    }
    assert abs(row["image_auroc"] - r["image_auroc"]) < 1e-9, "image AUROC differs from evaluate's"
    if cal is not None:
        row["fpr_guarantee"] = fpr_guarantee(cal.n, cal.target_fpr, int(good.sum()))
    logger.info("seed %d: image AUROC %.4f, pixel AUROC (own frame) %s, AU-PRO %s, components %s", seed,
                row["image_auroc"], _f(row["pixel_auroc"], 0), _f(row["au_pro"], 0),
                {c: round(v, 4) for c, v in r["component_auroc"].items()})
    return row, ev


def run(args: argparse.Namespace) -> int:
    """``one_class.py --dataset mvtec``: every seed, the baselines, the table, JSON and PNG."""
    from vaegan.trainer.data import DatasetError, load_dataset
    from vaegan.trainer.pipeline import image_spec_for

    t_start = time.perf_counter()
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    spec = image_spec_for("mvtec", args.image_size, None)
    test = load_dataset("mvtec", args.data_root, "test", spec)
    box = image_box(args.data_root, test.ids or [], spec)
    train = load_dataset("mvtec", args.data_root, "train", spec)
    try:
        val = load_dataset("mvtec", args.data_root, "validation", spec).images
    except DatasetError:
        val = None
    types = ordered_types(test.class_names)
    out = args.out or Path(args.results) / f"one_class_mvtec{'_' + args.tag if args.tag else ''}.json"
    png = out.with_name(out.stem + "_top10.png")
    logger.info("mvtec: %d test images (%s), model %dx%d %s, image region %s", len(test),
                {n: int((test.labels == i).sum()) for i, n in enumerate(test.class_names)}, spec.height, spec.width,
                spec.resize, box)
    from vaegan.trainer.config import TrainConfig

    target_fpr = float(args.train_overrides.get("target_fpr", TrainConfig().target_fpr))
    t0 = time.perf_counter()
    baselines = baseline_rows(train.images, val, test, box, target_fpr=target_fpr, n_boot=args.n_boot, seed=0)
    logger.info("baselines: %.0f s", time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []

    def write() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "config": {k: str(v) for k, v in vars(args).items()},
            "image_spec": spec.to_dict(),
            "image_region": {"box": list(box), "meaning": "top, left, height, width in model pixels"},
            "pixel_metrics": "pixel AUROC / AU-PRO inside each image's own frame (model_region crop); "
                             "evaluate's frame-wide values under rows[].evaluate_frame_wide",
            "n_by_type": {n: int((test.labels == i).sum()) for i, n in enumerate(test.class_names)},
            "rows": rows,
            "mean": mean_row(rows) if rows else None,
            "baselines": baselines,
            "published_anchors": {"note": "published, different resolution, not measured here", "rows": PUBLISHED},
            "top10_png": str(png),
            "seconds": time.perf_counter() - t_start,
        }
        out.write_text(json.dumps(doc, indent=2) + "\n")

    if getattr(args, "baselines_only", False):  # refresh the baselines of an existing result
        if out.is_file():
            old = json.loads(out.read_text())
            rows.extend(old.get("rows", []))
        seeds = []
    for i, seed in enumerate(seeds):
        row, ev = _model_row(args, seed, spec, test, box)
        rows.append(row)
        write()
        if i == 0:
            save_top10(png, test.images, ev.maps, test.masks, ev.scores, test.labels, test.class_names, box)
    write()
    print("\n" + format_table(rows, baselines, types))
    for r in rows:
        if "fpr_guarantee" in r:
            print(format_guarantee(r))
        kinds = list(dict.fromkeys([*(r.get("train_warnings") or []),
                                    *(w.get("kind") for w in r.get("calibration_warnings") or [])]))
        if kinds:
            print(f"{r['row']}: guard-rail warnings: {', '.join(map(str, kinds))} (details in the bundle manifest)")
    print(f"\nwrote {out}{'' if not seeds else f' and {png}'} (total {time.perf_counter() - t_start:.0f} s)")
    return 0
