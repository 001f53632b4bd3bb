"""A Ray Data datasource that streams JSONL shards line by line, keeping file and line.

`ray.data.read_json` fails a whole read on the first malformed line and forgets where
each record came from; this reader hands every raw line on with its source file, line
number and the file's detected format, so that nothing is lost and every reject can be
reported precisely. Compression (.gz, .zst) is inferred from the file name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
from ray.data.block import Block
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from ray_app.data.tokenize import file_format_of

ROWS_PER_BLOCK = 2048
DETECT_LINES = 50  # lines looked at to detect a file's format

SCHEMA = pa.schema([("source", pa.string()), ("line", pa.int64()), ("text", pa.string()),
                    ("bad_utf8", pa.bool_()), ("file_format", pa.string()), ("role", pa.string())])


class JsonlLinesDatasource(FileBasedDatasource):
    def __init__(self, paths: list[str], eval_paths: set[str] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self._eval_paths = eval_paths or set()

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[Block]:
        role = "eval" if path in self._eval_paths or _uri_tail(path) in self._eval_paths else "train"
        lines = _lines(f)
        head: list[tuple[int, bytes]] = []
        for item in lines:  # buffer the head of the file to detect its format
            head.append(item)
            if len(head) >= DETECT_LINES:
                break
        fmt = file_format_of([r for r in (_try_json(raw) for _, raw in head) if r is not None])
        rows: list[dict] = []
        for number, raw in _chain(head, lines):
            try:
                text, bad = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                text, bad = raw.decode("utf-8", errors="replace"), True
            text = text.rstrip("\r")  # CRLF files
            if not text.strip():
                continue  # blank lines are layout, not records
            rows.append({"source": path, "line": number, "text": text, "bad_utf8": bad,
                         "file_format": fmt, "role": role})
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)


def _uri_tail(path: str) -> str:
    return path.split("://", 1)[-1]


def _chain(head, rest):
    yield from head
    yield from rest


def _lines(f: pa.NativeFile, chunk_size: int = 1 << 20) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) without reading the whole file into memory."""
    number = 0
    pending = b""
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        parts = (pending + chunk).split(b"\n")
        pending = parts.pop()
        for part in parts:
            number += 1
            yield number, part
    if pending:
        yield number + 1, pending


def _try_json(raw: bytes):
    try:
        value = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
