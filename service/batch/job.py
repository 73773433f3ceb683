"""``vaegan score``: one batch job from INPUT arguments to a finished table.

resolve inputs -> keep this shard's ids -> drop ids already done (``--resume``) -> decode in
worker processes -> score (in process or on a server) -> rows into crash-safe parts (and
pictures) -> assemble the output -> optional report. See :mod:`service.batch`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from vaegan.service.batch.decode import DecodePool, default_workers
from vaegan.service.batch.inputs import Item, resolve_inputs, shard_of
from vaegan.service.batch.score import ChunkResult, Scorer, chunk_rows, chunked
from vaegan.service.batch.table import (
    BASE_COLUMNS,
    PartStore,
    TableStats,
    check_format,
    output_schema,
    shard_path,
)

__all__ = ["JobConfig", "JobSummary", "Progress", "run_job"]

logger = logging.getLogger(__name__)


@dataclass
class JobConfig:
    inputs: Sequence[str]
    out: Path
    batch_size: int = 64
    workers: int | None = None  # None: cores - 1
    maps_dir: Path | None = None
    repaired_dir: Path | None = None
    only_outliers: bool = False
    resume: bool = False
    overwrite: bool = False
    shard_index: int = 0
    num_shards: int = 1
    report_dir: Path | None = None
    top_k: int = 16
    part_rows: int = 2_000
    part_seconds: float = 60.0
    progress: bool | None = None  # None: a bar on a terminal, a log line every log_seconds otherwise
    log_seconds: float = 30.0


@dataclass
class JobSummary:
    out: Path
    scored: int  # scored by this run
    failed: int  # error rows written by this run
    skipped: int  # already in the output (--resume)
    other_shards: int  # inputs that belong to other shards
    seconds: float
    table: TableStats = field(default_factory=TableStats)  # the finished table

    @property
    def rate(self) -> float:
        return (self.scored + self.failed) / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0: every row of the table has scores; 3: some input could not be scored."""
        return 3 if self.table.errors else 0

    def line(self) -> str:
        done = f"scored {self.scored:,}, failed {self.failed:,}, skipped {self.skipped:,}"
        extra = f" ({self.table.errors:,} error rows in the table)" if self.table.errors != self.failed else ""
        return (f"{done}{extra} in {self.seconds:.1f} s ({self.rate:,.1f} images/s); "
                f"wrote {self.out} ({self.table.rows:,} rows)")


class Progress:
    """A one-line progress bar with images/s and ETA on a terminal; else a log line now and then."""

    def __init__(self, total: int, tty: bool | None = None, log_seconds: float = 30.0) -> None:
        self.total = total
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.log_seconds = log_seconds
        self.done = 0
        self.t0 = time.monotonic()
        self._last = self.t0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < (0.2 if self.tty else self.log_seconds) and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_s = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
        if self.tty:
            width = 30
            filled = int(width * self.done / max(1, self.total))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done:,}/{self.total:,} "
                             f"{rate:,.0f} img/s ETA {eta_s} ")
            sys.stderr.flush()
        else:
            logger.info("%s/%s images, %.0f images/s, ETA %s", f"{self.done:,}", f"{self.total:,}", rate, eta_s)

    def close(self) -> None:
        if self.tty and self.total:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _extra_fields(items: list[Item]) -> list[pa.Field]:
    """The columns lists carried, typed from all their values (text when all are null)."""
    names: dict[str, None] = {}
    for it in items:
        names.update(dict.fromkeys(it.extra))
    fields = []
    for name in names:
        values = [it.extra.get(name) for it in items]
        try:
            typ = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            typ = pa.string()  # mixed types: carried as text
            for i, it in enumerate(items):
                if it.extra.get(name) is not None:
                    items[i] = Item(it.id, it.path, {**it.extra, name: str(it.extra[name])})
        fields.append(pa.field(name, pa.string() if pa.types.is_null(typ) else typ))
    return fields


def _save_png(path: Path, arr: np.ndarray) -> None:
    """Write a PNG atomically (temporary name, then rename), making folders as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    img = arr[:, :, 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)


def picture_path(root: Path, image_id: str) -> Path:
    """Where an id's picture goes: the id's sub-folders mirrored, the extension made ``.png``."""
    rel = Path(*[p for p in Path(image_id).parts if p not in ("", "..", "/")]) if image_id else Path("image")
    if rel.is_absolute():
        rel = rel.relative_to(rel.anchor)
    return root / rel.with_suffix(".png")


def _write_pictures(cfg: JobConfig, items: Sequence[Item], ok: list[int], result: ChunkResult) -> None:
    for kind, root in (("maps", cfg.maps_dir), ("repaired", cfg.repaired_dir)):
        pictures = getattr(result, kind)
        if root is None or pictures is None:
            continue
        for j, pic in enumerate(pictures):
            if pic is not None:
                _save_png(picture_path(root, items[ok[j]].id), pic)


def _outside_outputs(items: list[Item], cfg: JobConfig) -> list[Item]:
    """The inputs, less any file inside this job's own picture or report folders (a folder
    scored twice must not pick up the maps the first run wrote into it)."""
    own = [d.resolve() for d in (cfg.maps_dir, cfg.repaired_dir, cfg.report_dir) if d is not None]
    if not own:
        return items
    return [it for it in items if not any(Path(it.path).resolve().is_relative_to(d) for d in own)]


def run_job(cfg: JobConfig, scorer: Scorer) -> JobSummary:
    """Run one job (one shard) to its finished output; see :class:`JobConfig`."""
    t0 = time.monotonic()
    check_format(cfg.out)
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise ValueError(f"--shard-index must be in 0..{cfg.num_shards - 1}, got {cfg.shard_index}")
    if cfg.repaired_dir is not None and scorer.target_fpr is None:
        raise ValueError("--repaired-dir needs a calibrated model (repairs follow its map threshold)")
    batch_size = cfg.batch_size
    if scorer.max_batch and batch_size > scorer.max_batch:
        logger.info("--batch-size %d is more than the server takes per request; using %d", batch_size, scorer.max_batch)
        batch_size = scorer.max_batch
    items = _outside_outputs(resolve_inputs(cfg.inputs, reserved=[n for n, _ in BASE_COLUMNS]), cfg)
    schema = output_schema(_extra_fields(items))
    mine = items if cfg.num_shards == 1 else [it for it in items if shard_of(it.id, cfg.num_shards) == cfg.shard_index]
    out = shard_path(cfg.out, cfg.shard_index, cfg.num_shards)
    store = PartStore(out, schema, resume=cfg.resume, overwrite=cfg.overwrite,
                      part_rows=cfg.part_rows, part_seconds=cfg.part_seconds)
    done = store.done_ids() if cfg.resume else set()
    todo = [it for it in mine if it.id not in done]
    logger.info("%d inputs: %d in shard %d of %d, %d already done, %d to score with %s v%s",
                len(items), len(mine), cfg.shard_index, cfg.num_shards, len(mine) - len(todo), len(todo),
                scorer.model_name, scorer.model_version)
    workers = default_workers() if cfg.workers is None else cfg.workers
    pictures = cfg.maps_dir is not None or cfg.repaired_dir is not None
    progress = Progress(len(todo), cfg.progress, cfg.log_seconds)
    scored = failed = 0
    groups = list(chunked(todo, batch_size))
    with DecodePool(scorer.spec, workers, keep_originals=cfg.repaired_dir is not None) as pool:
        decoded: Iterator = pool.map([it.path for it in g] for g in groups)
        results = scorer.run(decoded, maps=cfg.maps_dir is not None, repaired=cfg.repaired_dir is not None,
                             only_outliers=cfg.only_outliers)
        for group, (chunk, result) in zip(groups, results, strict=True):
            if pictures and result is not None:
                _write_pictures(cfg, group, chunk.ok, result)
            store.add(chunk_rows(group, chunk, result, schema, scorer.model_name, scorer.model_version))
            scored += len(chunk.ok)
            failed += len(chunk.errors)
            progress.update(len(group))
    progress.close()
    table = store.finish()
    summary = JobSummary(out, scored, failed, len(mine) - len(todo), len(items) - len(mine),
                         time.monotonic() - t0, table)
    if cfg.report_dir is not None:
        from vaegan.service.batch.report import write_report

        write_report(cfg.report_dir, out, schema, {it.id: it.path for it in mine}, scorer, cfg.top_k)
    return summary

