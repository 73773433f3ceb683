"""Generative benchmark: does the GAN half earn its place?

Trains the same model on all MNIST digits (no normal class; the same epochs, image cap and
seed for every row) as a plain VAE and as VAE-GAN variants (:data:`VARIANTS`), exports each
through ``train_and_export`` and loads the bundle in the torch-free runtime. From each bundle:
2,000 prior samples (``Runtime.sample``) and the reconstructions of the first 2,000 MNIST test
images (``Runtime.reconstruct``), both compared with those 2,000 real test images by

* **FD-MNIST**: the Frechet distance between Gaussians fitted to the penultimate (128-d)
  features of a small MNIST classifier trained here (2 conv + 2 fc, 2 epochs, seeded; its
  weights are cached in the work dir). This is the MNIST analogue of FID (FID does the same
  with Inception-v3 pool features on natural images); lower is closer to real digits;
* **confidence**: the classifier's mean max softmax probability (sharp, recognisable digits
  score high, ambiguous blends low);
* **sharpness**: mean finite-difference gradient magnitude (pixels in 0..1) relative to the
  real test images' (1.0 = as sharp as real, < 1 blurrier).

The ``real`` row is the floor: 2,000 other real test images (the last 2,000, from the other
half of the test set) against the same reference. Writes benchmarks/results/generative.json
and one grid PNG per variant (generative_<variant>.png: 8x8 prior samples on top; below them
the reconstructions of test images 0..63 in 8x8, then a row of the real test images 0..7, which
are the originals of the first reconstruction row), and prints a table.

    python benchmarks/generative.py --quick
    python benchmarks/generative.py --data-root DATA/mnist --epochs 5 --max-train 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vaegan.trainer.config import TrainConfig  # noqa: E402  (torch-free; torch loads in main())

# TrainConfig overrides per row; everything else is TrainConfig()'s default (and the common
# flags: epochs, max_train, seed, ...). Add rows here.
VARIANTS: dict[str, dict] = {
    "vae": {"adv_loss": "none"},
    "vaegan": {},  # LSGAN + D's shape negatives: TrainConfig() as it is
    "vaegan-denoise": {"input_noise": 0.2},
    "vaegan-wd": {"weight_decay": 1e-5},
    # CVAE-GAN on the digit labels; its prior samples go round-robin over the ten classes
    "vaegan-conditional": {"conditional": True},
}
N_EVAL = 2000  # prior samples and test images per model
SAMPLE_CHUNK = 1000  # Runtime.sample takes at most 1024 at a time
GRID = 8  # the PNG's blocks are GRID x GRID tiles
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the classifier's input normalization


# ----------------------------------------------------------------------------- metrics (pure)


def sqrtm_psd(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition.

    The matrix is symmetrized first and negative eigenvalues (round-off) are clipped to 0, so
    the result is symmetric PSD with ``r @ r ~= mat``.
    """
    m = np.asarray(mat, dtype=np.float64)
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, float64) of (N, D) features, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``: the FID formula. The cross
    term uses the symmetric product ``C1^1/2 C2 C1^1/2`` (same trace of square root as
    ``C1 C2``, but symmetric PSD, so :func:`sqrtm_psd` applies). Never negative.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    s1 = sqrtm_psd(cov1)
    cross = sqrtm_psd(s1 @ cov2 @ s1)
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(cross))
    return max(d, 0.0)


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits (float64, numerically stable)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mean_confidence(logits: np.ndarray) -> float:
    """Mean over images of the max softmax probability: in [1/K, 1] for K classes."""
    return float(softmax(logits).max(axis=1).mean())


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) -> float32 (N, H, W, C) in 0..1; float input is returned as float32."""
    a = np.asarray(images)
    return a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)


def mean_gradient_magnitude(images: np.ndarray) -> float:
    """Mean finite-difference gradient magnitude of images in 0..1 (uint8 is scaled first).

    Forward differences along x and y on the common (H-1, W-1) grid, ``sqrt(dx^2 + dy^2)``,
    averaged over pixels, channels and images. Blurring lowers it; a constant image gives 0.
    """
    x = to_unit(images)
    if x.ndim == 3:  # (N, H, W)
        x = x[..., None]
    dx = x[:, :-1, 1:, :] - x[:, :-1, :-1, :]
    dy = x[:, 1:, :-1, :] - x[:, :-1, :-1, :]
    return float(np.sqrt(dx.astype(np.float64) ** 2 + dy.astype(np.float64) ** 2).mean())


def sharpness_ratio(images: np.ndarray, reference: np.ndarray) -> float:
    """:func:`mean_gradient_magnitude` of ``images`` over that of ``reference`` (1.0 = as sharp)."""
    return mean_gradient_magnitude(images) / mean_gradient_magnitude(reference)


def tile_grid(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> one (rows*H, cols*W, C) image, row-major; missing tiles are black."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.zeros((rows * h, cols * w, c), np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[r * h : (r + 1) * h, k * w : (k + 1) * w] = images[i]
    return out


# ----------------------------------------------------------------------------- classifier


def _classifier_net():  # noqa: ANN202
    import torch.nn as nn

    class SmallCNN(nn.Module):
        """2 conv + 2 fc; ``features`` is the 128-d penultimate layer (after its ReLU)."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )
            self.fc1 = nn.Linear(64 * 7 * 7, 128)
            self.fc2 = nn.Linear(128, 10)

        def features(self, x):  # noqa: ANN001, ANN201
            return self.fc1(self.conv(x).flatten(1)).relu()

        def forward(self, x):  # noqa: ANN001, ANN201
            return self.fc2(self.features(x))

    return SmallCNN()


def _to_tensor(images: np.ndarray):  # noqa: ANN202
    import torch

    x = to_unit(images)[..., 0]  # (N, 28, 28), grey
    return torch.from_numpy((x - MNIST_MEAN) / MNIST_STD)[:, None]


def classifier(train, test, work: Path, seed: int, epochs: int = 2, batch_size: int = 128):  # noqa: ANN001, ANN201
    """The MNIST classifier (eval mode) and its test accuracy; trained once per (seed, epochs)
    and cached in ``work``."""
    import torch

    path = work / f"mnist_classifier_seed{seed}_e{epochs}.pt"
    torch.manual_seed(seed)
    net = _classifier_net()
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        net.eval()
        logging.info("classifier from %s (test accuracy %.4f)", path, saved["accuracy"])
        return net, float(saved["accuracy"])
    x, y = _to_tensor(train.images), torch.from_numpy(train.labels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        logging.info("classifier epoch %d/%d done (%.0f s)", epoch + 1, epochs, time.perf_counter() - t0)
    net.eval()
    _, logits = classify(net, test.images)
    acc = float((logits.argmax(1) == test.labels).mean())
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "accuracy": acc, "epochs": epochs, "seed": seed}, path)
    logging.info("classifier: test accuracy %.4f (%.0f s), cached in %s", acc, time.perf_counter() - t0, path)
    return net, acc


def classify(net, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(128-d penultimate features, logits) of uint8 (N, 28, 28, 1) images, float64 numpy."""
    import torch

    feats, logits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            f = net.features(_to_tensor(images[i : i + batch_size]))
            feats.append(f.double().numpy())
            logits.append(net.fc2(f).double().numpy())
    return np.concatenate(feats), np.concatenate(logits)


# ----------------------------------------------------------------------------- benchmark


def measure(net, images: np.ndarray, ref_feats: np.ndarray, ref_images: np.ndarray) -> dict:  # noqa: ANN001
    """FD-MNIST, confidence and sharpness ratio of uint8 images against the reference set."""
    feats, logits = classify(net, images)
    return {
        "fd_mnist": frechet_distance_features(feats, ref_feats),
        "confidence": mean_confidence(logits),
        "sharpness": sharpness_ratio(images, ref_images),
    }


def draw_samples(rt, n: int, seed: int) -> np.ndarray:  # noqa: ANN001
    """``n`` prior samples in chunks Runtime.sample accepts, each chunk with its own seed."""
    chunks = [rt.sample(min(SAMPLE_CHUNK, n - i), seed=seed * 100_003 + i // SAMPLE_CHUNK) for i in range(0, n, SAMPLE_CHUNK)]
    return np.concatenate(chunks)


def write_grid(samples: np.ndarray, recon: np.ndarray, real: np.ndarray, path: Path, scale: int = 2) -> None:
    """PNG: GRIDxGRID samples, then GRIDxGRID reconstructions, then one row of the real originals
    of the first reconstruction row; grey bars between the blocks."""
    from PIL import Image

    k = GRID * GRID
    blocks = [tile_grid(samples[:k], GRID), tile_grid(recon[:k], GRID), tile_grid(real[:GRID], GRID)]
    bar = np.full((4, blocks[0].shape[1], blocks[0].shape[2]), 128, np.uint8)
    img = np.concatenate([blocks[0], bar, blocks[1], bar, blocks[2]])
    pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
    pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST).save(path)


def run_variant(args: argparse.Namespace, variant: str, spec, net, test_ref, ref_feats, png: Path) -> dict:  # noqa: ANN001
    from vaegan.models import ModelConfig
    from vaegan.service.runtime import Runtime
    from vaegan.trainer.pipeline import train_and_export

    cfg = TrainConfig(
        dataset="mnist", data_root=str(args.data_root), normal_class=None, epochs=args.epochs,
        max_train=args.max_train or None, seed=args.seed, **VARIANTS[variant],
    )
    model_cfg = ModelConfig(num_channels=spec.channels, image_size=spec.height,
                            latent_dim=args.latent_dim, base_width=args.base_width)
    run_dir = args.work / f"{variant}-e{args.epochs}-n{args.max_train}-s{args.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    out = train_and_export(cfg, model_cfg, spec, run_dir, progress=False)
    train_s = time.perf_counter() - t0
    rt = Runtime.load(out.bundle_dir, providers="cpu")
    samples = draw_samples(rt, N_EVAL, args.seed)
    recon = rt.reconstruct(test_ref)
    write_grid(samples, recon, test_ref, png)
    row = {
        "variant": variant,
        "options": VARIANTS[variant],
        "prior": measure(net, samples, ref_feats, test_ref),
        "recon": measure(net, recon, ref_feats, test_ref),
        "train_seconds": train_s,
        "selected_checkpoint": rt.bundle.manifest["training"].get("selected_checkpoint"),
        "warnings": [w.get("kind") for w in out.warnings],
        "png": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
    }
    logging.info("%s: prior %s recon %s (%.0f s)", variant, _fmt(row["prior"]), _fmt(row["recon"]), train_s)
    return row


def _fmt(m: dict) -> str:
    return f"FD {m['fd_mnist']:.2f} conf {m['confidence']:.3f} sharp {m['sharpness']:.3f}"


def format_table(rows: list[dict], accuracy: float) -> str:
    """The printed table: one line per row, prior-sample and reconstruction metrics side by side."""
    lines = [
        "FD-MNIST = Frechet distance in a small MNIST classifier's 128-d penultimate features "
        f"(the MNIST analogue of FID; classifier test accuracy {accuracy:.4f}); lower is better.",
        "conf = mean max softmax probability; sharp = mean gradient magnitude / real test set's.",
        f"each vs the first {N_EVAL} MNIST test images; 'real' = {N_EVAL} other test images (the floor).",
        "",
        f"{'variant':<16} | {'prior samples':^27} | {'reconstructions':^27} | {'train s':>7}",
        f"{'':<16} | {'FD-MNIST':>9} {'conf':>7} {'sharp':>9} | {'FD-MNIST':>9} {'conf':>7} {'sharp':>9} | {'':>7}",
        "-" * 16 + "-+-" + "-" * 27 + "-+-" + "-" * 27 + "-+-" + "-" * 7,
    ]
    for r in rows:
        cells = []
        for part in ("prior", "recon"):
            m = r.get(part)
            cells.append(f"{m['fd_mnist']:>9.2f} {m['confidence']:>7.3f} {m['sharpness']:>9.3f}" if m else f"{'-':>27}")
        secs = f"{r['train_seconds']:>7.0f}" if r.get("train_seconds") is not None else f"{'-':>7}"
        lines.append(f"{r['variant']:<16} | {cells[0]} | {cells[1]} | {secs}")
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_root = REPO.parent / "shared" / "data" / "mnist"
    p.add_argument("--data-root", type=Path, default=default_root if default_root.exists() else None,
                   help="folder with the MNIST IDX files (never downloaded)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--max-train", type=int, default=20000, help="cap on training images (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--base-width", type=int, default=32)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 epoch, 2000 training images")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "generative")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/generative[_quick].json); "
                   "the PNGs go next to it as <stem>_<variant>.png")
    args = p.parse_args(argv)
    if args.data_root is None or not args.data_root.exists():
        p.error("--data-root: give the folder that holds the MNIST IDX files")
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    if args.quick:
        args.epochs, args.max_train = 1, 2000
    out = args.out or REPO / "benchmarks" / "results" / f"generative{'_quick' if args.quick else ''}.json"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("trainer", "export", "service"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import torch

    from vaegan.trainer.data import load_dataset
    from vaegan.trainer.pipeline import image_spec_for

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_all = time.perf_counter()
    spec = image_spec_for("mnist", None, None)
    train = load_dataset("mnist", args.data_root, "train", spec)
    test = load_dataset("mnist", args.data_root, "test", spec)
    net, accuracy = classifier(train, test, args.work, args.seed, args.classifier_epochs)
    del train
    test_ref, test_other = test.images[:N_EVAL], test.images[-N_EVAL:]
    ref_feats, ref_logits = classify(net, test_ref)
    real = {"variant": "real", "options": {},
            "prior": measure(net, test_other, ref_feats, test_ref),
            "recon": None, "train_seconds": None}
    real["reference_confidence"] = mean_confidence(ref_logits)
    real["reference_gradient_magnitude"] = mean_gradient_magnitude(test_ref)
    rows = [real]
    config = {**{k: str(v) for k, v in vars(args).items()}, "variants": variants, "n_eval": N_EVAL,
              "train_config_defaults": TrainConfig().to_dict(),
              "reference": f"MNIST test images 0..{N_EVAL - 1}; real row: test images {len(test) - N_EVAL}..{len(test) - 1}"}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "config": config, "rows": rows, "classifier_test_accuracy": accuracy,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "seconds": time.perf_counter() - t_all,
        }, indent=2) + "\n")

    save()
    for variant in variants:
        png = out.with_name(f"{out.stem}_{variant}.png")
        rows.append(run_variant(args, variant, spec, net, test_ref, ref_feats, png))
        save()
    print(format_table(rows, accuracy))
    print(f"\nwrote {out} and {len(variants)} PNGs ({time.perf_counter() - t_all:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
