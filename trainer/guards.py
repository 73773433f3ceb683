"""Guard rails: checks that make a bad bundle say so instead of shipping silently. Numpy only.

* :func:`collapse_report`: a generator that gives every image (nearly) the same reconstruction
  has collapsed; its scores then measure the input, not a model of normality.
* :func:`calibration_size_report`: too few calibration images cannot pin a small false
  positive rate; the report says by how much the FPR may miss and what to do.

Both return plain dicts (JSON-ready) with ``fired`` and a ``message``; :func:`fired_warnings`
keeps the ones that fired and :func:`log_warnings` logs them loudly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "CALIBRATION_FACTOR",
    "COLLAPSE_RATIO",
    "COLLAPSE_STD",
    "calibration_size_report",
    "collapse_report",
    "fired_warnings",
    "image_variation",
    "log_warnings",
]

logger = logging.getLogger(__name__)

# A reconstruction set whose per-pixel spread across images is below 5% of the inputs' own,
# or below one grey level, has collapsed. Healthy tiny models measure 0.5-0.9 of the inputs'
# spread (see tests/trainer/test_guards.py); a generator emitting one flat square measures 0.
COLLAPSE_RATIO = 0.05
COLLAPSE_STD = 1.0  # grey levels (0..255)
# calibration is "too small" below CALIBRATION_FACTOR / target_fpr images: about 10 expected
# exceedances, which puts the FPR's relative standard deviation near 1/sqrt(10) ~ 30%
CALIBRATION_FACTOR = 10.0

_CALIBRATION_REMEDY = (
    "hold out more normal images (--val-fraction; the calibration part is val_fraction x "
    "(1 - selection_fraction) of the normal training images) or train on a larger set, "
    "or raise --target-fpr"
)


def image_variation(images: np.ndarray, batch: int = 256) -> float:
    """Mean over pixels and channels of the std across images, in grey levels (0..255).

    ``images``: uint8 (N, H, W, C) (or any (N, ...) array on the 0..255 scale). 0 when every
    image is the same; computed in float64 batches, so large sets do not need N x H x W x C
    floats at once.
    """
    images = np.asarray(images)
    n = len(images)
    if n < 2:
        return 0.0
    total = np.zeros(images.shape[1:], np.float64)
    total_sq = np.zeros(images.shape[1:], np.float64)
    for i in range(0, n, batch):
        x = images[i : i + batch].astype(np.float64)
        total += x.sum(0)
        total_sq += (x * x).sum(0)
    mean = total / n
    var = np.maximum(total_sq / n - mean * mean, 0.0)
    return float(np.sqrt(var).mean())


def collapse_report(reconstructions: np.ndarray, inputs: np.ndarray | None = None) -> dict[str, Any]:
    """Has the generator collapsed? Compares how much reconstructions vary across images with
    how much their inputs do.

    Args:
        reconstructions: uint8 (N, H, W, C), the model's reconstructions of normal images.
        inputs: the images reconstructed (any size, same scale), or None.

    Returns a dict: ``recon_std`` and ``input_std`` (see :func:`image_variation`), ``ratio``
    (recon / input; None without inputs), ``fired`` (collapsed: ratio < COLLAPSE_RATIO, or
    recon_std < COLLAPSE_STD grey levels while the inputs vary by more), and ``message``.
    """
    recon_std = image_variation(reconstructions)
    input_std = None if inputs is None else image_variation(inputs)
    ratio = None if not input_std else recon_std / input_std
    inputs_vary = input_std is None or input_std >= COLLAPSE_STD
    collapsed = bool((ratio is not None and ratio < COLLAPSE_RATIO) or (recon_std < COLLAPSE_STD and inputs_vary))
    message = None
    if collapsed:
        seen = f" (the inputs vary by {input_std:.2f}, ratio {ratio:.3f})" if ratio is not None else ""
        message = (
            f"the generator has COLLAPSED: its reconstructions of {len(reconstructions)} normal "
            f"images vary across images by {recon_std:.2f} grey levels{seen}, i.e. it outputs "
            f"nearly the same image whatever the input; scores then measure the input, not a "
            f"model of normality. Do not deploy this bundle: train longer or on more images, "
            f"lower --lr or --adv-weight, and check the data."
        )
    return {
        "kind": "collapse",
        "n": int(len(reconstructions)),
        "recon_std": recon_std,
        "input_std": input_std,
        "ratio": ratio,
        "thresholds": {"ratio": COLLAPSE_RATIO, "std": COLLAPSE_STD},
        "fired": collapsed,
        "message": message,
    }


def calibration_size_report(n: int, target_fpr: float, remedy: str | None = None) -> dict[str, Any]:
    """Can n calibration images pin a false positive rate of ``target_fpr`` (a)?

    Too small when n < CALIBRATION_FACTOR / a (1000 at a = 0.01). Below 1/a - 1 the conformal
    threshold does not exist at all (see :class:`service.runtime.scoring.Calibration`). The
    report gives the FPR's standard deviation across calibration sets, sqrt(a(1-a)/n), and
    what to do (``remedy``, default: more held-out normals or a larger target FPR).
    """
    a = float(target_fpr)
    if not 0.0 < a < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    n_recommended = math.ceil(CALIBRATION_FACTOR / a - 1e-9)
    n_minimum = math.ceil(1.0 / a - 1.0 - 1e-9)
    fpr_std = math.sqrt(a * (1.0 - a) / n) if n > 0 else float("inf")
    fired = n < n_recommended
    message = None
    if fired:
        worst = (
            f" Below {n_minimum} images no order statistic reaches a {a:g} FPR: the threshold "
            f"is the largest calibration score and the FPR can reach 1/(n+1) = {1 / (n + 1):.3f}."
            if n < n_minimum else ""
        )
        message = (
            f"calibration set TOO SMALL: {n} images cannot pin a target FPR of {a:g}; the FPR "
            f"actually met varies from one calibration set to the next with a standard "
            f"deviation of about sqrt(a(1-a)/n) = {fpr_std:.4f} ({fpr_std / a:.0%} of the "
            f"target).{worst} Use at least {n_recommended} calibration images (10/a): "
            f"{remedy or _CALIBRATION_REMEDY}; with {n} images a target FPR of at least "
            f"{min(CALIBRATION_FACTOR / max(n, 1), 1.0):.3g} is measurable."
        )
    return {
        "kind": "calibration_size",
        "n": int(n),
        "target_fpr": a,
        "n_recommended": n_recommended,
        "n_minimum": n_minimum,
        "fpr_std": fpr_std,
        "fired": fired,
        "message": message,
    }


def fired_warnings(reports: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reports that fired, for ``manifest["calibration"]["warnings"]``."""
    return [r for r in reports if r.get("fired")]


def log_warnings(warnings: Iterable[dict[str, Any]], context: str, log: logging.Logger | None = None) -> None:
    """Log each fired report loudly: a banner line, the message, the remedy; WARNING level."""
    log = log or logger
    for w in warnings:
        log.warning("!" * 78)
        log.warning("%s: %s WARNING", context, str(w.get("kind", "guard")).upper().replace("_", " "))
        for line in _wrap(str(w.get("message", ""))):
            log.warning("  %s", line)
        log.warning("!" * 78)


def _wrap(text: str, width: int = 90) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [text]
