"""Batch scoring: ``vaegan score`` and its Python API.

    from vaegan.service.batch import score_files
    for batch in score_files(paths, Runtime.load("runs/parts/bundle")):  # pyarrow.RecordBatch
        ...

Decoding runs in worker processes, scoring in process (the same runtime the server runs) or on a
``vaegan serve`` server; output goes to crash-safe Parquet part files, so a killed job resumes
where it stopped. Needs pyarrow (the ``batch`` extra). Names are imported on first use, so a
decode worker (``service.batch.decode``) loads neither pyarrow nor ONNX Runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vaegan.service.lazy import lazy_attributes

if TYPE_CHECKING:
    from vaegan.service.batch.inputs import (
        IMAGE_EXTENSIONS,
        InputError,
        Item,
        resolve_inputs,
        shard_of,
    )
    from vaegan.service.batch.score import score_files
    from vaegan.service.batch.table import BASE_COLUMNS, merge_tables, output_schema, read_table

_WHERE = {
    "IMAGE_EXTENSIONS": "inputs",
    "InputError": "inputs",
    "Item": "inputs",
    "resolve_inputs": "inputs",
    "shard_of": "inputs",
    "score_files": "score",
    "BASE_COLUMNS": "table",
    "merge_tables": "table",
    "output_schema": "table",
    "read_table": "table",
}

__all__ = [
    "BASE_COLUMNS",
    "IMAGE_EXTENSIONS",
    "InputError",
    "Item",
    "merge_tables",
    "output_schema",
    "read_table",
    "resolve_inputs",
    "score_files",
    "shard_of",
]


__getattr__ = lazy_attributes(__name__, _WHERE)
