"""A Ray Data datasource that streams JSONL shards line by line, keeping file and line.

`ray.data.read_json` fails a whole read on the first malformed line and forgets where
each record came from; this reader hands every raw line on with its source file, line
number and the file's format (given, or detected from its first lines), so that nothing
is lost and every reject can be reported precisely. Compression (.gz, .zst) is inferred
from the file name; object-storage URIs go through pyarrow's filesystems.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from ray.data.block import Block
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from ray_app.data.formats import detect_format

ROWS_PER_BLOCK = 2048
DETECT_LINES = 50  # lines looked at to detect a file's format

SCHEMA = pa.schema([("source", pa.string()), ("source_id", pa.int32()), ("line", pa.int64()),
                    ("text", pa.string()), ("bad_utf8", pa.bool_()), ("num_bytes", pa.int64()),
                    ("file_format", pa.string()), ("role", pa.string())])


@dataclass(frozen=True)
class FileMeta:
    """What the reader needs to know about one shard."""

    source_id: int  # index in the sorted list of all shards: orders records for dedup
    role: str  # "train" or "eval" (an explicit eval shard)
    format: str  # "auto" or a format name
    fields: dict[str, str] = field(default_factory=dict)


class JsonlLinesDatasource(FileBasedDatasource):
    def __init__(self, paths: list[str], meta: dict[str, FileMeta], max_record_bytes: int,
                 **kwargs):
        super().__init__(paths, **kwargs)
        self._meta = {**meta, **{uri_tail(p): m for p, m in meta.items()}}
        # Reported under the name the user gave (s3://b/x.jsonl), not pyarrow's (b/x.jsonl).
        self._names = {**{p: p for p in meta}, **{uri_tail(p): p for p in meta}}
        self._max_bytes = max_record_bytes

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[Block]:
        meta = self._meta.get(path) or self._meta[uri_tail(path)]
        lines = _lines(f, self._max_bytes)
        head: list[tuple[int, bytes, int]] = []
        fmt = meta.format
        if fmt == "auto":
            for item in lines:  # buffer the head of the file to detect its format
                head.append(item)
                if len(head) >= DETECT_LINES:
                    break
            fmt = file_format_of([r for r in (_try_json(raw) for _, raw, _ in head)
                                  if r is not None], meta.fields)
        rows: list[dict] = []
        for number, raw, size in _chain(head, lines):
            try:
                text, bad = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                text, bad = raw.decode("utf-8", errors="replace"), True
            text = text.rstrip("\r")  # CRLF files
            if not text.strip():
                continue  # blank lines are layout, not records
            rows.append({"source": self._names.get(path, path), "source_id": meta.source_id, "line": number,
                         "text": text, "bad_utf8": bad, "num_bytes": size, "file_format": fmt,
                         "role": meta.role})
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)


def uri_tail(path: str) -> str:
    return path.split("://", 1)[-1]


def file_format_of(first_records: list[dict], fields: dict[str, str] | None = None) -> str:
    """The format of a file, from its first parseable records ('' when none match)."""
    for record in first_records:
        fmt = detect_format(record, fields)
        if fmt:
            return fmt
    return ""


def _chain(head, rest):
    yield from head
    yield from rest


def _lines(f: pa.NativeFile, max_bytes: int,
           chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes, int]]:
    """(1-based line number, raw bytes, size in bytes), streaming. A line longer than
    `max_bytes` keeps only its first `max_bytes + 1` bytes, so a giant line cannot exhaust
    memory; its full size is reported for the reject reason."""
    number = 0
    pending = bytearray()
    pending_size = 0
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if len(pending) <= max_bytes:
                pending += piece[: max_bytes + 1 - len(pending)]
            pending_size += len(piece)
            if end < 0:
                break
            number += 1
            yield number, bytes(pending), pending_size
            pending, pending_size = bytearray(), 0
            start = end + 1
    if pending_size:
        yield number + 1, bytes(pending), pending_size


def _try_json(raw: bytes):
    try:
        value = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
