"""Scoring decoded chunks in process (a :class:`~service.runtime.Runtime`) or on a server
(``ScoreStream``), and turning them into output rows.

Both scorers take an iterator of :class:`~service.batch.decode.Decoded` chunks and yield
``(chunk, ChunkResult)`` in the same order, so the rest of a job does not care where the model
runs. :func:`score_files` is the Python API on top.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from vaegan.service.batch.decode import Decoded, DecodePool, default_workers
from vaegan.service.batch.inputs import Item
from vaegan.service.batch.table import output_schema
from vaegan.service.runtime.preprocess import ImageSpec, map_to_input
from vaegan.service.runtime.scoring import ALL_COMPONENTS, map_full_scale, map_to_uint8

if TYPE_CHECKING:
    from vaegan.service.client import OutlierClient
    from vaegan.service.runtime import Runtime

__all__ = ["ChunkResult", "LocalScorer", "RemoteScorer", "Scorer", "chunk_rows", "chunked", "score_files"]


@dataclass
class ChunkResult:
    """Per decoded image of a chunk (``Decoded.ok`` order): scores and optional pictures."""

    score: np.ndarray  # (k,) float64
    is_outlier: np.ndarray  # (k,) bool
    tail_probability: np.ndarray  # (k,) float64, NaN for an uncalibrated model
    threshold: np.ndarray  # (k,) float64
    components: dict[str, np.ndarray]  # name -> (k,) float64, the model's components only
    maps: list[np.ndarray | None] | None = None  # uint8 (h, w) at input size, when asked
    repaired: list[np.ndarray | None] | None = None  # uint8 (h, w, C) at input size, when asked


class Scorer:
    """What a job needs from wherever the model runs."""

    spec: ImageSpec
    model_name: str
    model_version: str
    target_fpr: float | None  # the calibrated target FPR; None: uncalibrated
    max_batch: int | None = None  # the most images one call may carry

    def run(self, chunks: Iterator[Decoded], maps: bool = False, repaired: bool = False,
            only_outliers: bool = False) -> Iterator[tuple[Decoded, ChunkResult | None]]:
        raise NotImplementedError


class LocalScorer(Scorer):
    """The bundle in this process: the same :class:`~service.runtime.Runtime` the server runs."""

    def __init__(self, runtime: Runtime, weights: Mapping[str, float] | None = None,
                 threshold: float | None = None) -> None:
        self.rt = runtime
        self.spec = runtime.spec
        self.weights = weights
        self.threshold = threshold
        self.model_name = runtime.bundle.name
        self.model_version = str(runtime.bundle.version)
        cal = runtime.bundle.calibration
        self.target_fpr = None if cal is None else cal.target_fpr
        self.full_scale = map_full_scale(self.spec, cal)

    def run(self, chunks: Iterator[Decoded], maps: bool = False, repaired: bool = False,
            only_outliers: bool = False) -> Iterator[tuple[Decoded, ChunkResult | None]]:
        for chunk in chunks:
            if not chunk.ok:
                yield chunk, None
                continue
            fwd = self.rt.forward_chunked(chunk.batch)
            res = self.rt.score_forward(fwd, self.weights, self.threshold)
            res = res.with_inputs(self.spec, chunk.sizes, chunk.conversions)
            k = len(chunk.ok)
            wanted = res.is_outlier if only_outliers else np.ones(k, bool)
            out = ChunkResult(
                score=np.asarray(res.score, np.float64),
                is_outlier=np.asarray(res.is_outlier, bool),
                tail_probability=np.asarray(res.tail_probability, np.float64),
                threshold=np.full(k, res.threshold, np.float64),
                components={n: np.asarray(v, np.float64) for n, v in res.components.items()},
            )
            if maps:
                out.maps = [map_to_uint8(res.map_at_input(i), self.full_scale) if wanted[i] else None for i in range(k)]
            if repaired:
                out.repaired = self._repair(chunk, res, wanted)
            yield chunk, out

    def _repair(self, chunk: Decoded, res: Any, wanted: np.ndarray) -> list[np.ndarray | None]:
        assert chunk.originals is not None  # the pool keeps them when repairs are asked for
        idx = np.flatnonzero(wanted)
        out: list[np.ndarray | None] = [None] * len(chunk.ok)
        if len(idx):
            sub = _select(res, idx)
            fixed, _ = self.rt.repair([chunk.originals[i] for i in idx], scored=sub)
            for j, img in zip(idx, fixed, strict=True):
                out[j] = img
        return out


def _select(res: Any, idx: np.ndarray) -> Any:
    """A ScoreResult restricted to the images ``idx``."""
    return dataclasses.replace(
        res,
        score=res.score[idx], is_outlier=res.is_outlier[idx], tail_probability=res.tail_probability[idx],
        components={k: v[idx] for k, v in res.components.items()}, anomaly_map=res.anomaly_map[idx],
        reconstruction=None, regions=res.regions[idx], input_sizes=res.input_sizes[idx],
        conversions=[res.conversions[i] for i in idx],
    )


class RemoteScorer(Scorer):
    """A ``vaegan serve`` server through ``ScoreStream`` (the Python client, one stream).

    Images go as uint8 tensors at model size, decoded and resized here exactly as the server
    would; with repairs asked for, as the decoded originals (the server repairs at input size).
    """

    def __init__(self, client: OutlierClient, weights: Mapping[str, float] | None = None,
                 threshold: float | None = None, timeout: float | None = None) -> None:
        self.client = client
        self.weights = weights
        self.threshold = threshold
        self.timeout = timeout
        info = client.model_info()
        self.spec = ImageSpec(info.channels, info.height, info.width, resize=info.resize)
        self.model_name = info.name
        self.model_version = info.version
        self.target_fpr = info.target_fpr if info.calibrated else None
        self.max_batch = info.max_images_per_request or None
        self.full_scale = info.raw.anomaly_map_full_scale or map_full_scale(self.spec)

    def run(self, chunks: Iterator[Decoded], maps: bool = False, repaired: bool = False,
            only_outliers: bool = False) -> Iterator[tuple[Decoded, ChunkResult | None]]:
        sent: collections.deque[Decoded] = collections.deque()  # in order, with and without images

        def requests() -> Iterator[tuple[list[str], Any]]:
            for chunk in chunks:
                sent.append(chunk)
                if chunk.ok:
                    images = chunk.originals if repaired else chunk.batch
                    yield [str(i) for i in chunk.ok], images

        stream = self.client.score_stream(
            requests(), with_ids=True, anomaly_maps=maps, repaired=repaired,
            weights=self.weights, threshold=self.threshold, timeout=self.timeout,
        )
        for results in stream:
            while not sent[0].ok:  # chunks with nothing to send come back as they are
                yield sent.popleft(), None
            chunk = sent.popleft()
            yield chunk, self._result(chunk, results, maps, repaired, only_outliers)
        while sent:
            yield sent.popleft(), None

    def _result(self, chunk: Decoded, results: Sequence[Any], maps: bool, repaired: bool,
                only_outliers: bool) -> ChunkResult:
        k = len(results)
        if k != len(chunk.ok):
            raise RuntimeError(f"the server answered {k} results for {len(chunk.ok)} images")
        names = [n for n in ALL_COMPONENTS if n in results[0].components]
        out = ChunkResult(
            score=np.array([r.score for r in results], np.float64),
            is_outlier=np.array([r.is_outlier for r in results], bool),
            tail_probability=np.array([r.tail_probability for r in results], np.float64),
            threshold=np.array([r.threshold for r in results], np.float64),
            components={n: np.array([r.components[n] for r in results], np.float64) for n in names},
        )
        wanted = out.is_outlier if only_outliers else np.ones(k, bool)
        if maps:
            out.maps = [
                map_to_uint8(map_to_input(r.anomaly_map, int(h), int(w), self.spec), self.full_scale) if wanted[i] else None
                for i, (r, (h, w)) in enumerate(zip(results, chunk.sizes, strict=True))
            ]
        if repaired:
            out.repaired = [r.repaired if wanted[i] else None for i, r in enumerate(results)]
        return out


# ---- rows -------------------------------------------------------------------------------------
def chunk_rows(items: Sequence[Item], chunk: Decoded, result: ChunkResult | None, schema: pa.Schema,
               model_name: str, model_version: str) -> pa.RecordBatch:
    """One output row per item of the chunk: scores where it decoded, its error where not."""
    n = len(items)
    nan = np.full(n, np.nan)
    cols: dict[str, Any] = {
        "id": [it.id for it in items],
        "model_name": [model_name] * n,
        "model_version": [model_version] * n,
    }
    valid = np.zeros(n, bool)
    valid[chunk.ok] = True
    ok = np.asarray(chunk.ok, np.int64)

    def spread(values: np.ndarray | None) -> pa.Array:
        full = nan.copy()
        if values is not None and len(ok):
            full[ok] = values
        return pa.array(full, pa.float64(), mask=~valid if values is not None else np.ones(n, bool))

    comps = result.components if result is not None else {}
    cols["score"] = spread(result.score if result else None)
    flags = np.zeros(n, bool)
    if result is not None and len(ok):
        flags[ok] = result.is_outlier
    cols["is_outlier"] = pa.array(flags, pa.bool_(), mask=~valid)
    cols["tail_probability"] = spread(result.tail_probability if result else None)
    for name in ALL_COMPONENTS:
        cols[name] = spread(comps.get(name) if result else None)
    cols["threshold"] = spread(result.threshold if result else None)
    cols["error"] = [chunk.errors.get(i) for i in range(n)]
    for f in schema:
        if f.name not in cols:
            cols[f.name] = pa.array([it.extra.get(f.name) for it in items], f.type)
    return pa.RecordBatch.from_pydict({f.name: cols[f.name] for f in schema}, schema=schema)


def chunked(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---- the Python API ---------------------------------------------------------------------------
def score_files(
    paths: Sequence[str | Path],
    runtime: Runtime,
    *,
    ids: Sequence[str] | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    weights: Mapping[str, float] | None = None,
    threshold: float | None = None,
) -> Iterator[pa.RecordBatch]:
    """Score image files in process; yields one :class:`pyarrow.RecordBatch` per ``batch_size``
    files, in order, with the ``vaegan score`` schema (ids default to the paths as given).

    Decoding runs in ``workers`` processes (default: cores - 1; 0 decodes here). A file that
    cannot be read gets a row with its ``error`` and null scores; nothing is raised for it.
    """
    names = [str(p) for p in paths] if ids is None else [str(i) for i in ids]
    if len(names) != len(paths):
        raise ValueError(f"got {len(names)} ids for {len(paths)} paths")
    items = [Item(i, str(p)) for i, p in zip(names, paths, strict=True)]
    scorer = LocalScorer(runtime, weights, threshold)
    schema = output_schema()
    groups = list(chunked(items, batch_size))
    with DecodePool(scorer.spec, default_workers() if workers is None else workers) as pool:
        decoded = pool.map([it.path for it in g] for g in groups)
        for group, (chunk, result) in zip(groups, scorer.run(decoded), strict=True):
            yield chunk_rows(group, chunk, result, schema, scorer.model_name, scorer.model_version)
