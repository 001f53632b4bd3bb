"""Parquet and Arrow shards read as JSON lines, one row at a time.

Each row becomes the JSON object of its columns, numbered from 1 within its file, so the
rest of the data path (format detection, `fields`, validation, accounting, dedup, rejects
with file and line) treats a Parquet or Arrow row exactly as a JSONL line. Rows are read a
record batch at a time (`ParquetFile.iter_batches`, Arrow IPC batch by batch), so memory
stays bounded whatever the file's size.

Never a crash: a value JSON cannot hold (bytes, a timestamp, a decimal) makes that row a
reject; a file that is cut short or corrupt keeps the rows read before the break, and the
break is one more row, carrying the reason. Arrow files may be IPC streams (what
`datasets.save_to_disk` writes) or IPC files (Feather v2).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

TABLE_SUFFIXES = (".parquet", ".arrow")
BATCH_ROWS = 1024  # rows decoded per record batch
ROWS_PER_STEP = 128  # rows turned into Python objects at a time
ARROW_FILE_MAGIC = b"ARROW1"

Row = tuple[int, bytes, int, str]  # (number, raw JSON bytes, size, error): a Line's fields


def is_table(path: str) -> bool:
    return path.endswith(TABLE_SUFFIXES)


def table_rows(f: pa.NativeFile, path: str, max_bytes: int,
               transient: tuple[str, ...] = ()) -> Iterator[Row]:
    """Every row of the Parquet or Arrow file `f` (opened for random access) as a JSON line.

    `raw` holds at most `max_bytes + 1` bytes (the full size is kept for the reject
    reason). A read error whose message holds one of `transient` is raised, for Ray Data
    to retry the file; any other error ends the file with a break row."""
    number = 0
    try:
        if f.size() == 0:
            return  # an empty file has no records, as an empty JSONL shard
        for batch in _batches(f, path):
            for start in range(0, batch.num_rows, ROWS_PER_STEP):
                for raw, error in _rows_json(batch.slice(start, ROWS_PER_STEP)):
                    number += 1
                    yield number, raw[: max_bytes + 1], len(raw), error
    except Exception as err:
        if any(pattern in str(err) for pattern in transient):
            raise
        kind = "Parquet" if path.endswith(".parquet") else "Arrow"
        yield (number + 1, b"", 0,
               f"{kind} file truncated or corrupt: {type(err).__name__}: {str(err)[:300]}")


def _batches(f: pa.NativeFile, path: str) -> Iterator[pa.RecordBatch]:
    if path.endswith(".parquet"):
        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        return
    magic = f.read(len(ARROW_FILE_MAGIC))
    f.seek(0)
    if magic == ARROW_FILE_MAGIC:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    yield from pa.ipc.open_stream(f)


def _rows_json(batch: pa.RecordBatch) -> Iterator[tuple[bytes, str]]:
    """(JSON bytes, reject reason) of each row of a small batch."""
    try:
        rows = batch.to_pylist()
    except Exception:  # noqa: BLE001 - find the rows that cannot be decoded, one by one
        rows = None
    if rows is None:
        for i in range(batch.num_rows):
            try:
                yield from _rows_json_of(batch.slice(i, 1).to_pylist())
            except Exception as err:  # noqa: BLE001
                yield b"", f"row cannot be decoded: {type(err).__name__}: {str(err)[:300]}"
        return
    yield from _rows_json_of(rows)


def _rows_json_of(rows: list[dict[str, Any]]) -> Iterator[tuple[bytes, str]]:
    for row in rows:
        try:
            yield _dumps(row), ""
        except (TypeError, ValueError, RecursionError):
            column, value = next(((k, v) for k, v in row.items() if not _jsonable(v)),
                                 ("?", None))
            reason = (f"column {column!r} holds {_kind(value)}, which a JSON record cannot "
                      "hold (text columns only)")
            yield _dumps(row, default=lambda v: f"<{type(v).__name__}>"), reason


def _dumps(row: dict[str, Any], default=None) -> bytes:
    # surrogatepass: a lone surrogate becomes invalid UTF-8, rejected as such downstream
    return json.dumps(row, ensure_ascii=False, default=default).encode("utf-8", "surrogatepass")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _kind(value: Any) -> str:
    """What a value that JSON cannot hold is, for the reject reason."""
    if isinstance(value, (bytes, bytearray)):
        return "binary data (bytes)"
    if isinstance(value, dict):
        inner = next((v for v in value.values() if not _jsonable(v)), None)
        return f"a struct with {_kind(inner)}"
    if isinstance(value, (list, tuple)):
        inner = next((v for v in value if not _jsonable(v)), None)
        return f"a list with {_kind(inner)}"
    return f"a {type(value).__name__} value"
