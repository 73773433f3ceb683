"""benchmarks/generative.py's metric functions on cases with known answers (nothing trained,
no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.generative import (
    VARIANTS,
    format_table,
    frechet_distance,
    frechet_distance_features,
    gaussian_stats,
    mean_confidence,
    mean_gradient_magnitude,
    sharpness_ratio,
    softmax,
    sqrtm_psd,
    tile_grid,
)


def _gaussian(n: int = 4000, d: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a.T + rng.normal(size=d)  # correlated, non-zero mean


def test_sqrtm_psd_squares_back() -> None:
    cov = np.cov(_gaussian(), rowvar=False)
    r = sqrtm_psd(cov)
    np.testing.assert_allclose(r @ r, cov, atol=1e-10)
    np.testing.assert_allclose(r, r.T, atol=1e-12)
    # a rank-deficient PSD matrix (round-off may make eigenvalues slightly negative)
    v = np.ones((3, 1))
    np.testing.assert_allclose(sqrtm_psd(v @ v.T) @ sqrtm_psd(v @ v.T), v @ v.T, atol=1e-10)


def test_fd_with_itself_is_zero() -> None:
    x = _gaussian()
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fd_with_shifted_copy_is_squared_shift() -> None:
    x = _gaussian()
    shift = np.linspace(-1.0, 2.0, x.shape[1])
    assert frechet_distance_features(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_fd_closed_forms() -> None:
    d = 5
    mu = np.zeros(d)
    # isotropic: N(0, a^2 I) vs N(0, b^2 I) -> d (a - b)^2
    assert frechet_distance(mu, 4.0 * np.eye(d), mu, np.eye(d)) == pytest.approx(d * (2 - 1) ** 2)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 + |mu1 - mu2|^2
    s1, s2 = np.array([1.0, 4, 9, 16, 25]), np.array([25.0, 16, 9, 4, 1])
    mu2 = np.arange(d, dtype=float)
    want = float(np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2) + mu2 @ mu2)
    assert frechet_distance(mu, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want)
    # symmetric in its arguments, never negative
    c1, c2 = np.cov(_gaussian(seed=1), rowvar=False), np.cov(_gaussian(seed=2), rowvar=False)
    assert frechet_distance(mu, c1, mu, c2) == pytest.approx(frechet_distance(mu, c2, mu, c1), rel=1e-8)
    assert frechet_distance(mu, c1, mu, c1) >= 0.0


def test_gaussian_stats_shapes_and_errors() -> None:
    mu, cov = gaussian_stats(np.arange(6, dtype=float).reshape(3, 2))
    assert mu.shape == (2,) and cov.shape == (2, 2)
    np.testing.assert_allclose(mu, [2.0, 3.0])
    with pytest.raises(ValueError):
        gaussian_stats(np.zeros((1, 4)))


def test_confidence_bounds() -> None:
    k = 10
    assert mean_confidence(np.zeros((7, k))) == pytest.approx(1.0 / k)  # uniform: the floor 1/K
    assert mean_confidence(np.eye(k) * 1000.0) == pytest.approx(1.0)  # one-hot: the ceiling
    logits = np.random.default_rng(0).normal(scale=3.0, size=(200, k))
    c = mean_confidence(logits)
    assert 1.0 / k < c < 1.0
    np.testing.assert_allclose(softmax(logits).sum(1), 1.0)
    assert np.isfinite(softmax(np.array([[1e4, 0.0]]))).all()  # stable for large logits


def _digit_like(n: int = 16, size: int = 28, seed: int = 0) -> np.ndarray:
    """Random bright strokes (rectangles) on black: uint8 (n, size, size, 1)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, 1), np.uint8)
    for img in out:
        for _ in range(3):
            y, x = rng.integers(2, size - 8, 2)
            img[y : y + rng.integers(2, 8), x : x + rng.integers(2, 8)] = 255
    return out


def _box_blur(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    s = sum(p[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)) / 9.0
    return np.round(s).astype(np.uint8)


def test_sharpness_of_blurred_is_lower() -> None:
    imgs = _digit_like()
    blurred = _box_blur(imgs)
    assert mean_gradient_magnitude(blurred) < mean_gradient_magnitude(imgs)
    assert sharpness_ratio(blurred, imgs) < 1.0
    assert sharpness_ratio(imgs, imgs) == pytest.approx(1.0)
    assert mean_gradient_magnitude(np.full((2, 28, 28, 1), 200, np.uint8)) == 0.0  # constant: no edges


def test_gradient_magnitude_known_value() -> None:
    # a vertical step from 0 to 1: one column of |dx| = 1 on the (H-1, W-1) grid
    x = np.zeros((1, 5, 5, 1), np.float32)
    x[..., 3:, :] = 1.0
    assert mean_gradient_magnitude(x) == pytest.approx(1.0 / 4)
    # uint8 is scaled to 0..1 first: the same step in 0..255 gives the same value
    assert mean_gradient_magnitude((x * 255).astype(np.uint8)) == pytest.approx(1.0 / 4)


def test_tile_grid_layout() -> None:
    imgs = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1) * np.ones((1, 2, 3, 1), np.uint8)
    g = tile_grid(imgs, 2)
    assert g.shape == (3 * 2, 2 * 3, 1)
    assert g[0, 0, 0] == 0 and g[0, 3, 0] == 1 and g[2, 0, 0] == 2 and g[4, 0, 0] == 4
    assert g[4, 3, 0] == 0  # missing sixth tile stays black


def test_table_and_variants() -> None:
    assert VARIANTS["vae"] == {"adv_loss": "none"} and VARIANTS["vaegan"] == {}
    m = {"fd_mnist": 1.5, "confidence": 0.9, "sharpness": 0.8}
    rows = [{"variant": "real", "prior": m, "recon": None, "train_seconds": None},
            {"variant": "vae", "prior": m, "recon": m, "train_seconds": 12.3}]
    text = format_table(rows, 0.99)
    assert "FD-MNIST" in text and "FID" in text
    assert any(line.startswith("real") for line in text.splitlines())
    assert any(line.startswith("vae ") and line.rstrip().endswith("12") for line in text.splitlines())
