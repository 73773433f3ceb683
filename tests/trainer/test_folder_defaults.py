"""``--dataset folder`` defaults that follow the images: channels and size from their headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vaegan.trainer.data import load_dataset
from vaegan.trainer.data.folder import folder_defaults
from vaegan.trainer.pipeline import image_spec_for


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(path)


def test_grey_28x28_folder_trains_as_28x28x1(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(5):
        save(tmp_path / f"{i}.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    save(tmp_path / "16bit.png", (rng.integers(0, 65536, (28, 28))).astype(np.uint16))
    save(tmp_path / "palette.png", rng.integers(0, 256, (28, 28), dtype=np.uint8), "P")  # grey palette
    assert folder_defaults(tmp_path) == (1, 28)
    spec = image_spec_for("folder", None, None, tmp_path)
    assert (spec.channels, spec.height, spec.width, spec.resize) == (1, 28, 28, "letterbox")
    data = load_dataset("folder", tmp_path, "train", spec)
    assert data.images.shape == (7, 28, 28, 1)


def test_colour_and_largest_side_from_the_train_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    save(tmp_path / "train" / "good" / "a.png", rng.integers(0, 256, (40, 30), dtype=np.uint8))
    save(tmp_path / "train" / "good" / "b.jpg", rng.integers(0, 256, (36, 90, 3), dtype=np.uint8))
    save(tmp_path / "test" / "good" / "c.png", rng.integers(0, 256, (500, 500, 3), dtype=np.uint8))
    (tmp_path / "train" / "good" / "broken.png").write_bytes(b"not an image")  # skipped here
    assert folder_defaults(tmp_path) == (3, 90)  # the test split is not looked at
    spec = image_spec_for("folder", None, None, str(tmp_path))
    assert (spec.channels, spec.height) == (3, 90)
    spec = image_spec_for("folder", 64, None, tmp_path)  # given flags win, the rest follows the data
    assert (spec.channels, spec.height) == (3, 64)
    spec = image_spec_for("folder", None, 1, tmp_path)
    assert (spec.channels, spec.height) == (1, 90)


def test_sides_are_clamped_and_unknown_folders_keep_the_native_default(tmp_path: Path) -> None:
    save(tmp_path / "small" / "a.png", np.zeros((10, 12), np.uint8))
    save(tmp_path / "big" / "a.png", np.zeros((300, 400, 3), np.uint8))
    assert folder_defaults(tmp_path / "small") == (1, 28)
    assert folder_defaults(tmp_path / "big") == (3, 256)
    (tmp_path / "empty").mkdir()
    assert folder_defaults(tmp_path / "empty") is None
    spec = image_spec_for("folder", None, None, tmp_path / "empty")
    assert (spec.channels, spec.height) == (3, 64)  # NATIVE["folder"]; loading will name the problem
    assert image_spec_for("folder", None, None).height == 64  # no data root given
    assert image_spec_for("mnist", None, None, tmp_path / "small").channels == 1  # only folder probes


def test_probe_reads_at_most_the_limit(tmp_path: Path) -> None:
    for i in range(4):
        save(tmp_path / f"{i}.png", np.zeros((30, 30), np.uint8))
    save(tmp_path / "9.png", np.zeros((30, 60, 3), np.uint8))  # fifth in sorted order
    assert folder_defaults(tmp_path, limit=4) == (1, 30)
    assert folder_defaults(tmp_path) == (3, 60)
