"""Decompression of shards, done here rather than by pyarrow, so that a broken file becomes
a reported break instead of a failed read.

pyarrow raises the same OSError for a truncated or corrupt stream as for a network error,
drops what it had decoded in its last read, and Ray Data then fails the whole read.
Decoding here tells them apart: a raw read error passes through unchanged (Ray Data
retries the transient ones), while a decoding error or an early end raises `StreamBreak`
after every byte that could be decoded has been yielded. Each step's output is bounded,
so a decompression bomb cannot exhaust memory.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator

import zstandard

READ_SIZE = 1 << 20  # raw bytes per read
GZIP_OUT = 1 << 20  # most decoded bytes per gzip step
# zstd decodes a whole input piece at once, and a 4-byte RLE block can stand for 128 KiB:
# pieces of 1 KiB bound a step's output at about 32 MiB and cost nothing measurable.
ZSTD_PIECE = 1024
TRUNCATED = ("compressed stream truncated or corrupt: the file ends inside a compressed "
             "block (cut short while copying or writing?)")


class StreamBreak(Exception):
    """The rest of the file cannot be read; the message is the reject reason."""


def codec_of(path: str) -> str:
    """'gzip', 'zstd' or '' (plain): compression follows the file name."""
    return "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else ""


def decompressed(read: Callable[[int], bytes], codec: str) -> Iterator[bytes]:
    """The decoded bytes of a stream, chunk by chunk; `read(n)` returns raw bytes, b'' at
    the end. Concatenated gzip members and zstd frames (`cat a.gz b.gz`, parallel
    compressors) are read one after another. An empty file is an empty stream."""
    raw = iter(lambda: read(READ_SIZE), b"")
    if codec == "gzip":
        return _gunzip(raw)
    if codec == "zstd":
        return _unzstd(raw)
    return raw


def _gunzip(raw: Iterator[bytes]) -> Iterator[bytes]:
    d, inside = zlib.decompressobj(wbits=31), False
    for data in raw:
        while data:
            try:
                out = d.decompress(data, GZIP_OUT)
            except zlib.error as err:
                raise StreamBreak(f"compressed stream truncated or corrupt: gzip: {err}") from None
            inside = True
            yield out
            if d.eof:  # bytes after this member start the next one
                data, d, inside = d.unused_data, zlib.decompressobj(wbits=31), False
            else:
                data = d.unconsumed_tail
    if inside:
        raise StreamBreak(TRUNCATED)


def _unzstd(raw: Iterator[bytes]) -> Iterator[bytes]:
    new = zstandard.ZstdDecompressor().decompressobj
    d, inside = new(), False
    for data in raw:
        view, pos = memoryview(data), 0
        while pos < len(view):
            piece = view[pos:pos + ZSTD_PIECE]
            try:
                out = d.decompress(piece)
            except zstandard.ZstdError as err:
                raise StreamBreak(f"compressed stream truncated or corrupt: zstd: {err}") from None
            inside, pos = True, pos + len(piece)
            yield out
            if d.eof:  # bytes after this frame start the next one
                pos -= len(d.unused_data)
                d, inside = new(), False
    if inside:
        raise StreamBreak(TRUNCATED)
