"""A Ray Data datasource that streams JSONL shards line by line, keeping file and line.

`ray.data.read_json` fails a whole read on the first malformed line and forgets where
each record came from; this reader hands every raw line on with its source file, line
number and the file's format (given, or detected from its first lines), so that nothing
is lost and every reject can be reported precisely. Compression (.gz, .zst) follows the
file name and is decoded by `ray_app.data.decompress`: a truncated or corrupt file keeps
its lines up to the break, and the break is one more line, carrying the reason in `error`.
Parquet and Arrow shards (Hugging Face datasets) are read by `ray_app.data.tables`, each row
as the JSON line of its columns. Object-storage URIs go through pyarrow's filesystems, Hub
(hf://) files through `huggingface_hub.HfFileSystem`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa
from ray.data.block import Block
from ray.data.datasource.file_based_datasource import FileBasedDatasource

from ray_app.data.decompress import StreamBreak, codec_of, decompressed
from ray_app.data.formats import detect_format
from ray_app.data.tables import is_table, table_rows

ROWS_PER_BLOCK = 2048
DETECT_LINES = 50  # lines looked at to detect a file's format

SCHEMA = pa.schema([("source", pa.string()), ("source_id", pa.int32()), ("line", pa.int64()),
                    ("text", pa.string()), ("bad_utf8", pa.bool_()), ("num_bytes", pa.int64()),
                    ("file_format", pa.string()), ("role", pa.string()),
                    ("error", pa.string())])  # the reason a file breaks off at this line
BOM = b"\xef\xbb\xbf"


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

    def resolve_compression(self, path: str, open_args: dict) -> None:
        return None  # raw bytes: `_read_stream` decompresses, so a broken file is a reject

    def _open_input_source(self, filesystem, path: str, **open_args) -> pa.NativeFile:
        if is_table(path):  # Parquet and Arrow files need random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[Block]:
        meta = self._meta.get(path) or self._meta[uri_tail(path)]
        if is_table(path):
            lines = (Line._make(row) for row in table_rows(f, path, self._max_bytes,
                                                           tuple(_transient_errors())))
        else:
            lines = _lines(decompressed(_raw_reader(f), codec_of(path)), self._max_bytes)
        head: list[Line] = []
        fmt = meta.format
        if fmt == "auto":
            for item in lines:  # buffer the head of the file to detect its format
                head.append(item)
                if len(head) >= DETECT_LINES:
                    break
            fmt = file_format_of([r for r in (_try_json(x.raw) for x in head if not x.error)
                                  if r is not None], meta.fields)
        rows: list[dict] = []
        for line in _chain(head, lines):
            if not line.error and is_blank(line):
                continue  # blank lines are layout, not records
            try:
                text, bad = line.raw.decode("utf-8"), False
            except UnicodeDecodeError:
                text, bad = line.raw.decode("utf-8", errors="replace"), True
            rows.append({"source": self._names.get(path, path), "source_id": meta.source_id,
                         "line": line.number, "text": text.rstrip("\r"),  # CRLF files
                         "bad_utf8": bad, "num_bytes": line.size, "file_format": fmt,
                         "role": meta.role, "error": line.error})
            if len(rows) >= ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)


class Line(NamedTuple):
    number: int  # 1-based
    raw: bytes  # at most max_bytes + 1 bytes of the line, without its newline
    size: int  # the line's full size in bytes
    error: str = ""  # why the file cannot be read from this line on ("" for a normal line)


def is_blank(line: Line) -> bool:
    """Only spaces, tabs, CRs (and a byte-order mark): layout, not a record. A line cut at
    max_bytes is never blank: what follows its blank start is unknown."""
    return line.size == len(line.raw) and not line.raw.removeprefix(BOM).strip(b" \t\r")


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


def _raw_reader(f: pa.NativeFile):
    """f.read, where a read error that Ray Data does not retry (a permission or disk error,
    a file removed while being read) ends the file with a reported break instead of failing
    the whole read; the transient ones (DataContext.retried_io_errors) are raised for Ray
    Data to retry the file."""
    transient = _transient_errors()

    def read(n: int) -> bytes:
        try:
            return f.read(n)
        except OSError as err:
            if any(pattern in str(err) for pattern in transient):
                raise
            raise StreamBreak(f"file could not be read: {err}") from None

    return read


def _transient_errors() -> list[str]:
    from ray.data.context import DataContext

    return list(DataContext.get_current().retried_io_errors)


def _lines(chunks: Iterable[bytes], max_bytes: int) -> Iterator[Line]:
    """The lines of a stream of byte chunks, streaming. A line longer than `max_bytes` keeps
    only its first `max_bytes + 1` bytes, so a giant line cannot exhaust memory; its full
    size is kept for the reject reason. When the stream breaks (StreamBreak), the bytes
    after the last newline are not a line: the last item is the break, numbered as the
    line that was being read, with those bytes and the reason."""
    number = 0
    pending = bytearray()
    pending_size = 0
    try:
        for chunk in chunks:
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
                yield Line(number, bytes(pending), pending_size)
                pending, pending_size = bytearray(), 0
                start = end + 1
    except StreamBreak as err:
        yield Line(number + 1, bytes(pending), pending_size, str(err))
        return
    if pending_size:
        yield Line(number + 1, bytes(pending), pending_size)


def _try_json(raw: bytes):
    """The line as a dict, or None; never raises (format detection must survive any line)."""
    try:
        value = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge ints, deep nesting
        return None
    return value if isinstance(value, dict) else None
