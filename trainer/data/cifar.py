"""CIFAR-10 in any of its common layouts, with the standard class ids (airplane 0 ... truck 9).

Accepted under ``root`` (checked in this order):

- python batches: ``data_batch_1..5`` / ``test_batch`` (pickled dicts, ``data`` (N, 3072) in
  CHW order, ``labels``) in ``root`` or ``root/cifar-10-batches-py``;
- binary batches: ``data_batch_1..5.bin`` / ``test_batch.bin`` (records of 1 label byte + 3072
  CHW bytes) in ``root`` or ``root/cifar-10-batches-bin``;
- ``root/<split>.zip`` holding ``<split>/<class_name>/<index>.jpg``;
- ``root/<split>/<class_name>/*.png|jpg...``.

Per-image layouts (zip, folders) are read in class-interleaved order (the first image of each
class, then the second, ...), so ``limit`` keeps the ten classes balanced.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from vaegan.service.runtime.preprocess import ImageSpec, to_model_size
from vaegan.trainer.data import (
    DatasetError,
    ImageSet,
    images_to_spec,
    interleave_by_rank,
    native_spec,
)
from vaegan.trainer.data.folder import IMG_EXTENSIONS, decode_bytes, list_images, read_image

__all__ = ["CLASS_NAMES", "load_cifar10"]

CLASS_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
_CLASS_IDS = {name: i for i, name in enumerate(CLASS_NAMES)}
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_RECORD = 1 + 3 * 32 * 32  # binary layout: label byte + CHW pixels


class _BatchUnpickler(pickle.Unpickler):
    """Loads CIFAR batch dicts (numpy arrays, lists, bytes) and refuses any other global, so a
    file under a user-supplied data root cannot run code."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)


def _check_labels(labels: np.ndarray, n: int, path: Path | str) -> np.ndarray:
    if labels.shape != (n,):
        raise DatasetError(f"{path}: {labels.size} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DatasetError(f"{path}: label {int(labels.max())} is outside the CIFAR-10 ids 0-9")
    return labels.astype(np.int64)


def _read_python_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as f:
            batch = _BatchUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({e})") from e
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (a pickled {type(batch).__name__})")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (keys {sorted(batch)}; expected data, labels)")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: data is {data.dtype} {data.shape}; expected uint8 (N, 3072)")
    labels = _check_labels(np.asarray(batch["labels"]), len(data), path)
    return _chw_to_hwc(data), labels


def _read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    if raw.size == 0 or raw.size % _RECORD:
        raise DatasetError(f"{path}: {raw.size} bytes is not a whole number of {_RECORD}-byte CIFAR-10 records")
    records = raw.reshape(-1, _RECORD)  # (N, 1 + 3072)
    labels = _check_labels(records[:, 0], len(records), path)
    return _chw_to_hwc(records[:, 1:]), labels


def _read_batches(folder: Path, names: list[str], limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Batches in order until ``limit`` images are read -> (uint8 (N, 32, 32, 3), int64 (N,))."""
    binary = names[0].endswith(".bin")
    images, labels, total = [], [], 0
    for name in names:
        if limit is not None and total >= limit:
            break
        path = folder / name
        if not path.is_file():
            raise DatasetError(f"{folder}: missing {name}; expected the CIFAR-10 batches {', '.join(names)}")
        x, y = _read_binary_batch(path) if binary else _read_python_batch(path)
        images.append(x)
        labels.append(y)
        total += len(y)
    return np.concatenate(images)[:limit], np.concatenate(labels)[:limit]


def _class_id(name: str, where: str) -> int:
    if name not in _CLASS_IDS:
        raise DatasetError(f"{where}: unknown class folder {name!r}; expected CIFAR-10 class names ({', '.join(CLASS_NAMES)})")
    return _CLASS_IDS[name]


def _read_zip(path: Path, spec: ImageSpec, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable zip ({e})") from e
    with zf:
        groups: list[list[zipfile.ZipInfo]] = [[] for _ in CLASS_NAMES]
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if (info.is_dir() or len(parts) < 2 or any(p.startswith((".", "__MACOSX")) for p in parts)
                    or PurePosixPath(parts[-1]).suffix.lower() not in IMG_EXTENSIONS):
                continue
            groups[_class_id(parts[-2], f"{path}:{info.filename}")].append(info)
        for g in groups:
            g.sort(key=lambda info: info.filename)
        order = interleave_by_rank(groups)[:limit]
        if not order:
            raise DatasetError(f"{path}: no images; expected <split>/<class_name>/<index>.jpg entries")
        images = np.empty((len(order), spec.height, spec.width, spec.channels), np.uint8)
        for i, (g, r) in enumerate(order):
            info = groups[g][r]
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError) as e:
                raise DatasetError(f"{path}: cannot read entry {info.filename} ({e})") from e
            arr = decode_bytes(data, f"{path}:{info.filename}")
            images[i] = to_model_size(arr, spec)
    return images, np.array([g for g, _ in order], dtype=np.int64)


def _read_class_folders(base: Path, spec: ImageSpec, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    groups: list[list[Path]] = [[] for _ in CLASS_NAMES]
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        groups[_class_id(sub.name, str(sub))] = list_images(sub, recursive=True)
    order = interleave_by_rank(groups)[:limit]
    if not order:
        raise DatasetError(f"{base}: no images; expected {base}/<class_name>/*.png or *.jpg")
    images = np.empty((len(order), spec.height, spec.width, spec.channels), np.uint8)
    for i, (g, r) in enumerate(order):
        images[i] = to_model_size(read_image(groups[g][r]), spec)
    return images, np.array([g for g, _ in order], dtype=np.int64)


def _find_batches(root: Path) -> tuple[Path, str] | None:
    """(folder, file suffix) of python ("") or binary (".bin") batches, if ``root`` has them."""
    for folder, suffix in (
        (root, ""), (root / "cifar-10-batches-py", ""), (root, ".bin"), (root / "cifar-10-batches-bin", ".bin"),
    ):
        if any((folder / f"{n}{suffix}").is_file() for n in ("data_batch_1", "test_batch")):
            return folder, suffix
    return None


def load_cifar10(root: Path, split: str, spec: ImageSpec | None, *, limit: int | None = None) -> ImageSet:
    """One split of CIFAR-10 from whichever layout ``root`` holds (see the module docstring).
    Without a spec, images come at the native 32x32 RGB."""
    spec = spec if spec is not None else native_spec("cifar10")
    batches = _find_batches(root)
    if batches is not None:
        folder, suffix = batches
        images, labels = _read_batches(folder, [f"{n}{suffix}" for n in _BATCHES[split]], limit)
        images = images_to_spec(images, spec)
    elif (root / f"{split}.zip").is_file():
        images, labels = _read_zip(root / f"{split}.zip", spec, limit)
    elif (root / split).is_dir():
        images, labels = _read_class_folders(root / split, spec, limit)
    else:
        raise DatasetError(
            f"{root}: no CIFAR-10 {split} data; expected cifar-10-batches-py/, "
            f"cifar-10-batches-bin/, {split}.zip or {split}/<class_name>/ images"
        )
    return ImageSet(images=images, labels=labels, masks=None, class_names=list(CLASS_NAMES))
