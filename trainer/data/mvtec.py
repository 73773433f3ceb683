"""MVTec AD folder layout: one object or texture category per root.

::

    ROOT/train/good/*.png                      defect-free training images
    ROOT/validation/good/*.png                 optional defect-free validation images
                                               (MVTec 3D-AD has them, MVTec AD does not)
    ROOT/test/good/*.png                       defect-free test images
    ROOT/test/<defect type>/*.png              defective test images, one folder per type
    ROOT/ground_truth/<defect type>/<stem>_mask.png   one mask per defective test image,
                                               non-zero = defect (none for good images)

Every image is decoded with the service's own decoder (:func:`~trainer.data.folder.read_image`)
and brought to the model size with :func:`~service.runtime.preprocess.to_model_size`; masks go
through :func:`~trainer.data.mask_to_spec`, so they keep the image's geometry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vaegan.service.runtime.preprocess import ImageSpec, to_model_size
from vaegan.trainer.data import DatasetError, ImageSet, interleave_by_rank, mask_to_spec
from vaegan.trainer.data.folder import IMG_EXTENSIONS, list_images, read_image

__all__ = ["GOOD", "MVTEC_SPLITS", "load_mvtec"]

GOOD = "good"  # the defect-free class: label 0 in every split
MVTEC_SPLITS = ("train", "validation", "test")

_LAYOUT = "train/good/*.png, test/<type>/*.png and ground_truth/<type>/<name>_mask.png"


def load_mvtec(root: str | Path, split: str, spec: ImageSpec, *, limit: int | None = None) -> ImageSet:
    """One split of an MVTec AD category.

    Args:
        root: the category folder (holding ``train/``, ``test/``, ``ground_truth/``).
        split: ``"train"`` (``train/good``), ``"validation"`` (``validation/good``) or
            ``"test"`` (every ``test/<type>``).
        spec: the model's image spec.
        limit: keep at most this many images. The test split is read in type-interleaved
            order (first image of each type, then the second, ...) so that a limit keeps
            every type; the other splits in file-name order.

    Returns:
        An :class:`ImageSet` whose ``ids`` are the paths relative to ``root`` (e.g.
        ``"test/cut/000.png"``). ``train`` and ``validation``: labels 0, class names
        ``["good"]``, no masks. ``test``: class names ``["good", *sorted defect types]``, the
        label is the index into them (good = 0), and masks (N, H, W) bool at the model size,
        all False for good images.

    Raises:
        DatasetError: ``root/train/good`` or the split's folder is missing, a folder holds no
            images, a defective image has no mask (naming the expected path), or a mask's size
            differs from its image's.
    """
    root = Path(root).expanduser()
    if not (root / "train" / GOOD).is_dir():
        raise DatasetError(f"{root / 'train' / GOOD}: no such folder; expected the MVTec AD layout {_LAYOUT}")
    if split not in MVTEC_SPLITS:
        raise DatasetError(f"unknown split {split!r} for mvtec; expected one of {', '.join(MVTEC_SPLITS)}")
    if split == "test":
        return _load_test(root, spec, limit)
    folder = root / split / GOOD
    if not folder.is_dir():
        raise DatasetError(
            f"{folder}: no such folder; this MVTec copy has no {split} split "
            f"(MVTec 3D-AD ships validation/good, MVTec AD does not)"
        )
    paths = _images_in(folder)[:limit]
    return ImageSet(
        images=_read_all(paths, spec),
        labels=np.zeros(len(paths), np.int64),
        masks=None,
        class_names=[GOOD],
        ids=[p.relative_to(root).as_posix() for p in paths],
    )


def _images_in(folder: Path) -> list[Path]:
    files = list_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no images found; expected {'/'.join(IMG_EXTENSIONS)} files")
    return files


def _read_all(paths: list[Path], spec: ImageSpec) -> np.ndarray:
    out = np.empty((len(paths), spec.height, spec.width, spec.channels), np.uint8)
    for i, path in enumerate(paths):
        out[i] = to_model_size(read_image(path), spec)
    return out


def _load_test(root: Path, spec: ImageSpec, limit: int | None) -> ImageSet:
    test = root / "test"
    if not test.is_dir():
        raise DatasetError(f"{test}: no such folder; expected the MVTec AD layout {_LAYOUT}")
    types = sorted(
        p.name for p in test.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name != GOOD and list_images(p)
    )
    names = [GOOD, *types]
    groups = [list_images(test / GOOD) if (test / GOOD).is_dir() else [], *(list_images(test / t) for t in types)]
    if not any(groups):
        raise DatasetError(f"{test}: no images found; expected test/good/*.png and test/<type>/*.png")
    order = interleave_by_rank(groups)[:limit]
    n = len(order)
    images = np.empty((n, spec.height, spec.width, spec.channels), np.uint8)
    masks = np.zeros((n, spec.height, spec.width), bool)
    ids = []
    for i, (g, r) in enumerate(order):
        path = groups[g][r]
        arr = read_image(path)
        images[i] = to_model_size(arr, spec)
        ids.append(path.relative_to(root).as_posix())
        if g > 0:
            masks[i] = _read_mask(root, names[g], path, arr.shape[:2], spec)
    return ImageSet(
        images=images,
        labels=np.array([g for g, _ in order], dtype=np.int64),
        masks=masks,
        class_names=names,
        ids=ids,
    )


def _read_mask(root: Path, defect: str, image: Path, shape: tuple[int, int], spec: ImageSpec) -> np.ndarray:
    """``ground_truth/<defect>/<stem>_mask.png`` (any image extension) -> bool at ``spec``."""
    folder = root / "ground_truth" / defect
    expected = folder / f"{image.stem}_mask.png"
    path = expected if expected.is_file() else next(
        (p for p in (folder / f"{image.stem}_mask{ext}" for ext in IMG_EXTENSIONS) if p.is_file()), None
    )
    if path is None:
        raise DatasetError(f"{image}: no ground-truth mask; expected {expected}")
    arr = read_image(path)
    mask = (arr != 0).any(axis=2) if arr.ndim == 3 else arr != 0  # non-zero = defect
    if mask.shape != shape:
        raise DatasetError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but {image} is {shape[1]}x{shape[0]}"
        )
    return mask_to_spec(mask, spec)
