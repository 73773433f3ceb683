"""benchmarks/mvtec_report.py without training: the image-region crop, the numpy baselines,
the FPR guarantee and the table, on a tiny MVTec-layout tree written by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.mvtec_report import (
    baseline_rows,
    crop,
    format_table,
    fpr_guarantee,
    image_box,
    mean_row,
    measure,
    ordered_types,
)
from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.trainer.data import load_dataset

SPEC = ImageSpec(channels=3, height=16, width=16)  # letterbox: 16 x 12 images get 2-px side bands
SIZE = (16, 12)  # (H, W) of every image, like the tyre's 256 x 192


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_tree(root: Path) -> Path:
    """6 train, 3 validation, 4 good + 3 cut + 3 hole test images: dark texture that is never
    black (values 20..50), a bright 3x3 defect with its mask in each defective image."""
    rng = np.random.default_rng(0)

    def texture() -> np.ndarray:
        return rng.integers(20, 50, (*SIZE, 3), dtype=np.uint8)

    for i in range(6):
        _write(root / "train" / "good" / f"{i:03d}.png", texture())
    for i in range(3):
        _write(root / "validation" / "good" / f"{i:03d}.png", texture())
    for i in range(4):
        _write(root / "test" / "good" / f"{i:03d}.png", texture())
    for kind in ("cut", "hole"):
        for i in range(3):
            img, mask = texture(), np.zeros(SIZE, np.uint8)
            t, left = 2 + 4 * i, 1 + 3 * i
            img[t : t + 3, left : left + 3] = 250
            mask[t : t + 3, left : left + 3] = 255
            _write(root / "test" / kind / f"{i:03d}.png", img)
            _write(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "tiny_tire")


def test_region_crop_excludes_the_letterbox_padding(tree: Path) -> None:
    test = load_dataset("mvtec", tree, "test", SPEC)
    box = image_box(tree, test.ids, SPEC)
    assert box == (0, 2, 16, 12)
    inside = crop(test.images, box)
    assert inside.shape == (len(test), 16, 12, 3)
    assert inside.min() >= 20  # no black padding pixel inside the crop
    outside = test.images.copy()
    outside[:, :, 2:14] = 0
    assert outside.max() == 0  # ... and every pixel outside it is padding
    assert crop(test.masks, box).sum() == test.masks.sum() == 6 * 9
    # frame-wide, the padding adds 16 * 4 "normal" pixels per image; the crop drops them
    flat = np.zeros(test.masks.shape, np.float32)
    m = measure(np.zeros(len(test)), flat, test.masks, test.labels, test.class_names, box, n_boot=20)
    assert m["pixel_frame"]["pixels_per_image"] == 16 * 12


def test_image_box_rejects_mixed_sizes(tree: Path) -> None:
    _write(tree / "test" / "good" / "009.png", np.full((12, 16, 3), 30, np.uint8))
    with pytest.raises(AssertionError, match="differ in size"):
        image_box(tree, ["test/good/000.png", "test/good/009.png"], SPEC)


def test_baselines_find_a_planted_bright_defect(tree: Path) -> None:
    test = load_dataset("mvtec", tree, "test", SPEC)
    train = load_dataset("mvtec", tree, "train", SPEC)
    val = load_dataset("mvtec", tree, "validation", SPEC)
    box = image_box(tree, test.ids, SPEC)
    rows = baseline_rows(train.images, val.images, test, box, target_fpr=0.1, n_boot=50)
    assert set(rows) == {"z-score mean", "brightness", "z-score smooth max", "brightness smooth", "constant prior"}
    # the location prior knows nothing about the image: chance at image level, whatever it scores per pixel
    assert rows["constant prior"]["image_auroc"] == pytest.approx(0.5)
    for name in ("z-score mean", "brightness", "z-score smooth max"):
        r = rows[name]
        assert r["image_auroc"] >= 0.9, name
        assert r["pixel_auroc"] >= 0.9, name
        assert set(r["auroc_by_type"]) == {"cut", "hole"}
        assert r["image_auroc_ci"] is not None and r["au_pro_ci"] is not None
        assert 0.0 <= r["fpr_at_threshold"] <= 1.0
    assert rows["brightness"]["pixel_auroc"] == pytest.approx(1.0)
    assert rows["brightness"]["au_pro"] > 0.9


def test_fpr_guarantee() -> None:
    g = fpr_guarantee(199, 0.01, 25)  # k = 198: E[FPR] = 2/200
    assert not g["capped"] and g["expected_fpr"] == pytest.approx(0.01)
    assert g["band"][0] <= g["expected_fpr"] <= g["band"][1]
    assert g["binomial_95"][0] == 0.0 and g["binomial_95"][1] <= g["beta_binomial_95"][1]
    capped = fpr_guarantee(35, 0.01, 25)
    assert capped["capped"] and capped["expected_fpr"] == pytest.approx(1 / 36)


def test_table_prints_dynamic_components_and_anchors(tree: Path) -> None:
    test = load_dataset("mvtec", tree, "test", SPEC)
    box = image_box(tree, test.ids, SPEC)
    base = baseline_rows(load_dataset("mvtec", tree, "train", SPEC).images, None, test, box, n_boot=10)
    model = {**base["brightness"], "row": "vaegan seed 0", "kind": "model", "fpr_at_threshold": 0.04,
             "train_seconds": 12.0, "component_auroc": {"pixel": 0.6, "pixel_local": 0.7, "disc_local": 0.55},
             "weights": {"pixel": 1.0, "pixel_local": 0.5, "disc_local": 0.0}}
    rows = [model, {**model, "row": "vaegan seed 1", "image_auroc": 0.5}]
    text = format_table(rows, base, ordered_types(test.class_names))
    for needle in ("pixel_local=0.700", "disc_local=", "mean of 2 seed(s)", "z-score smooth max",
                   "PatchCore-style RGB iNet", "NOT measured here", "own frame", str(list(box))):
        assert needle in text, needle
    assert mean_row(rows)["component_auroc"]["pixel_local"] == pytest.approx(0.7)
    assert ordered_types(["good", "hole", "zebra", "cut"]) == ["cut", "hole", "zebra"]
