"""Choosing the anomaly map's weights for localization, without labels."""

from __future__ import annotations

import numpy as np

from vaegan.trainer.selection import select_map_weights


def _case(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    changed = np.zeros((30, 32, 32), bool)
    for i in range(30):
        y, x = rng.integers(0, 28, 2)
        changed[i, y : y + 4, x : x + 4] = True
    good = rng.normal(0, 1, changed.shape) + 4.0 * changed  # finds the corruptions
    noise = rng.normal(0, 1, changed.shape)  # knows nothing
    return {"pixel_local": good.astype(np.float32), "disc_local": noise.astype(np.float32)}, changed


def test_a_map_that_does_not_localize_is_dropped() -> None:
    maps, changed = _case()
    stats = {"pixel_local": (0.0, 1.0), "disc_local": (0.0, 1.0)}
    weights, report = select_map_weights(maps, changed, stats)
    assert weights == {"pixel_local": 1.0, "disc_local": 0.0}
    assert report["map_pixel_auroc"]["pixel_local"] > 0.95 > 0.6 > report["map_pixel_auroc"]["disc_local"]
    assert report["dropped"][0]["dropped"] == "disc_local"


def test_two_useful_maps_are_both_kept_and_whole_image_changes_are_ignored() -> None:
    maps, changed = _case(1)
    maps["disc_local"] = maps["pixel_local"] + np.random.default_rng(2).normal(0, 0.5, changed.shape).astype(np.float32)
    changed[0] = True  # a rotated image: everything changed, nothing to localize
    stats = {"pixel_local": (0.0, 1.0), "disc_local": (0.0, 1.0)}
    weights, report = select_map_weights(maps, changed, stats)
    assert weights == {"pixel_local": 1.0, "disc_local": 1.0}
    assert report["n_images"] == 29
