"""The Poisson seam correction of inpainting (``service.runtime.inpaint.seam_correction``)."""

from __future__ import annotations

import numpy as np

from vaegan.service.runtime.inpaint import border_offset, seam_correction


def _hole(n: int = 2, h: int = 20, w: int = 24) -> np.ndarray:
    mask = np.zeros((n, h, w), bool)
    mask[:, 6:14, 8:18] = True
    return mask


def test_a_constant_mismatch_is_removed_exactly_and_nothing_outside_changes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 20, 24)).astype(np.float32)
    gen = x - np.float32(0.7)  # the fill is too dark by 0.7 everywhere
    mask = _hole()
    u = seam_correction(x, gen, mask)
    assert u.shape == x.shape and u.dtype == np.float32
    assert np.allclose(u[:, :, mask[0]], 0.7, atol=1e-5)
    assert not u[:, :, ~mask[0]].any()


def test_a_ramp_mismatch_is_followed_where_a_constant_offset_leaves_a_seam() -> None:
    """x - gen a linear ramp (harmonic): the correction follows it near the hole's edges, so the
    seam between fill and surroundings nearly vanishes, where one mean offset leaves steps."""
    h, w = 20, 24
    ramp = np.broadcast_to(np.linspace(-1, 1, w, dtype=np.float32), (1, 1, h, w))
    x = np.zeros((1, 1, h, w), np.float32)
    gen = x - ramp
    mask = _hole(1, h, w)
    u = seam_correction(x, gen, mask, iterations=400)
    seam = np.abs((gen + u) - x)[0, 0][mask[0]].max()
    flat = np.abs((gen + border_offset(x, gen, mask)) - x)[0, 0][mask[0]].max()
    assert seam < 0.05 and flat > 0.3
