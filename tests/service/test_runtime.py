"""The public runtime API on the tiny bundle: inputs of every kind, inpaint, repair, errors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaegan.service.runtime import InvalidInput, Runtime
from vaegan.service.runtime.preprocess import ImageSpec, prepare_batch, to_model_size


@pytest.fixture(scope="module")
def rt(runtime: Runtime) -> Runtime:
    return runtime


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_every_input_kind_scores_the_same(rt: Runtime, tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    ref = rt.score(img[None]).score[0]
    for src in (img, Image.fromarray(img), str(path), path, _png(img), img.astype(np.float32) / 255.0):
        assert rt.score([src]).score[0] == pytest.approx(ref, abs=1e-5)


def test_other_sizes_and_grey_inputs_are_resized(rt: Runtime) -> None:
    big = np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    grey = big[:, :, 0]
    res = rt.score([big, grey])
    assert res.score.shape == (2,) and res.anomaly_map.shape == (2, 32, 32)
    assert np.isfinite(res.tail_probability).all()


def test_score_result_fields(rt: Runtime) -> None:
    imgs = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    res = rt.score(imgs, with_reconstruction=True)
    assert res.is_outlier.dtype == bool
    assert np.array_equal(res.is_outlier, res.score > res.threshold)
    assert res.reconstruction is not None and res.reconstruction.shape == (3, 32, 32, 3)
    assert np.array_equal(res.reconstruction, rt.reconstruct(imgs))
    forced = rt.score(imgs, threshold=-1e9)
    assert forced.is_outlier.all() and forced.threshold == -1e9
    only_pixel = rt.score(imgs, weights={**{k: 0.0 for k in rt.bundle.calibration.components}, "pixel": 1.0})
    stats = rt.bundle.calibration.stats["pixel"]
    assert only_pixel.score == pytest.approx((res.components["pixel"] - stats[0]) / stats[1])


@pytest.mark.parametrize(
    "bad,match",
    [
        ([], "empty"),
        ([b"not an image"], "image 0: cannot decode"),
        ([np.full((8, 8, 3), np.nan, np.float32)], "image 0: contains NaN"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 2), np.uint8)], "image 1: expected"),
    ],
)
def test_bad_inputs_name_the_image(rt: Runtime, bad: list, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        rt.score(bad)


def test_inpaint_keeps_known_pixels_and_fills_the_hole(rt: Runtime) -> None:
    from vaegan.trainer.data import load_dataset

    imgs = load_dataset("synthetic", None, "test", None, limit=8).images[::2]  # normal ones
    masks = np.zeros(imgs.shape[:3], np.uint8)
    masks[:, 10:22, 8:20] = 1
    holed = imgs.copy()
    holed[masks.astype(bool)] = 0  # the hole's content must not matter
    out = rt.inpaint(list(holed), list(masks))
    for o, h, m, orig in zip(out, holed, masks.astype(bool), imgs, strict=True):
        assert o.shape == h.shape
        assert np.array_equal(o[~m], h[~m])  # known pixels untouched
        err_fill = np.abs(o[m].astype(int) - orig[m]).mean()
        err_zero = np.abs(h[m].astype(int) - orig[m]).mean()
        assert err_fill < 0.5 * err_zero  # far closer to the truth than the black hole
    # any input size comes back at that size
    odd = rt.inpaint([np.zeros((45, 70, 3), np.uint8)], [np.ones((45, 70), np.uint8)])
    assert odd[0].shape == (45, 70, 3)
    with pytest.raises(InvalidInput, match="mask 0: mask shape"):
        rt.inpaint([imgs[0]], [np.ones((5, 5), np.uint8)])


def test_repair_masks_the_defect(rt: Runtime) -> None:
    from vaegan.trainer.data import load_dataset

    test = load_dataset("synthetic", None, "test", None, limit=40)
    bad = test.labels == 1
    fixed, masks = rt.repair(test.images[bad])
    assert len(fixed) == bad.sum()
    gt = test.masks[bad]
    hit = np.mean([(m & g).sum() / max(1, g.sum()) for m, g in zip(masks, gt, strict=True)])
    assert hit > 0.3  # the repair mask covers a good share of the true defects
    before = rt.score(test.images[bad]).components["pixel"].mean()
    after = rt.score(np.stack(fixed)).components["pixel"].mean()
    assert after < before


def test_preprocess_policies() -> None:
    wide = np.zeros((20, 40), np.uint8)
    wide[:, 10:30] = 255  # a bright centre
    crop = to_model_size(wide, ImageSpec(1, 10, 10, resize="center_crop"))
    stretch = to_model_size(wide, ImageSpec(1, 10, 10, resize="resize"))
    assert crop.shape == stretch.shape == (10, 10, 1)
    assert crop.mean() > 200  # the crop keeps the bright centre only
    assert 100 < stretch.mean() < 160  # the stretch keeps both dark sides
    rgb = prepare_batch([np.zeros((5, 5, 1), np.uint8)], ImageSpec(3, 5, 5))
    assert rgb.shape == (1, 5, 5, 3)
