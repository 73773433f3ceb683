"""What ``vaegan score`` scores: INPUT arguments -> a list of :class:`Item` (id, path, extra columns).

An INPUT is one of

* a file: taken as it is, whatever its extension (it was named);
* a directory: walked recursively, files with an image extension (:data:`IMAGE_EXTENSIONS`,
  any case) only, hidden names (starting with ``.``) skipped, symbolic links followed but every
  directory visited once (a link loop ends the walk of that branch);
* a glob (``*``, ``?``, ``[...]``; ``**`` spans directories): the matching files;
* ``@LIST`` with LIST a ``.txt`` (one path per line; blank lines and ``#`` comments skipped),
  ``.csv``, ``.jsonl`` or ``.parquet`` file naming the images in a ``path`` column; its other
  columns are carried to the output. Relative paths are relative to the list's folder.

An image's id is its path relative to its input's root: the directory itself, the fixed part of
a glob (``data/*/x.png`` -> ``data``), the list's folder, or for files named directly their
common parent folder. Ids use ``/`` whatever the platform, and must be unique.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "LIST_FORMATS",
    "InputError",
    "Item",
    "resolve_inputs",
    "shard_of",
]

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"}
)
LIST_FORMATS = (".txt", ".csv", ".jsonl", ".parquet")
_MAGIC = frozenset("*?[")
NO_EXTRA: Mapping[str, Any] = MappingProxyType({})  # the extra columns of an image named outside a list


class InputError(ValueError):
    """An INPUT argument that cannot be used (a usage error: exit code 2)."""


@dataclass(frozen=True, slots=True)
class Item:
    """One image to score: its id (unique), its path, and the columns its list carried."""

    id: str
    path: str
    extra: Mapping[str, Any] = field(default_factory=lambda: NO_EXTRA)  # shared, never copied


def shard_of(image_id: str, num_shards: int) -> int:
    """The shard (0..num_shards-1) of an id: a stable hash (BLAKE2b), the same on every machine,
    Python version and run (unlike ``hash()``)."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def resolve_inputs(inputs: Sequence[str], reserved: Iterable[str] = ()) -> list[Item]:
    """INPUT arguments -> items in a stable order (each input in turn; directories and globs
    sorted by path). ``reserved``: column names a list may not carry (the output's own).

    Raises :class:`InputError` for an argument that names nothing, a list without a ``path``
    column or with a reserved column, and for two images with the same id.
    """
    if not inputs:
        raise InputError("no INPUT given (files, directories, globs or @LIST)")
    reserved = set(reserved)
    items: list[Item] = []
    files: list[Path] = []
    for arg in inputs:
        if arg.startswith("@"):
            items.extend(_from_list(Path(arg[1:]), reserved))
        elif any(c in _MAGIC for c in arg):
            items.extend(_from_glob(arg))
        elif Path(arg).is_dir():
            root = Path(arg)
            items.extend(Item(rel, path) for rel, path in _walk(root))
        elif Path(arg).is_file():
            files.append(Path(arg))
        else:
            raise InputError(f"INPUT {arg}: no such file or directory")
    if files:
        root = Path(os.path.commonpath([str(p.absolute().parent) for p in files]))
        items.extend(Item(_rel(p.absolute(), root), str(p)) for p in files)
    return _unique(items)


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _is_image(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def _walk(root: Path, images_only: bool = True, max_depth: int | None = None) -> Iterator[tuple[str, str]]:
    """(id relative to ``root``, path) of the files under ``root`` (image files only, by
    default), sorted by name in each folder, hidden names skipped, links followed, each folder
    once; ``max_depth`` folders deep at most (None: all). Strings and ``os.scandir`` only: a
    folder of a million files is listed at a few microseconds per file."""
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[str, str, int]] = [(str(root), "", 0)]  # (folder path, its id prefix, depth)
    while stack:
        folder, prefix, depth = stack.pop()
        try:
            st = os.stat(folder)  # noqa: PTH116 - strings on purpose: speed
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:  # vanished or unreadable: nothing to score there
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: a loop or a second path
            continue
        seen.add((st.st_dev, st.st_ino))
        subfolders = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                continue
            if is_dir:
                if max_depth is None or depth < max_depth:
                    subfolders.append((e.path, f"{prefix}{e.name}/", depth + 1))
            elif not images_only or _is_image(e.name):
                yield f"{prefix}{e.name}", e.path
        stack.extend(reversed(subfolders))


def _glob_root(pattern: str) -> tuple[Path, list[str]]:
    """(the longest leading folder of a glob without wildcards: the ids' root, the rest of the
    pattern as path parts)."""
    parts = Path(pattern).parts
    k = 0
    while k < len(parts) - 1 and not any(c in _MAGIC for c in parts[k]):
        k += 1
    return (Path(*parts[:k]) if k else Path()), list(parts[k:])


def _match(pattern: list[str], path: tuple[str, ...]) -> bool:
    """Does a relative path match a glob's parts? ``**`` spans zero or more folders; ``*``,
    ``?`` and ``[...]`` stay within one name and match a leading dot only when written."""
    if not pattern:
        return not path
    head = pattern[0]
    if head == "**":
        return _match(pattern[1:], path) or (bool(path) and _match(pattern, path[1:]))
    if not path or (path[0].startswith(".") and not head.startswith(".")):
        return False
    return fnmatch.fnmatchcase(path[0], head) and _match(pattern[1:], path[1:])


def _from_glob(pattern: str) -> list[Item]:
    """The files a glob matches, found by a walk of its root that is safe from link loops
    (Python's own recursive glob follows a loop until the path is too long)."""
    root, rest = _glob_root(pattern)
    matches = []
    if root.is_dir():
        depth = None if "**" in rest else len(rest) - 1
        for rel, path in _walk(root, images_only=False, max_depth=depth):
            if _match(rest, tuple(rel.split("/"))):
                matches.append(Item(rel, path))
    if not matches:
        raise InputError(f"INPUT {pattern}: the pattern matches no file")
    return sorted(matches, key=lambda it: it.id)


def _from_list(path: Path, reserved: set[str]) -> list[Item]:
    where = f"INPUT @{path}"
    if not path.is_file():
        raise InputError(f"{where}: no such file")
    suffix = path.suffix.lower()
    if suffix not in LIST_FORMATS:
        raise InputError(f"{where}: a list must be one of {', '.join(LIST_FORMATS)}, got {suffix or 'no extension'}")
    if suffix == ".txt":
        rows: list[dict[str, Any]] = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append({"path": line})
    else:
        rows = _read_table(path, suffix, where)
    if rows and "path" not in rows[0]:
        raise InputError(f"{where}: no 'path' column (columns: {', '.join(rows[0])})")
    clash = sorted(reserved.intersection(rows[0]) if rows else set())
    if clash:
        raise InputError(f"{where}: column {clash[0]!r} would overwrite the output's own; rename it")
    base = path.parent
    items = []
    for i, row in enumerate(rows):
        value = row["path"]
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: row {i + 1}: 'path' must be a non-empty string, got {value!r}")
        p = Path(value)
        full = p if p.is_absolute() else base / p
        image_id = p.as_posix() if not p.is_absolute() else _abs_id(p, base)
        items.append(Item(image_id, str(full), {k: v for k, v in row.items() if k != "path"}))
    return items


def _abs_id(p: Path, base: Path) -> str:
    """An absolute path in a list: relative to the list's folder when under it, else as is."""
    try:
        return p.relative_to(base.absolute()).as_posix()
    except ValueError:
        return p.as_posix()


def _read_table(path: Path, suffix: str, where: str) -> list[dict[str, Any]]:
    """A CSV, JSONL or Parquet list -> rows as dicts (pyarrow readers, types inferred; the
    ``path`` column always read as text)."""
    import pyarrow as pa

    try:
        if suffix == ".csv":
            from pyarrow import csv

            table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types={"path": pa.string()}))
        elif suffix == ".jsonl":
            from pyarrow import json as pa_json

            table = pa_json.read_json(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"{where}: cannot read it ({str(e).splitlines()[0]})") from e
    if "path" not in table.column_names:
        raise InputError(f"{where}: no 'path' column (columns: {', '.join(table.column_names) or 'none'})")
    return table.to_pylist()


def _unique(items: list[Item]) -> list[Item]:
    """Items with the same id and path (named twice) once; the same id for two paths is an error."""
    seen: dict[str, str] = {}
    out = []
    for it in items:
        other = seen.get(it.id)
        if other is None:
            seen[it.id] = it.path
            out.append(it)
        elif other != it.path:
            raise InputError(
                f"two images have the id {it.id!r} ({other} and {it.path}): ids are paths relative to "
                "each input's root; score them in separate jobs or name them in a @LIST"
            )
    return out
