"""Datasets for training and evaluation, as uint8 arrays preprocessed exactly as serving does.

Every reader returns an :class:`ImageSet`. With an :class:`~service.runtime.preprocess.ImageSpec`
each image goes through :func:`~service.runtime.preprocess.to_model_size`, the function the
service applies to every request, so training never sees pixels the service would not.

The readers live in their own modules (``idx``, ``cifar``, ``folder``, ``mvtec``,
``synthetic``) and are imported on first use; importing this package costs numpy and Pillow only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vaegan.service.runtime.preprocess import ImageSpec, fit_to_spec, to_model_size

__all__ = [
    "DATASETS",
    "NATIVE",
    "SPLITS",
    "DatasetError",
    "ImageSet",
    "images_to_spec",
    "interleave_by_rank",
    "load_dataset",
    "load_folder_pair",
    "mask_to_spec",
    "native_spec",
]

logger = logging.getLogger(__name__)

DATASETS = ("synthetic", "mnist", "fashion-mnist", "cifar10", "folder", "mvtec")
SPLITS = ("train", "validation", "test")
# the datasets that ship a "validation" split (MVTec's validation/good); the others have none
_WITH_VALIDATION = ("mvtec",)
# (channels, image size) a dataset has natively; the default model size for it
NATIVE = {
    "synthetic": (3, 32),
    "mnist": (1, 28),
    "fashion-mnist": (1, 28),
    "cifar10": (3, 32),
    "folder": (3, 64),
    "mvtec": (3, 256),
}


class DatasetError(ValueError):
    """A dataset is missing, incomplete or malformed; the message names the path."""


@dataclass
class ImageSet:
    """Images with their labels and, where known, ground-truth defect masks."""

    images: np.ndarray  # uint8 (N, H, W, C), all at one size
    labels: np.ndarray  # int64 (N,); class id, or 0 normal / 1 anomalous
    masks: np.ndarray | None  # bool (N, H, W), True = defect; or None
    class_names: list[str]
    # one stable id per image (file path relative to the data root, or "<split>:<index>");
    # None: "<index>" ids are made. Splits and calibration parts are checked on these.
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        n, h, w, _ = self.images.shape
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
        if self.masks is not None:
            self.masks = np.asarray(self.masks, dtype=bool)
            if self.masks.shape != (n, h, w):
                raise ValueError(f"masks must have shape {(n, h, w)}, got {self.masks.shape}")
        self.ids = [str(i) for i in range(n)] if self.ids is None else [str(i) for i in self.ids]
        if len(self.ids) != n:
            raise ValueError(f"ids must have {n} entries, got {len(self.ids)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> ImageSet:
        """The images at ``idx`` (indices or a boolean mask), with their labels and masks."""
        idx = np.asarray(idx)
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            masks=None if self.masks is None else self.masks[idx],
            class_names=list(self.class_names),
            ids=np.asarray(self.ids, dtype=object)[idx].tolist(),
        )


def native_spec(name: str) -> ImageSpec:
    """The spec matching a dataset's native channels and size (see :data:`NATIVE`)."""
    channels, size = NATIVE[name]
    return ImageSpec(channels=channels, height=size, width=size)


def images_to_spec(images: Sequence[np.ndarray] | np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 images (each (H, W) or (H, W, C), any size) -> uint8 (N, H, W, C) at ``spec``.

    Each image goes through :func:`to_model_size`, exactly as the service preprocesses it.
    """
    out = np.empty((len(images), spec.height, spec.width, spec.channels), np.uint8)
    for i, img in enumerate(images):
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]  # (H, W): to_model_size takes grey images without a channel axis
        out[i] = to_model_size(img, spec)
    return out


def mask_to_spec(mask: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """bool (h, w) -> bool (spec.height, spec.width), nearest neighbour, with exactly the
    geometry (letterbox, stretch or centre crop) that :func:`to_model_size` gives the image
    (:func:`~service.runtime.preprocess.fit_to_spec`); letterbox padding is False."""
    if mask.shape == (spec.height, spec.width):
        return mask.astype(bool, copy=True)
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(fit_to_spec(im, spec, Image.Resampling.NEAREST)) > 127


def interleave_by_rank(groups: Sequence[Sequence[object]]) -> list[tuple[int, int]]:
    """(group, rank) pairs ordered rank first: the first item of every group, then the second...

    Per-class layouts use this order so that ``limit`` keeps the classes balanced.
    """
    longest = max((len(g) for g in groups), default=0)
    return [(g, r) for r in range(longest) for g in range(len(groups)) if r < len(groups[g])]


def load_dataset(
    name: str,
    root: str | Path | None,
    split: str,
    spec: ImageSpec | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
) -> ImageSet:
    """Read one split of a dataset.

    Args:
        name: one of :data:`DATASETS`.
        root: where the files are (ignored for ``synthetic``).
        split: ``"train"``, ``"test"``, or ``"validation"`` (``mvtec`` only).
        spec: the model's image spec; ``None`` keeps the native size and channels
            (``folder`` and ``mvtec`` then use :data:`NATIVE`'s default, 64x64 and 256x256 RGB).
        seed: seeds the ``synthetic`` generator; the other datasets ignore it.
        limit: keep at most this many images, the first ones in the dataset's order.

    Raises:
        DatasetError: unknown dataset or split, or missing / malformed files.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if split == "validation" and name not in _WITH_VALIDATION:
        raise DatasetError(
            f"{name} has no validation split (only {', '.join(_WITH_VALIDATION)} has one); use train or "
            "test (training holds out its own calibration images from train, see --val-fraction)"
        )
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive number of images, got {limit}")
    start = time.perf_counter()
    if name == "synthetic":
        from vaegan.trainer.data.synthetic import load_synthetic

        data = load_synthetic(split, spec, seed=seed, limit=limit)
    else:
        if root is None:
            raise DatasetError(f"{name}: no data root given; expected the folder holding its files")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DatasetError(f"{root}: no such folder; expected the {name} data there")
        if name in ("mnist", "fashion-mnist"):
            from vaegan.trainer.data.idx import load_idx

            data = load_idx(name, root, split, spec, limit=limit)
        elif name == "cifar10":
            from vaegan.trainer.data.cifar import load_cifar10

            data = load_cifar10(root, split, spec, limit=limit)
        elif name == "mvtec":
            from vaegan.trainer.data.mvtec import load_mvtec

            data = load_mvtec(root, split, spec if spec is not None else native_spec("mvtec"), limit=limit)
        else:
            from vaegan.trainer.data.folder import load_folder

            data = load_folder(root, split, spec if spec is not None else native_spec("folder"), limit=limit)
    logger.info(
        "loaded %s/%s: %d images of %s in %.1f s",
        name, split, len(data), "x".join(map(str, data.images.shape[1:])), time.perf_counter() - start,
    )
    return data


def load_folder_pair(
    normal_dir: str | Path,
    anomalous_dir: str | Path,
    masks_dir: str | Path | None,
    spec: ImageSpec,
) -> ImageSet:
    """Normal images (label 0) and anomalous images (label 1) from two folders, for evaluation.

    With ``masks_dir``, each anomalous image needs a mask there with the same file stem (or
    ``<stem>_mask``, as in MVTec AD), any image format, non-zero = defect; normal images get
    all-False masks. Without it, ``masks`` is None.
    """
    from vaegan.trainer.data.folder import load_pair

    return load_pair(Path(normal_dir), Path(anomalous_dir), None if masks_dir is None else Path(masks_dir), spec)
