"""The output table: its schema, crash-safe part files, resume, final assembly and merging.

Rows go to numbered Parquet part files in ``OUT.parts/``; each is written to a temporary name,
flushed to disk and renamed (an atomic step), so a job killed at any moment leaves whole parts
only. :meth:`PartStore.finish` assembles the final file the same way (temporary name, then
rename) and removes the parts. With ``resume``, ids already in the output or its parts are
skipped and kept, so a resumed job ends with the table an uninterrupted one would have written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "BASE_COLUMNS",
    "FORMATS",
    "OutputError",
    "PartStore",
    "TableStats",
    "merge_tables",
    "output_schema",
    "read_table",
    "shard_path",
    "write_table",
]

# the output's own columns, in order; list columns carried from a @LIST follow them
BASE_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("id", pa.string()),
    ("score", pa.float64()),
    ("is_outlier", pa.bool_()),
    ("tail_probability", pa.float64()),
    ("pixel", pa.float64()),
    ("feature", pa.float64()),
    ("disc", pa.float64()),
    ("pixel_local", pa.float64()),
    ("disc_local", pa.float64()),
    ("threshold", pa.float64()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("error", pa.string()),
)
FORMATS = (".parquet", ".csv", ".jsonl")


class OutputError(ValueError):
    """An output path that cannot be used as asked (a usage error: exit code 2)."""


def output_schema(extra: Iterable[pa.Field] = ()) -> pa.Schema:
    return pa.schema([pa.field(n, t) for n, t in BASE_COLUMNS] + list(extra))


def check_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise OutputError(f"--out {path}: the extension must be one of {', '.join(FORMATS)}, got {suffix or 'none'}")
    return suffix


def shard_path(out: Path, index: int, num_shards: int) -> Path:
    """The file of one shard: ``scores.parquet`` -> ``scores.shard-00003-of-00008.parquet``."""
    if num_shards <= 1:
        return out
    return out.with_name(f"{out.stem}.shard-{index:05d}-of-{num_shards:05d}{out.suffix}")


# ---- reading and writing whole tables ---------------------------------------------------------
def read_table(path: Path, schema: pa.Schema | None = None) -> pa.Table:
    """A table written by :func:`write_table` (any of :data:`FORMATS`); CSV and JSONL columns
    are read with ``schema``'s types where it names them."""
    suffix = check_format(path)
    if suffix == ".parquet":
        return pq.read_table(path)
    types = {f.name: f.type for f in (schema or output_schema())}
    if suffix == ".csv":
        from pyarrow import csv

        return csv.read_csv(path, convert_options=csv.ConvertOptions(column_types=types, strings_can_be_null=True))
    from pyarrow import json as pa_json

    names = _jsonl_columns(path)
    explicit = pa.schema([pa.field(n, types[n]) for n in names if n in types])
    return pa_json.read_json(path, parse_options=pa_json.ParseOptions(explicit_schema=explicit))


def _jsonl_columns(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return list(json.loads(line))
    return []


class _Writer:
    """Streams record batches to one file of :data:`FORMATS`."""

    def __init__(self, path: Path, schema: pa.Schema, suffix: str) -> None:
        self.suffix = suffix
        self.schema = schema
        self._f = path.open("wb")
        self._pq: pq.ParquetWriter | None = None
        self._csv: Any = None
        if self.suffix == ".parquet":
            self._pq = pq.ParquetWriter(self._f, schema)
        elif self.suffix == ".csv":
            from pyarrow import csv

            self._csv = csv.CSVWriter(self._f, schema)

    def write(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        if self._pq is not None:
            self._pq.write_table(table)
        elif self._csv is not None:
            self._csv.write_table(table)
        else:
            lines = [json.dumps(_json_row(r), ensure_ascii=False) for r in table.to_pylist()]
            if lines:
                self._f.write(("\n".join(lines) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        elif self._csv is not None:
            self._csv.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities (not JSON) as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported here (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(path: Path, tables: Iterable[pa.Table], schema: pa.Schema) -> None:
    """Write ``tables`` one after the other into ``path``, atomically: to a temporary file in
    the same folder, flushed, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = _Writer(tmp, schema, check_format(path))
    try:
        for t in tables:
            writer.write(t)
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---- the part store ---------------------------------------------------------------------------
class TableStats:
    """Counts over a finished table."""

    def __init__(self) -> None:
        self.rows = 0
        self.errors = 0

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count


class PartStore:
    """Crash-safe, resumable output for one job (one shard).

    ``add`` buffers record batches and commits a part every ``part_rows`` rows or
    ``part_seconds`` seconds, whichever comes first: at most that much work is redone after a
    kill. Without ``resume`` an existing output or parts folder is refused (``overwrite``
    removes them first).
    """

    def __init__(
        self,
        out: Path,
        schema: pa.Schema,
        *,
        resume: bool = False,
        overwrite: bool = False,
        part_rows: int = 2_000,
        part_seconds: float = 60.0,
    ) -> None:
        check_format(out)
        self.out = out
        self.schema = schema
        self.parts_dir = out.with_name(out.name + ".parts")
        self.part_rows = part_rows
        self.part_seconds = part_seconds
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._last_commit = time.monotonic()
        exists = [p for p in (out, self.parts_dir) if p.exists()]
        if exists and overwrite:
            out.unlink(missing_ok=True)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        elif exists and not resume:
            raise OutputError(
                f"{exists[0]} already exists: pass --resume to continue that job, or --overwrite to start again"
            )
        self._previous_ids: list[str] = []  # ids of an existing output, read once here
        if out.exists():
            previous = read_table(out, schema)
            missing = [n for n in schema.names if n not in previous.column_names]
            if missing:
                raise OutputError(f"--resume: {out} has no column {missing[0]!r}: it was not written by this job")
            self._previous_ids = previous.column("id").to_pylist()
        out.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir.mkdir(exist_ok=True)
        for stale in self.parts_dir.glob(".*.tmp-*"):  # a part being written when the job died
            stale.unlink()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self._parts()), default=-1)

    def _parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        """Ids already in the output and in its committed parts."""
        done: set[str] = set(self._previous_ids)
        for p in self._parts():
            done.update(pq.read_table(p, columns=["id"]).column("id").to_pylist())
        return done

    def add(self, batch: pa.RecordBatch) -> None:
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        if self._buffered >= self.part_rows or time.monotonic() - self._last_commit >= self.part_seconds:
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as the next part (atomically)."""
        self._last_commit = time.monotonic()
        if not self._buffer:
            return
        part = self.parts_dir / f"part-{self._next:05d}.parquet"
        write_table(part, [pa.Table.from_batches(self._buffer, self.schema)], self.schema)
        self._next += 1
        self._buffer, self._buffered = [], 0

    def _all_tables(self) -> Iterator[pa.Table]:
        if self.out.exists():
            yield read_table(self.out, self.schema).select(self.schema.names).cast(self.schema)
        for p in self._parts():
            yield pq.read_table(p)

    def finish(self) -> TableStats:
        """Commit what is buffered, assemble the output (the previous output first, then the
        parts in order; an id seen before is dropped) and remove the parts."""
        self.commit()
        stats = TableStats()
        seen: set[str] = set()

        def unique() -> Iterator[pa.Table]:
            for t in self._all_tables():
                ids = t.column("id").to_pylist()
                keep = [i for i, v in enumerate(ids) if v not in seen]
                seen.update(ids)
                if len(keep) != len(ids):
                    t = t.take(pa.array(keep, pa.int64()))
                stats.add(t)
                yield t

        write_table(self.out, unique(), self.schema)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return stats


def merge_tables(out: Path, inputs: list[Path]) -> TableStats:
    """Join shard files into one table sorted by id; an id in two shards is an error."""
    check_format(out)
    tables = [read_table(p) for p in inputs]
    if not tables:
        raise OutputError("score-merge: no shard files given")
    names = tables[0].column_names
    for p, t in zip(inputs, tables, strict=True):
        if t.column_names != names:
            raise OutputError(f"{p}: its columns differ from {inputs[0]}'s; were both written by vaegan score?")
    merged = pa.concat_tables(tables, promote_options="permissive")
    ids = merged.column("id")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise OutputError(f"score-merge: the id {dup!r} is in more than one shard file")
    merged = merged.sort_by("id")
    stats = TableStats()
    stats.add(merged)
    write_table(out, [merged], merged.schema)
    return stats
