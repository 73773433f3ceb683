"""Batch scoring: ``vaegan score`` and its Python API.

    from service.batch import score_files
    for batch in score_files(paths, Runtime.load("runs/parts/bundle")):  # pyarrow.RecordBatch
        ...

Decoding runs in worker processes, scoring in process (the same runtime the server runs) or on a
``vaegan serve`` server; output goes to crash-safe Parquet part files, so a killed job resumes
where it stopped. Needs pyarrow (the ``batch`` extra).
"""

from service.batch.inputs import IMAGE_EXTENSIONS, InputError, Item, resolve_inputs, shard_of
from service.batch.score import score_files
from service.batch.table import BASE_COLUMNS, merge_tables, output_schema, read_table

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
