"""The localized components: the smoothing, what they catch that means miss, and that the
runtime, `vaegan evaluate` and training-time selection compute the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vaegan.service.runtime import Runtime
from vaegan.service.runtime.scoring import LOCAL_COMPONENTS, gaussian_blur, smoothing_sigma


def _reference_blur(m: np.ndarray, sigma: float) -> np.ndarray:
    """Brute-force 2D convolution with a normalized Gaussian, reflect padding."""
    r = max(1, int(3.0 * sigma + 0.5))
    k1 = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k2 = np.outer(k1, k1) / np.outer(k1, k1).sum()
    p = np.pad(m, r, mode="reflect")
    h, w = m.shape
    return np.array([[np.sum(p[i : i + 2 * r + 1, j : j + 2 * r + 1] * k2) for j in range(w)] for i in range(h)])


@pytest.mark.parametrize("shape,sigma", [((17, 23), 1.0), ((32, 32), 2.5), ((9, 40), 1.5)])
def test_gaussian_blur_equals_a_2d_convolution(shape: tuple[int, int], sigma: float) -> None:
    m = np.random.default_rng(0).random(shape).astype(np.float32)
    np.testing.assert_allclose(gaussian_blur(m[None], sigma)[0], _reference_blur(m, sigma), atol=1e-5)
    # mass is kept and a constant stays constant
    assert gaussian_blur(np.full((1, *shape), 3.0, np.float32), sigma) == pytest.approx(3.0, abs=1e-5)


def test_smoothing_sigma_follows_the_image_size() -> None:
    assert smoothing_sigma(28, 28) == 1.0 and smoothing_sigma(192, 256) == 4.0


def test_a_small_defect_moves_the_local_component_more_than_the_mean(runtime: Runtime) -> None:
    """A 3x3 spot barely moves a mean over 32x32 pixels, but it is the top of the residual map:
    in units of each component's normal spread, pixel_local moves several times more."""
    from vaegan.trainer.data import load_dataset

    normal = load_dataset("synthetic", None, "train", runtime.spec, limit=40).images
    spotted = normal.copy()
    spotted[:, 14:17, 14:17] = 255 - spotted[:, 14:17, 14:17]  # an inverted 3x3 spot
    a, b = runtime.score(normal), runtime.score(spotted)
    stats = runtime.bundle.calibration.stats

    def shift(k: str) -> float:
        return float(np.median((b.components[k] - a.components[k]) / stats[k][1]))

    assert shift("pixel_local") > 3 * shift("pixel") > 0
    # the served map peaks on the spot
    peak = np.array([np.unravel_index(np.argmax(m), m.shape) for m in b.anomaly_map])
    assert np.mean((np.abs(peak - 15) <= 2).all(1)) > 0.8


def test_runtime_evaluate_and_training_selection_agree(tiny_run, tiny_bundle: Path) -> None:
    """The same images through Runtime.score, `vaegan evaluate` and the torch path used to
    select checkpoints during training give the same local components."""
    import torch

    from vaegan.service.runtime.preprocess import normalize
    from vaegan.trainer.checkpoint import load_checkpoint, model_from_checkpoint
    from vaegan.trainer.data import load_dataset
    from vaegan.trainer.evaluate import evaluate
    from vaegan.trainer.loop import components_torch

    rt = Runtime.load(tiny_bundle, providers="cpu")
    test = load_dataset("synthetic", None, "test", rt.spec, limit=24)
    ref = rt.score(test.images)
    ev = evaluate(rt, test, progress=False)
    outcome = tiny_run[0]
    source = outcome.bundle_dir.parent / "checkpoints" / rt.bundle.manifest["training"]["selected_checkpoint"]
    model = model_from_checkpoint(load_checkpoint(source))
    torch_comps = components_torch(model, torch.from_numpy(normalize(test.images, rt.spec)), torch.device("cpu"))
    for k in LOCAL_COMPONENTS:
        np.testing.assert_allclose(ev.components[k], ref.components[k], rtol=1e-6)
        np.testing.assert_allclose(torch_comps[k], ref.components[k], rtol=1e-3, atol=1e-4)
