"""Dataset readers on real files the tests write themselves (and the shared MNIST if present)."""

from __future__ import annotations

import gzip
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaegan.service.runtime.preprocess import ImageSpec, decode_image, to_model_size
from vaegan.trainer.data import (
    DatasetError,
    ImageSet,
    load_dataset,
    load_folder_pair,
    mask_to_spec,
)
from vaegan.trainer.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from vaegan.trainer.data.synthetic import MAX_COVERAGE, MIN_COVERAGE

SHARED_MNIST = Path(__file__).resolve().parents[2].parent / "shared/data/mnist"
SHARED_CIFAR = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10"


# ---------------------------------------------------------------------------------- idx


def write_idx(path: Path, arr: np.ndarray, magic: int, *, gz: bool, count: int | None = None) -> None:
    header = np.array([magic, len(arr) if count is None else count, *arr.shape[1:]], dtype=">u4")
    data = header.tobytes() + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def make_idx_root(root: Path, *, gz: bool, n_train: int = 5, n_test: int = 3) -> dict[str, tuple]:
    rng = np.random.default_rng(1)
    out = {}
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 4), dtype=np.uint8)  # non-square: rows 6, cols 4
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, IMAGES_MAGIC, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, LABELS_MAGIC, gz=gz)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    truth = make_idx_root(tmp_path, gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        data = load_dataset("mnist", tmp_path, split)
        assert data.images.shape == (len(truth[prefix][0]), 6, 4, 1)
        assert np.array_equal(data.images[..., 0], truth[prefix][0])
        assert np.array_equal(data.labels, truth[prefix][1].astype(np.int64))
        assert data.labels.dtype == np.int64 and data.masks is None
    fashion = load_dataset("fashion-mnist", tmp_path, "train", limit=2)
    assert np.array_equal(fashion.images[..., 0], truth["train"][0][:2])
    assert fashion.class_names[9] == "Ankle boot"


def test_idx_spec_goes_through_to_model_size(tmp_path: Path) -> None:
    truth = make_idx_root(tmp_path, gz=True)
    spec = ImageSpec(channels=3, height=12, width=8, resize="resize")
    data = load_dataset("mnist", tmp_path, "train", spec)
    assert data.images.shape == (5, 12, 8, 3)
    assert np.array_equal(data.images[2], to_model_size(truth["train"][0][2], spec))


def test_idx_wrong_magic_names_the_file(tmp_path: Path) -> None:
    make_idx_root(tmp_path, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    write_idx(bad, np.zeros(5, np.uint8), IMAGES_MAGIC, gz=False)  # an image magic on a label file
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte.*magic"):
        load_dataset("mnist", tmp_path, "train")


def test_idx_count_mismatch_and_truncation(tmp_path: Path) -> None:
    make_idx_root(tmp_path, gz=True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), LABELS_MAGIC, gz=True)
    with pytest.raises(DatasetError, match="t10k-labels"):
        load_dataset("mnist", tmp_path, "test")
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 6, 4)), IMAGES_MAGIC, gz=True, count=5)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: truncated"):
        load_dataset("mnist", tmp_path, "train")


def test_missing_files_and_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path, "train")
    with pytest.raises(DatasetError, match="nowhere"):
        load_dataset("cifar10", tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet", tmp_path, "train")
    with pytest.raises(DatasetError, match="unknown split"):
        load_dataset("synthetic", None, "val")
    assert issubclass(DatasetError, ValueError)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST not present")
def test_real_mnist() -> None:
    assert read_idx(SHARED_MNIST / "train-labels-idx1-ubyte.gz", LABELS_MAGIC)[0].shape == (60000,)
    assert read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC)[0].shape == (10000,)
    _, train_count = read_idx(SHARED_MNIST / "train-images-idx3-ubyte.gz", IMAGES_MAGIC, limit=1)
    assert train_count == 60000
    test = load_dataset("mnist", SHARED_MNIST, "test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(test.labels).tolist()[:2] == [980, 1135]
    train = load_dataset("mnist", SHARED_MNIST, "train", ImageSpec(1, 32, 32), limit=200)
    assert train.images.shape == (200, 32, 32, 1)
    assert train.labels[:5].tolist() == [5, 0, 4, 1, 9]


# -------------------------------------------------------------------------------- CIFAR


def cifar_images(n: int, offset: int) -> np.ndarray:
    """(n, 32, 32, 3) with a known pattern: R = row, G = column, B = image id."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    imgs = np.stack([np.broadcast_to(rows, (n, 32, 32)), np.broadcast_to(cols, (n, 32, 32)),
                     np.broadcast_to((offset + np.arange(n))[:, None, None], (n, 32, 32))], -1)
    return imgs.astype(np.uint8)  # (N, H, W, C)


def to_chw_flat(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def check_pattern(data: ImageSet, ids: list[int]) -> None:
    assert data.images.shape == (len(ids), 32, 32, 3)
    assert data.images[0, 5, 7].tolist() == [5, 7, ids[0]]  # (row 5, col 7): R=row, G=col
    assert data.images[:, 0, 0, 2].tolist() == ids


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_batches(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        batch = {b"data": to_chw_flat(cifar_images(2, 2 * k)), b"labels": [k, 9 - k], b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    for root in (tmp_path, folder):
        train = load_dataset("cifar10", root, "train")
        check_pattern(train, list(range(10)))
        assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    test = load_dataset("cifar10", tmp_path, "test", ImageSpec(1, 16, 16))
    assert test.images.shape == (2, 16, 16, 1) and test.labels.tolist() == [5, 4]
    assert load_dataset("cifar10", tmp_path, "train", limit=3).labels.tolist() == [0, 9, 1]


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_cifar_pickle_refuses_foreign_globals(tmp_path: Path) -> None:
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DatasetError, match=r"test_batch.*refusing to load"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_binary_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for k, name in enumerate([f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]):
        labels = np.array([[k], [9 - k]], np.uint8)
        (folder / name).write_bytes(np.hstack([labels, to_chw_flat(cifar_images(2, 2 * k))]).tobytes())
    train = load_dataset("cifar10", tmp_path, "train")
    check_pattern(train, list(range(10)))
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    (folder / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(DatasetError, match="test_batch.bin"):
        load_dataset("cifar10", tmp_path, "test")


def test_cifar_class_folders(tmp_path: Path) -> None:
    imgs = cifar_images(3, 0)
    for i, (cls, name) in enumerate([("cat", "a.png"), ("ship", "a.png"), ("ship", "b.png")]):
        (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(tmp_path / "train" / cls / name)
    data = load_dataset("cifar10", tmp_path, "train")
    assert data.labels.tolist() == [3, 8, 8]  # standard ids, class-interleaved order
    check_pattern(data, [0, 1, 2])
    assert data.class_names[3] == "cat"
    (tmp_path / "train" / "cats").mkdir()
    with pytest.raises(DatasetError, match="cats"):
        load_dataset("cifar10", tmp_path, "train")


def test_cifar_zip_layout(tmp_path: Path) -> None:
    imgs = cifar_images(4, 0)
    entries = [("airplane", "0000", imgs[0]), ("truck", "0000", imgs[1]), ("truck", "0001", imgs[2]),
               ("airplane", "0001", imgs[3])]
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as zf:
        for cls, idx, img in entries:
            buf = Path(tmp_path / "tmp.png")
            Image.fromarray(img).save(buf)
            zf.write(buf, f"train/{cls}/{idx}.png")
        Image.fromarray(imgs[0]).save(tmp_path / "tmp.jpg", quality=95)
        zf.write(tmp_path / "tmp.jpg", "train/frog/0000.jpg")
    data = load_dataset("cifar10", tmp_path, "train")
    assert data.labels.tolist() == [0, 6, 9, 0, 9]  # rank 0 of each class, then rank 1
    assert data.images[:, 0, 0, 2].tolist()[:3] == [0, 0, 1]
    assert data.images[0, 5, 7].tolist() == [5, 7, 0]
    assert np.abs(data.images[1].astype(int) - imgs[0]).mean() < 3  # the JPEG, lossy
    with pytest.raises(DatasetError, match=r"test\.zip"):
        load_dataset("cifar10", tmp_path, "test")


@pytest.mark.skipif(not SHARED_CIFAR.is_dir(), reason="shared CIFAR-10 not present")
def test_real_cifar_zip() -> None:
    data = load_dataset("cifar10", SHARED_CIFAR, "test", limit=20)
    assert data.images.shape == (20, 32, 32, 3)
    assert data.labels.tolist() == list(range(10)) * 2
    assert data.images.std() > 20  # real pictures, not blank decodes


# ------------------------------------------------------------------------------- folder


def save(path: Path, arr: np.ndarray, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def test_folder_flat_mixed_sizes_and_modes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = save(tmp_path / "a.png", rng.integers(0, 256, (53, 37), dtype=np.uint8))  # 37 wide, 53 tall
    save(tmp_path / "b.jpg", rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    save(tmp_path / "c.BMP", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    for spec in (ImageSpec(3, 32, 32), ImageSpec(1, 24, 40, resize="resize")):
        data = load_dataset("folder", tmp_path, "train", spec)
        assert data.images.shape == (3, spec.height, spec.width, spec.channels)
        assert data.class_names == ["normal"] and data.labels.tolist() == [0, 0, 0]
        assert np.array_equal(data.images[0], to_model_size(decode_image(grey), spec))
    assert load_dataset("folder", tmp_path, "test").images.shape == (3, 64, 64, 3)  # NATIVE default


def test_folder_nested_splits_and_errors(tmp_path: Path) -> None:
    px = np.full((10, 12, 3), 100, np.uint8)
    for split, cls, n in (("train", "good", 3), ("train", "bent", 1), ("test", "good", 1)):
        for i in range(n):
            save(tmp_path / split / cls / f"{i}.png", px)
    data = load_dataset("folder", tmp_path, "train", ImageSpec(3, 8, 8), limit=3)
    assert data.class_names == ["bent", "good"]
    assert data.labels.tolist() == [0, 1, 1]
    assert len(load_dataset("folder", tmp_path, "test", ImageSpec(3, 8, 8))) == 1
    (tmp_path / "train" / "good" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("folder", tmp_path, "train", ImageSpec(3, 8, 8))
    save(tmp_path / "test" / "loose.png", px)
    with pytest.raises(DatasetError, match="mixes loose images"):
        load_dataset("folder", tmp_path, "test", ImageSpec(3, 8, 8))


def test_load_folder_pair_with_masks(tmp_path: Path) -> None:
    img = np.full((40, 40, 3), 90, np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    mask[10:30, 20:40] = 255
    for i in range(2):
        save(tmp_path / "good" / f"{i}.png", img)
    save(tmp_path / "bad" / "x.png", img)
    save(tmp_path / "bad" / "y.jpg", img)
    save(tmp_path / "gt" / "x.png", mask)
    save(tmp_path / "gt" / "y_mask.png", mask[::-1])  # MVTec naming
    spec = ImageSpec(3, 20, 20, resize="resize")
    data = load_folder_pair(tmp_path / "good", tmp_path / "bad", tmp_path / "gt", spec)
    assert data.labels.tolist() == [0, 0, 1, 1]
    assert data.masks is not None and data.masks.shape == (4, 20, 20)
    assert not data.masks[:2].any()
    assert data.masks[2, 5:15, 10:20].all() and data.masks[2].sum() == 100
    assert data.masks[3, 5:15, 10:20].all() and data.masks[3].sum() == 100  # flipped rows land the same
    assert load_folder_pair(tmp_path / "good", tmp_path / "bad", None, spec).masks is None
    (tmp_path / "gt" / "x.png").unlink()
    with pytest.raises(DatasetError, match=r"x\.png: no mask"):
        load_folder_pair(tmp_path / "good", tmp_path / "bad", tmp_path / "gt", spec)


def test_mask_follows_center_crop_geometry() -> None:
    img = np.zeros((40, 80), np.uint8)
    img[5:25, 50:75] = 255  # off-centre, so a wrong crop would move it
    spec = ImageSpec(1, 16, 16, resize="center_crop")
    resized = to_model_size(img, spec)[..., 0] > 127
    mask = mask_to_spec(img > 0, spec)
    assert mask.any()
    assert (resized & mask).sum() / (resized | mask).sum() > 0.8


def test_image_set_subset_and_checks() -> None:
    images = np.arange(4 * 2 * 2 * 1, dtype=np.uint8).reshape(4, 2, 2, 1)
    masks = np.zeros((4, 2, 2), bool)
    masks[3] = True
    data = ImageSet(images, np.array([0, 1, 0, 1]), masks, ["normal", "defect"])
    sub = data.subset(np.array([3, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 0]
    assert np.array_equal(sub.images[0], images[3]) and sub.masks is not None and sub.masks[0].all()
    with pytest.raises(ValueError, match="labels"):
        ImageSet(images, np.array([0, 1]), None, ["a"])


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_split_apart() -> None:
    a = load_dataset("synthetic", None, "test", seed=3)
    b = load_dataset("synthetic", None, "test", seed=3)
    assert a.images.tobytes() == b.images.tobytes() and np.array_equal(a.masks, b.masks)
    c = load_dataset("synthetic", None, "test", seed=4, limit=300)
    assert not np.array_equal(a.images[:300], c.images)
    train = load_dataset("synthetic", None, "train", seed=3, limit=600)
    flat_train = {img.tobytes() for img in train.images}
    assert not flat_train & {img.tobytes() for img in a.images}
    prefix = load_dataset("synthetic", None, "test", seed=3, limit=300)
    assert prefix.images.tobytes() == a.images[:300].tobytes()  # limit keeps the first ones


def test_synthetic_labels_masks_and_coverage() -> None:
    train = load_dataset("synthetic", None, "train")
    assert train.images.shape == (4000, 32, 32, 3) and train.masks is None
    assert not train.labels.any() and train.class_names == ["normal", "defect"]
    test = load_dataset("synthetic", None, "test")
    assert test.images.shape == (1000, 32, 32, 3) and test.labels.sum() == 500
    assert test.masks is not None
    cover = test.masks.mean((1, 2))
    assert np.array_equal(cover > 0, test.labels == 1)
    assert cover[test.labels == 1].min() >= MIN_COVERAGE and cover.max() <= MAX_COVERAGE
    # defects vary in colour: some darker, some lighter than the surface around them
    luma = test.images.astype(np.float32).mean(-1)
    bad = np.flatnonzero(test.labels == 1)
    inside = np.array([luma[i][test.masks[i]].mean() for i in bad])
    outside = np.array([luma[i][~test.masks[i]].mean() for i in bad])
    assert (inside < outside - 20).mean() > 0.2 and (inside > outside + 20).mean() > 0.2


def test_synthetic_renders_at_spec_size() -> None:
    spec = ImageSpec(3, 48, 40)
    data = load_dataset("synthetic", None, "test", spec, limit=20)
    assert data.images.shape == (20, 48, 40, 3) and data.masks is not None
    assert data.masks.shape == (20, 48, 40)
    # rendered natively: a 64x64 image has detail a 32x32 upsample would not have
    big = load_dataset("synthetic", None, "train", ImageSpec(3, 64, 64), limit=8).images
    small = load_dataset("synthetic", None, "train", limit=8).images
    up = np.stack([to_model_size(s, ImageSpec(3, 64, 64)) for s in small])
    assert np.abs(np.diff(big.astype(int), axis=1)).mean() > np.abs(np.diff(up.astype(int), axis=1)).mean()
    grey = load_dataset("synthetic", None, "train", ImageSpec(1, 32, 32), limit=4)
    assert grey.images.shape == (4, 32, 32, 1)


def test_synthetic_repairs_pair_each_defective_image_with_its_clean_original() -> None:
    from vaegan.trainer.data.synthetic import DEFECT_KINDS, make_synthetic, make_synthetic_repairs

    images, labels, masks = make_synthetic("test", 40, 32, 32)
    bad, clean, truth, kinds = make_synthetic_repairs(40, 32, 32)
    assert np.array_equal(bad, images[labels == 1]) and np.array_equal(truth, masks[labels == 1])
    assert set(kinds.tolist()) <= set(range(len(DEFECT_KINDS))) and len(kinds) == 20
    changed = (bad != clean).any(-1)  # (M, H, W)
    assert bool(changed[truth].all())  # every defect pixel differs from the original
    # outside the defect only its anti-aliased rim differs: within 1 pixel of the mask
    near = np.zeros_like(truth)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(truth, dy, 1), dx, 2)
    assert not bool((changed & ~near).any())
