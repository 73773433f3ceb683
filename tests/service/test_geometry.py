"""Image geometry: the letterbox policy, model/input regions, maps and masks back to the input,
and repair/inpaint that touch only what the model saw (real runtime on the tiny bundle)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaegan.service.runtime import Runtime, load_bundle
from vaegan.service.runtime import preprocess as pp
from vaegan.service.runtime.inpaint import mask_to_input, mask_to_model
from vaegan.service.runtime.preprocess import (
    ImageSpec,
    input_region,
    map_to_input,
    model_region,
    prepare_inputs,
    to_model_size,
)
from vaegan.trainer.data import mask_to_spec

LETTERBOX = ImageSpec(1, 16, 16)
CROP = ImageSpec(1, 16, 16, resize="center_crop")
STRETCH = ImageSpec(1, 16, 16, resize="resize")


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 (h, w): smooth-ish mid-grey texture, no dark pixels."""
    rng = np.random.default_rng(seed)
    return rng.integers(110, 200, (h, w), dtype=np.uint8)


@pytest.fixture(scope="module")
def rt_crop(tiny_bundle: Path) -> Runtime:
    """The tiny bundle's graphs served with the center_crop policy (an older bundle's)."""
    bundle = load_bundle(tiny_bundle)
    spec = dataclasses.replace(bundle.spec, resize="center_crop")
    return Runtime(dataclasses.replace(bundle, spec=spec), providers="cpu")


def test_letterbox_is_the_new_default_and_old_manifests_keep_center_crop() -> None:
    assert ImageSpec(3, 32, 32).resize == "letterbox"
    old = ImageSpec(3, 32, 32).to_dict()
    del old["resize"]
    assert ImageSpec.from_dict(old).resize == "center_crop"
    assert ImageSpec.from_dict(ImageSpec(3, 32, 32).to_dict()).resize == "letterbox"
    with pytest.raises(ValueError, match="resize must be one of"):
        ImageSpec(3, 32, 32, resize="pad")


def test_regions_of_each_policy() -> None:
    # a wide 32x64 input into a 16x16 frame
    assert model_region(32, 64, LETTERBOX) == (4, 0, 8, 16)
    assert input_region(32, 64, LETTERBOX) == (0, 0, 32, 64)
    assert model_region(32, 64, CROP) == (0, 0, 16, 16)
    assert input_region(32, 64, CROP) == (0, 16, 32, 32)
    assert model_region(32, 64, STRETCH) == (0, 0, 16, 16)
    assert input_region(32, 64, STRETCH) == (0, 0, 32, 64)
    # tall, and smaller than the frame
    assert model_region(10, 5, LETTERBOX) == (0, 4, 16, 8)
    assert input_region(64, 32, CROP) == (16, 0, 32, 32)
    for spec in (LETTERBOX, CROP, STRETCH):  # an input at model size maps onto itself
        assert model_region(16, 16, spec) == input_region(16, 16, spec) == (0, 0, 16, 16)


def test_letterbox_keeps_the_whole_image_and_pads_black() -> None:
    white = np.full((32, 64), 255, np.uint8)
    boxed = to_model_size(white, LETTERBOX)[:, :, 0]
    top, left, h, w = model_region(32, 64, LETTERBOX)
    assert (boxed[top : top + h, left : left + w] == 255).all()
    assert (boxed[:top] == 0).all() and (boxed[top + h :] == 0).all()
    rgb = to_model_size(np.full((20, 10, 3), 200, np.uint8), ImageSpec(3, 8, 8))
    assert rgb.shape == (8, 8, 3) and (rgb[:, :2] == 0).all() and (rgb[:, 2:6] == 200).all()


def test_edge_defect_is_seen_with_letterbox_and_lost_with_center_crop() -> None:
    img = texture(64, 32)  # tall: center_crop cuts the top and bottom quarters away
    img[:10, 8:24] = 0  # a dark defect at the top edge
    boxed = to_model_size(img, LETTERBOX)[:, :, 0]
    cropped = to_model_size(img, CROP)[:, :, 0]
    top, left, _, _ = model_region(64, 32, LETTERBOX)
    assert boxed[top : top + 2, left + 2 : left + 6].max() < 60  # the defect, in the model's view
    assert cropped.min() > 100  # center_crop never shows it


def test_marked_map_pixel_lands_on_its_input_pixel() -> None:
    amap = np.zeros((16, 16), np.float32)
    amap[4 + 2, 5] = 1.0  # letterbox of 32x64: model rows 4..11 show input rows 0..31 (x4)
    out = map_to_input(amap, 32, 64, LETTERBOX)
    assert out.shape == (32, 64) and out.dtype == np.float32
    r, c = np.unravel_index(out.argmax(), out.shape)
    assert 8 <= r < 12 and 20 <= c < 24  # inside the 4x4 block of input pixels it covers
    # center_crop: the map fills the centre box, the unseen border is 0
    amap = np.zeros((16, 16), np.float32)
    amap[3, 0] = 1.0
    out = map_to_input(amap, 32, 64, CROP)
    r, c = np.unravel_index(out.argmax(), out.shape)
    assert 6 <= r < 8 and 16 <= c < 18
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    full = map_to_input(np.ones((16, 16), np.float32), 32, 64, CROP)
    assert (full[:, 16:48] == 1).all()


def test_mask_to_spec_follows_the_letterboxed_image() -> None:
    img = np.zeros((40, 80), np.uint8)
    img[5:25, 50:75] = 255  # off-centre
    resized = to_model_size(img, LETTERBOX)[..., 0] > 127
    mask = mask_to_spec(img > 0, LETTERBOX)
    assert mask.any()
    assert (resized & mask).sum() / (resized | mask).sum() > 0.8
    top, left, h, w = model_region(40, 80, LETTERBOX)
    pad = np.ones((16, 16), bool)
    pad[top : top + h, left : left + w] = False
    assert not mask_to_spec(np.ones((40, 80), bool), LETTERBOX)[pad].any()  # padding is False
    assert mask_to_spec(np.ones((40, 80), bool), LETTERBOX)[~pad].all()


@pytest.mark.parametrize("spec", [LETTERBOX, CROP, STRETCH], ids=lambda s: s.resize)
def test_masks_round_trip_through_the_model_frame(spec: ImageSpec) -> None:
    mask = np.zeros((30, 50), bool)
    mask[12:20, 20:30] = True  # central, so every policy sees it
    small = mask_to_model(mask, spec)
    assert small.any()
    back = mask_to_input(small, 30, 50, spec)
    assert back[mask].all()  # any covered pixel stays covered
    t, left, h, w = input_region(30, 50, spec)
    outside = np.ones((30, 50), bool)
    outside[t : t + h, left : left + w] = False
    assert not mask_to_input(np.ones((16, 16), bool), 30, 50, spec)[outside].any()


def test_prepare_inputs_reports_sizes_and_conversions(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(pp, "_warned", set())  # a fresh process as far as the warning goes
    spec = ImageSpec(3, 16, 16)
    batch = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    fast = prepare_inputs(batch, spec)
    assert np.shares_memory(fast.batch, batch) or np.array_equal(fast.batch, batch)
    assert fast.sizes.tolist() == [[16, 16], [16, 16]] and fast.conversions == ["", ""]
    with caplog.at_level(logging.WARNING, logger="vaegan.service.runtime.preprocess"):
        p = prepare_inputs([np.zeros((20, 30), np.uint8), batch[0], np.zeros((5, 7), np.uint8)], spec)
        prepare_inputs([np.zeros((20, 30, 3), np.uint8)], ImageSpec(1, 16, 16))
    assert p.sizes.tolist() == [[20, 30], [16, 16], [5, 7]]
    assert p.conversions == ["grey->rgb", "", "grey->rgb"]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2  # once per direction
    assert "image 0" in warned[0] and "grey->rgb" in warned[0] and "rgb->grey" in warned[1]


def test_score_result_regions_and_maps_at_input_size(runtime: Runtime) -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), texture(24, 60), rng.integers(0, 256, (50, 20, 3), dtype=np.uint8)]
    res = runtime.score(images)
    assert res.regions.dtype == np.int64 and res.regions.shape == (3, 4)
    assert res.regions.tolist() == [[0, 0, 32, 32], [0, 0, 24, 60], [0, 0, 50, 20]]  # letterbox
    assert res.input_sizes.tolist() == [[32, 32], [24, 60], [50, 20]]
    assert res.conversions == ["", "grey->rgb", ""]
    for i, img in enumerate(images):
        m = res.map_at_input(i)
        assert m.shape == img.shape[:2] and m.dtype == np.float32
        np.testing.assert_allclose(m, map_to_input(res.anomaly_map[i], *img.shape[:2], runtime.spec))
    np.testing.assert_array_equal(res.map_at_input(0), res.anomaly_map[0])


def test_letterboxed_edge_defect_shows_in_the_map_at_input(runtime: Runtime, rt_crop: Runtime) -> None:
    from vaegan.trainer.data import load_dataset

    normal = load_dataset("synthetic", None, "test", None, limit=8)
    tile = normal.images[normal.labels == 0][0]  # 32x32 RGB, a normal texture
    wide = np.concatenate([tile, tile[:, ::-1]], axis=1)  # 32x64
    bad = wide.copy()
    bad[:8, 52:64] = 0  # a dark box at the top right edge
    assert runtime.spec.resize == "letterbox"
    diff = runtime.score([bad]).map_at_input(0) - runtime.score([wide]).map_at_input(0)
    inside = diff[:8, 52:64].mean()
    assert inside > 0.1 and inside > 5 * np.abs(diff[16:, :40]).mean()
    assert (rt_crop.score([bad]).map_at_input(0)[:, 48:] == 0).all()  # center_crop: never scored


def test_center_crop_results_name_the_centre_box(rt_crop: Runtime) -> None:
    res = rt_crop.score([texture(32, 64)])
    assert res.regions.tolist() == [[0, 16, 32, 32]]
    m = res.map_at_input(0)
    assert (m[:, :16] == 0).all() and (m[:, 48:] == 0).all() and m[:, 16:48].max() > 0


def test_repair_with_center_crop_never_touches_the_unseen_border(rt_crop: Runtime) -> None:
    rng = np.random.default_rng(4)
    noisy = [rng.integers(0, 256, (32, 64, 3), dtype=np.uint8), rng.integers(0, 256, (48, 20, 3), dtype=np.uint8)]
    fixed, masks = rt_crop.repair(noisy)
    for img, out, mask in zip(noisy, fixed, masks, strict=True):
        t, left, h, w = input_region(*img.shape[:2], rt_crop.spec)
        seen = np.zeros(img.shape[:2], bool)
        seen[t : t + h, left : left + w] = True
        assert mask.shape == img.shape[:2]
        assert mask[seen].mean() > 0.2  # noise is anomalous: a real repair happened
        assert not mask[~seen].any()
        np.testing.assert_array_equal(out[~seen], img[~seen])  # never outside the scored box
        np.testing.assert_array_equal(out[~mask], img[~mask])
        assert (out[mask] != img[mask]).any()


def test_letterbox_repair_keeps_unmasked_pixels(runtime: Runtime) -> None:
    img = np.random.default_rng(5).integers(0, 256, (24, 64, 3), dtype=np.uint8)
    fixed, masks = runtime.repair([img])
    assert fixed[0].shape == img.shape and masks[0].any()
    np.testing.assert_array_equal(fixed[0][~masks[0]], img[~masks[0]])


def test_inpaint_fills_where_the_model_saw_the_mask(rt_crop: Runtime, runtime: Runtime) -> None:
    img = np.dstack([texture(32, 64)] * 3)
    mask = np.zeros((32, 64), np.uint8)
    mask[10:20, 2:10] = 1  # in the border center_crop cuts away
    mask[10:20, 28:36] = 1  # in the centre box
    out = rt_crop.inpaint([img], [mask])[0]
    np.testing.assert_array_equal(out[:, :16], img[:, :16])  # unseen: unchanged
    assert (out[10:20, 28:36] != img[10:20, 28:36]).any()
    boxed = runtime.inpaint([img], [mask])[0]  # letterbox sees the whole input
    assert (boxed[10:20, 2:10] != img[10:20, 2:10]).any()
    np.testing.assert_array_equal(boxed[mask == 0], img[mask == 0])


def test_grey_input_comes_back_grey(runtime: Runtime, tmp_path: Path) -> None:
    grey = texture(30, 50)
    path = tmp_path / "grey.png"
    Image.fromarray(grey).save(path)
    mask = np.zeros((30, 50), np.uint8)
    mask[8:20, 15:35] = 1
    out = runtime.inpaint([path], [mask])[0]
    assert out.shape == (30, 50, 3)  # the model's channel count
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # no colour
    np.testing.assert_array_equal(out[mask == 0, 0], grey[mask == 0])
    fixed, _ = runtime.repair([grey])
    assert (fixed[0][..., 0] == fixed[0][..., 2]).all()
