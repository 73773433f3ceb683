"""MNIST and Fashion-MNIST from the four original idx files, gzipped or raw.

An idx file is a big-endian header (magic, count[, rows, cols]) followed by uint8 values.
Images: magic 0x00000803, 16-byte header. Labels: magic 0x00000801, 8-byte header.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vaegan.service.runtime.preprocess import ImageSpec
from vaegan.trainer.data import DatasetError, ImageSet, images_to_spec

__all__ = ["CLASS_NAMES", "IMAGES_MAGIC", "LABELS_MAGIC", "find_idx_file", "load_idx", "read_idx"]

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_PREFIX = {"train": "train", "test": "t10k"}
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
# where torchvision's MNIST / FashionMNIST put the same files under their root
_TORCHVISION_DIR = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}


def find_idx_file(root: Path, name: str, dataset: str = "mnist") -> Path:
    """``root/name`` or ``root/name.gz`` (also under torchvision's ``<Dataset>/raw``)."""
    for folder in (root, root / _TORCHVISION_DIR.get(dataset, "raw")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DatasetError(f"{root}: missing {name} (or {name}.gz); expected the four {dataset} idx files")


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _read_exact(f: BinaryIO, size: int, path: Path, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise DatasetError(f"{path}: truncated {what}: expected {size} bytes, found {len(data)}")
    return data


def read_idx(path: Path, magic: int, limit: int | None = None) -> tuple[np.ndarray, int]:
    """One idx file -> (uint8 (N, rows, cols) for images or (N,) for labels, the count its
    header declares); N is that count, or ``limit`` if smaller.

    Raises:
        DatasetError: wrong magic number, truncated data, trailing bytes, or a corrupt gzip.
    """
    ndim = 3 if magic == IMAGES_MAGIC else 1
    try:
        with _open(path) as f:
            header = np.frombuffer(_read_exact(f, 4 * (1 + ndim), path, "header"), dtype=">u4")
            if int(header[0]) != magic:
                raise DatasetError(
                    f"{path}: wrong magic number 0x{int(header[0]):08x}, expected 0x{magic:08x} "
                    f"(an idx {'image' if ndim == 3 else 'label'} file)"
                )
            count, shape = int(header[1]), tuple(int(d) for d in header[2:])
            n = count if limit is None else min(count, limit)
            item = int(np.prod(shape, dtype=np.int64))
            data = _read_exact(f, n * item, path, f"data for {n} items")
            if n == count and f.read(1):
                raise DatasetError(f"{path}: trailing bytes after the {count} items the header declares")
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read ({e})") from e
    return np.frombuffer(data, dtype=np.uint8).reshape((n, *shape)).copy(), count  # writable


def load_idx(
    dataset: str, root: Path, split: str, spec: ImageSpec | None, *, limit: int | None = None
) -> ImageSet:
    """One split of MNIST or Fashion-MNIST; labels are the class ids 0-9."""
    prefix = _PREFIX[split]
    images_path = find_idx_file(root, f"{prefix}-images-idx3-ubyte", dataset)
    labels_path = find_idx_file(root, f"{prefix}-labels-idx1-ubyte", dataset)
    images, n_images = read_idx(images_path, IMAGES_MAGIC, limit)  # (N, rows, cols)
    labels, n_labels = read_idx(labels_path, LABELS_MAGIC, limit)  # (N,)
    if n_images != n_labels:
        raise DatasetError(
            f"{labels_path}: declares {n_labels} labels but {images_path.name} declares {n_images} images"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES[dataset]):
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is out of range 0-9")
    out = images[:, :, :, None] if spec is None else images_to_spec(images, spec)  # (N, H, W, C)
    return ImageSet(
        images=np.ascontiguousarray(out),
        labels=labels.astype(np.int64),
        masks=None,
        class_names=list(CLASS_NAMES[dataset]),
    )
