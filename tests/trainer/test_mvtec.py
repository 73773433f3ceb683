"""The MVTec AD reader on a tiny tree in the MVTec layout, written by the test itself."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaegan.service.runtime.preprocess import RESIZE_POLICIES, ImageSpec
from vaegan.trainer.data import DATASETS, NATIVE, SPLITS, DatasetError, load_dataset
from vaegan.trainer.data.mvtec import load_mvtec

SPEC = ImageSpec(channels=3, height=8, width=8)
# defect boxes (top, left, bottom, right) in source pixels, aligned so that the 2x and 4x
# downscales keep them sharp: the image's bright box and the mask land on the same pixels
BOXES = {
    "test/crack/000.png": (4, 8, 8, 12),
    "test/crack/001.png": (4, 12, 8, 16),  # 32 x 16 (W x H)
    "test/scratch/000.png": (0, 0, 4, 4),
}
SIZES = {"test/crack/001.png": (16, 32)}  # (H, W); every other image is 16 x 16


def write_image(path: Path, size: tuple[int, int], box: tuple[int, int, int, int] | None, seed: int) -> None:
    """A dark textured RGB image, with a white box where the defect is."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (*size, 3), dtype=np.uint8)
    if box is not None:
        t, left, b, r = box
        img[t:b, left:r] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def write_mask(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    mask = np.zeros(size, np.uint8)
    t, left, b, r = box
    mask[t:b, left:r] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def make_mvtec(root: Path) -> Path:
    """2 train, 1 validation, 2 good + 2 crack + 1 scratch test images with their masks."""
    rels = ["train/good/000.png", "train/good/001.png", "validation/good/000.png",
            "test/good/000.png", "test/good/001.png", *BOXES]
    for seed, rel in enumerate(rels):
        size = SIZES.get(rel, (16, 16))
        write_image(root / rel, size, BOXES.get(rel), seed)
        if rel in BOXES:
            kind, name = rel.split("/")[1:]
            write_mask(root / "ground_truth" / kind / name.replace(".png", "_mask.png"), size, BOXES[rel])
    (root / "readme.txt").write_text("not an image")
    (root / "test" / ".hidden").mkdir()
    write_image(root / "test" / ".hidden" / "000.png", (16, 16), None, 99)
    return root


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    return make_mvtec(tmp_path / "tire")


def test_registered() -> None:
    assert "mvtec" in DATASETS and NATIVE["mvtec"] == (3, 256) and "validation" in SPLITS


def test_train_and_validation_splits(mvtec_root: Path) -> None:
    train = load_dataset("mvtec", mvtec_root, "train", SPEC)
    assert train.images.shape == (2, 8, 8, 3) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [0, 0] and train.class_names == ["good"] and train.masks is None
    assert train.ids == ["train/good/000.png", "train/good/001.png"]
    val = load_dataset("mvtec", mvtec_root, "validation", SPEC)
    assert len(val) == 1 and val.ids == ["validation/good/000.png"] and val.labels.tolist() == [0]
    assert len(load_dataset("mvtec", mvtec_root, "train", SPEC, limit=1)) == 1


def test_test_split_labels_ids_and_masks(mvtec_root: Path) -> None:
    test = load_dataset("mvtec", mvtec_root, "test", SPEC)
    assert test.class_names == ["good", "crack", "scratch"]
    # type-interleaved order: the first image of each type, then the second ...
    assert test.ids == ["test/good/000.png", "test/crack/000.png", "test/scratch/000.png",
                        "test/good/001.png", "test/crack/001.png"]
    assert test.labels.tolist() == [0, 1, 2, 0, 1]
    for image_id, label in zip(test.ids, test.labels, strict=True):
        assert test.class_names[label] == image_id.split("/")[1]
    assert test.masks is not None and test.masks.shape == (5, 8, 8)
    assert not test.masks[test.labels == 0].any()
    by_id = dict(zip(test.ids, test.masks, strict=True))
    # 16x16 -> 8x8: the box rows 4..7, cols 8..11 become rows 2..3, cols 4..5
    assert np.argwhere(by_id["test/crack/000.png"]).tolist() == [[2, 4], [2, 5], [3, 4], [3, 5]]
    assert by_id["test/scratch/000.png"].sum() == 4
    # the limit keeps the types balanced
    assert load_dataset("mvtec", mvtec_root, "test", SPEC, limit=3).labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("policy", RESIZE_POLICIES)
def test_masks_follow_the_image_geometry(mvtec_root: Path, policy: str) -> None:
    spec = ImageSpec(channels=3, height=8, width=8, resize=policy)
    test = load_dataset("mvtec", mvtec_root, "test", spec)
    bright = test.images.astype(int).mean(axis=3) > 127
    assert np.array_equal(test.masks, bright)  # each mask sits on its image's white box
    wide = test.masks[test.ids.index("test/crack/001.png")]  # the 32 x 16 image
    assert wide.any()


def test_native_size_without_spec(mvtec_root: Path) -> None:
    test = load_dataset("mvtec", mvtec_root, "test", limit=2)
    assert test.images.shape == (2, 256, 256, 3) and test.masks.shape == (2, 256, 256)
    assert test.masks[1].sum() == 4 * 32 * 32  # a 4x4 box of 16x16 scaled 16 times


def test_errors_name_the_missing_path(mvtec_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"train/good: no such folder; expected the MVTec AD layout"):
        load_mvtec(tmp_path, "train", SPEC)
    shutil.rmtree(mvtec_root / "validation")
    with pytest.raises(DatasetError, match=r"tire/validation/good: no such folder"):
        load_dataset("mvtec", mvtec_root, "validation", SPEC)
    (mvtec_root / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"no ground-truth mask; expected .*ground_truth/scratch/000_mask\.png"):
        load_dataset("mvtec", mvtec_root, "test", SPEC)
    write_mask(mvtec_root / "ground_truth" / "scratch" / "000_mask.png", (16, 12), (0, 0, 4, 4))
    with pytest.raises(DatasetError, match=r"000_mask\.png: mask is 12x16 but .*000\.png is 16x16"):
        load_dataset("mvtec", mvtec_root, "test", SPEC)


@pytest.mark.parametrize("name", ["synthetic", "mnist", "fashion-mnist", "cifar10", "folder"])
def test_validation_split_only_for_mvtec(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=f"{name} has no validation split"):
        load_dataset(name, tmp_path, "validation")


def test_cli_loads_mvtec_for_evaluate_and_calibrate(mvtec_root: Path) -> None:
    from vaegan import cli
    from vaegan.trainer import data as trainer_data

    assert cli.DATASETS == trainer_data.DATASETS and cli.SPLITS == trainer_data.SPLITS
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "--model", "m", "--out", "o", "--dataset", "mvtec",
                              "--data-root", str(mvtec_root)])
    assert args.split == "test"
    data = cli._load_eval_data(args, SPEC, pair=True)  # no --normal-class needed
    assert data.labels.tolist() == [0, 1, 2, 0, 1] and data.masks is not None
    assert data.class_names == ["good", "crack", "scratch"]
    # calibration keeps the good images only
    cal_args = parser.parse_args(["calibrate", "--model", "m", "--dataset", "mvtec", "--data-root",
                                  str(mvtec_root), "--split", "test"])
    normals = cli._load_eval_data(cal_args, SPEC, pair=False)
    assert normals.ids == ["test/good/000.png", "test/good/001.png"] and normals.labels.tolist() == [0, 0]
    cal_args.split = "validation"
    assert cli._load_eval_data(cal_args, SPEC, pair=False).ids == ["validation/good/000.png"]
    args.normal_class = 1
    with pytest.raises(cli.CliError, match="--normal-class does not apply"):
        cli._load_eval_data(args, SPEC, pair=True)
