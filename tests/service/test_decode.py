"""decode_image on real files written with Pillow: bit depths, alpha, palettes, CMYK, EXIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaegan.service.runtime import InvalidInput
from vaegan.service.runtime.preprocess import decode_image, is_grey_image

ORIENTATION = 0x0112


def save(im: Image.Image, path: Path, **kw: object) -> Path:
    im.save(path, **kw)
    return path


def ramp16() -> np.ndarray:
    """uint16 (4, 512): every value class of a 16-bit ramp, mid-grey included."""
    row = np.linspace(0, 65535, 512).round().astype(np.uint16)
    return np.stack([row, row[::-1], np.full(512, 32768, np.uint16), np.full(512, 257 * 3, np.uint16)])


def test_16bit_png_is_scaled_not_binarized(tmp_path: Path) -> None:
    v = ramp16()
    path = save(Image.fromarray(v), tmp_path / "ramp16.png")
    with Image.open(path) as im:
        assert im.mode == "I;16"  # a real 16-bit PNG
    got = decode_image(path)
    assert got.dtype == np.uint8 and got.shape == v.shape
    np.testing.assert_array_equal(got, np.rint(v / 257.0).astype(np.uint8))
    assert got[2, 0] == 128 and got[3, 0] == 3  # mid-grey stays mid-grey, dark stays dark
    assert len(np.unique(got[0])) > 200  # a ramp, not two levels
    np.testing.assert_array_equal(decode_image(path.read_bytes()), got)
    np.testing.assert_array_equal(decode_image(v), got)  # uint16 arrays follow the same rule


def test_16bit_big_endian_and_32bit_int_tiff(tmp_path: Path) -> None:
    v = ramp16()
    big = Image.frombytes("I;16B", (v.shape[1], v.shape[0]), v.astype(">u2").tobytes())
    want = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(big), want)
    i32 = np.concatenate([v.astype(np.int32), np.array([[-5] * 256 + [70000] * 256], np.int32)])
    path = save(Image.fromarray(i32), tmp_path / "int32.tif")
    with Image.open(path) as im:
        assert im.mode == "I"
    got = decode_image(path)
    np.testing.assert_array_equal(got[:4], want)  # mode I: 16-bit intensities
    assert got[4, 0] == 0 and got[4, -1] == 255  # clipped to 0..65535 first


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_unit_or_byte_range(tmp_path: Path, scale: float) -> None:
    v = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    path = save(Image.fromarray(v * np.float32(scale)), tmp_path / "f.tif")
    with Image.open(path) as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(decode_image(path), np.rint(v * 255.0).astype(np.uint8))


def test_bilevel_png(tmp_path: Path) -> None:
    bits = np.zeros((8, 8), bool)
    bits[2:5, 3:7] = True
    path = save(Image.fromarray(bits), tmp_path / "bits.png")
    np.testing.assert_array_equal(decode_image(path), bits.astype(np.uint8) * 255)


def test_palette_png_colour_grey_and_transparent(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.choice(np.array([[255, 0, 0], [0, 128, 255], [10, 200, 30], [90, 90, 90]], np.uint8), (12, 10))
    pal = Image.fromarray(rgb).quantize(colors=4)
    path = save(pal, tmp_path / "colour.png")
    with Image.open(path) as im:
        assert im.mode == "P" and not is_grey_image(im)
    np.testing.assert_array_equal(decode_image(path), rgb)

    grey = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    path = save(Image.fromarray(grey).convert("P"), tmp_path / "grey.png")  # a palette of greys
    with Image.open(path) as im:
        assert im.mode == "P" and is_grey_image(im)
    np.testing.assert_array_equal(decode_image(path), grey)  # (H, W): grey, not RGB

    pal.info["transparency"] = 1  # index 1 is transparent: composited on black
    path = save(pal, tmp_path / "transparent.png", transparency=1)
    with Image.open(path) as im:
        index = np.asarray(im)
        assert im.mode == "P" and "transparency" in im.info
    got = decode_image(path)
    assert (index == 1).any() and (got[index == 1] == 0).all()
    np.testing.assert_array_equal(got[index != 1], rgb[index != 1])


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lum = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    alpha = rng.integers(0, 256, (9, 7), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    want = np.rint(lum.astype(np.float64) * alpha / 255.0).astype(np.uint8)
    path = save(Image.fromarray(np.dstack([lum, alpha])), tmp_path / "la.png")
    with Image.open(path) as im:
        assert im.mode == "LA"
    got = decode_image(path)
    assert got.shape == (9, 7)  # grey stays grey
    np.testing.assert_allclose(got, want, atol=1)
    assert got[0, 0] == 0 and got[0, 1] == lum[0, 1]

    rgb = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    path = save(Image.fromarray(np.dstack([rgb, alpha])), tmp_path / "rgba.png")
    want = np.rint(rgb.astype(np.float64) * alpha[:, :, None] / 255.0)
    np.testing.assert_allclose(decode_image(path), want, atol=1)
    np.testing.assert_allclose(decode_image(np.dstack([rgb, alpha])), want, atol=1)  # arrays alike
    pa = Image.fromarray(np.dstack([rgb, alpha])).convert("PA")
    np.testing.assert_array_equal(decode_image(pa)[alpha == 0], 0)


def test_cmyk_tiff_and_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8] = (200, 30, 60)
    rgb[:, 8:16] = (20, 180, 90)
    rgb[:, 16:] = (250, 250, 250)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    path = save(cmyk, tmp_path / "cmyk.tif")
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    np.testing.assert_array_equal(decode_image(path), rgb)
    path = save(cmyk, tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    got = decode_image(path)
    assert got.shape == rgb.shape
    assert np.abs(got.astype(int) - rgb)[2:-2, 2:-2].mean() < 6  # lossy, but the same colours


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_other_colour_modes_become_rgb(mode: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = decode_image(Image.fromarray(rgb).convert(mode))
    assert got.shape == rgb.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - rgb).max() <= 20  # Pillow's own colour conversions


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, turn: int) -> None:
    stored = np.zeros((32, 48, 3), np.uint8)
    stored[:8, :16] = (255, 255, 255)  # a bright block in the stored top-left corner
    stored[16:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        assert im.getexif()[ORIENTATION] == orientation
        raw = np.asarray(im)  # the pixels as stored, not turned
    want = np.rot90(raw, k=turn)  # as a viewer shows it (k < 0: clockwise)
    for src in (path, str(path), path.read_bytes()):
        np.testing.assert_array_equal(decode_image(src), want)
    with Image.open(path) as im:
        np.testing.assert_array_equal(decode_image(im), want)  # PIL images too


def test_nan_float_image_is_invalid() -> None:
    bad = np.full((4, 4), np.nan, np.float32)
    with pytest.raises(InvalidInput, match="NaN"):
        decode_image(Image.fromarray(bad), "image 2")
    with pytest.raises(InvalidInput, match="image 2: contains NaN"):
        decode_image(bad, "image 2")
