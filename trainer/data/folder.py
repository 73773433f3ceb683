"""Folders of images: flat (one class, "normal") or one sub-folder per class.

Any size and mode (grey, RGB, palette, 16-bit...) that Pillow reads; each file is decoded from
its bytes with the service's own :func:`decode_image` and brought to the model size with
:func:`to_model_size`, so a folder trains on exactly what the service would see.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vaegan.service.runtime.errors import InvalidInput
from vaegan.service.runtime.preprocess import ImageSpec, decode_image, is_grey_image, to_model_size
from vaegan.trainer.data import DatasetError, ImageSet, interleave_by_rank, mask_to_spec

__all__ = [
    "IMG_EXTENSIONS",
    "PROBE_FILES",
    "PROBE_SIZES",
    "decode_bytes",
    "folder_defaults",
    "list_images",
    "load_folder",
    "load_pair",
    "read_image",
    "read_images",
]

# the same list as torchvision.datasets.folder.IMG_EXTENSIONS, without importing torch for it
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
PROBE_FILES = 64  # how many image headers folder_defaults reads
PROBE_SIZES = (28, 256)  # the model sides folder_defaults may choose (ModelConfig's range)


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files (by extension, case-insensitive) in ``folder``, sorted; hidden ones skipped."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p for p in found
        if p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )


def read_image(path: Path) -> np.ndarray:
    """Decode one file as the service decodes request bytes -> uint8 (H, W) or (H, W, 3)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    return decode_bytes(data, str(path))


def decode_bytes(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W) or (H, W, 3), as the service decodes a request;
    a :class:`DatasetError` naming ``where`` if they are no image."""
    try:
        return decode_image(data, where=where)
    except InvalidInput as e:
        cause = e.__cause__
        reason = "unknown format or corrupt data" if isinstance(cause, UnidentifiedImageError) else cause or e
        raise DatasetError(f"{where}: not a readable image ({reason})") from e


def read_images(paths: Sequence[Path], spec: ImageSpec) -> np.ndarray:
    """Files -> uint8 (N, H, W, C) at ``spec``."""
    out = np.empty((len(paths), spec.height, spec.width, spec.channels), np.uint8)
    for i, path in enumerate(paths):
        out[i] = to_model_size(read_image(path), spec)
    return out


def _class_folders(base: Path) -> tuple[list[str], list[list[Path]]]:
    """(class names, files per class): sub-folders holding images, or the folder itself."""
    names, groups = [], []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub, recursive=True)
        if files:
            names.append(sub.name)
            groups.append(files)
    loose = list_images(base)
    if groups and loose:
        raise DatasetError(
            f"{base}: mixes loose images ({loose[0].name}) with class folders ({names[0]}/); "
            "expected either a flat folder of images or one sub-folder per class"
        )
    if loose:
        return ["normal"], [loose]
    if not groups:
        raise DatasetError(
            f"{base}: no images found; expected {'/'.join(IMG_EXTENSIONS)} files, "
            "flat or one sub-folder per class"
        )
    return names, groups


def load_folder(root: Path, split: str, spec: ImageSpec, *, limit: int | None = None) -> ImageSet:
    """A folder dataset. ``root/train`` and ``root/test`` are the splits when they exist; else
    the whole folder serves both. Nested folders are read in class-interleaved order
    (first file of each class, then the second, ...) so that ``limit`` keeps classes balanced.
    """
    names, groups = _class_folders(_split_base(root, split))
    order = interleave_by_rank(groups)[:limit]
    paths = [groups[g][r] for g, r in order]
    return ImageSet(
        images=read_images(paths, spec),
        labels=np.array([g for g, _ in order], dtype=np.int64),
        masks=None,
        class_names=names,
    )


def _split_base(root: Path, split: str) -> Path:
    """The folder holding ``split``: ``root/split`` when root has train/test sub-folders."""
    if (root / "train").is_dir() or (root / "test").is_dir():
        base = root / split
        if not base.is_dir():
            raise DatasetError(f"{base}: no such folder; {root} has train/test sub-folders, so expected {split}/")
        return base
    return root


def folder_defaults(root: Path, limit: int = PROBE_FILES) -> tuple[int, int] | None:
    """(channels, side) for a model of a folder dataset, from the headers of up to ``limit``
    images of its train split, in the order :func:`load_folder` reads them (no pixels are
    decoded, except the palettes of palette images).

    channels is 1 when every image decodes as grey (see
    :func:`~service.runtime.preprocess.is_grey_image`), else 3; side is the largest height or
    width seen, clamped to :data:`PROBE_SIZES`. None when no image could be read.
    """
    try:
        _, groups = _class_folders(_split_base(root, "train"))
    except (DatasetError, OSError):
        return None
    channels, side, seen = 1, 0, 0
    for g, r in interleave_by_rank(groups)[:limit]:
        try:
            with Image.open(groups[g][r]) as im:
                grey, side = is_grey_image(im), max(side, im.width, im.height)
        except (UnidentifiedImageError, OSError, ValueError):
            continue  # load_folder names it when it reads the folder
        seen += 1
        channels = channels if grey else 3
    if not seen:
        return None
    return channels, min(PROBE_SIZES[1], max(PROBE_SIZES[0], side))


def _find_mask(masks: dict[tuple[Path, str], Path], rel: Path) -> Path | None:
    for stem in (rel.stem, f"{rel.stem}_mask"):
        found = masks.get((rel.parent, stem))
        if found is not None:
            return found
    return None


def _read_mask(path: Path, shape: tuple[int, int], image: Path, spec: ImageSpec) -> np.ndarray:
    arr = read_image(path)
    mask = (arr != 0).any(axis=2) if arr.ndim == 3 else arr != 0  # non-zero = defect
    if mask.shape != shape:
        raise DatasetError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but {image} is {shape[1]}x{shape[0]}")
    return mask_to_spec(mask, spec)


def load_pair(normal_dir: Path, anomalous_dir: Path, masks_dir: Path | None, spec: ImageSpec) -> ImageSet:
    """See :func:`trainer.data.load_folder_pair`. Both folders are searched recursively; a
    mask lives at the same relative folder under ``masks_dir`` as its anomalous image."""
    for d in (normal_dir, anomalous_dir, *(() if masks_dir is None else (masks_dir,))):
        if not d.is_dir():
            raise DatasetError(f"{d}: no such folder")
    normal = list_images(normal_dir, recursive=True)
    anomalous = list_images(anomalous_dir, recursive=True)
    for d, files in ((normal_dir, normal), (anomalous_dir, anomalous)):
        if not files:
            raise DatasetError(f"{d}: no images found; expected {'/'.join(IMG_EXTENSIONS)} files")
    n = len(normal) + len(anomalous)
    images = np.empty((n, spec.height, spec.width, spec.channels), np.uint8)
    masks = None if masks_dir is None else np.zeros((n, spec.height, spec.width), bool)
    index = {}
    if masks_dir is not None:
        index = {(p.relative_to(masks_dir).parent, p.stem): p for p in list_images(masks_dir, recursive=True)}
    for i, path in enumerate([*normal, *anomalous]):
        arr = read_image(path)
        images[i] = to_model_size(arr, spec)
        if masks is not None and i >= len(normal):
            rel = path.relative_to(anomalous_dir)
            mask_path = _find_mask(index, rel)
            if mask_path is None:
                raise DatasetError(
                    f"{path}: no mask for it; expected {masks_dir / rel.parent}/{rel.stem}[_mask].<ext>"
                )
            masks[i] = _read_mask(mask_path, arr.shape[:2], path, spec)
    return ImageSet(
        images=images,
        labels=np.repeat(np.array([0, 1], dtype=np.int64), [len(normal), len(anomalous)]),
        masks=masks,
        class_names=["normal", "anomalous"],
    )
