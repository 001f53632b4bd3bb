"""Local paths and object-storage URIs (s3://, gs://, abfs://) through pyarrow filesystems.

Credentials come from each filesystem's usual environment and config files (AWS_*
variables and ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...); they are never logged.
pyarrow's S3 client retries transient failures (5xx, SlowDown, timeouts, dropped
connections) with backoff (the AWS standard strategy, 3 attempts); Ray Train uploads
checkpoints through the same client. An S3-compatible server (MinIO, moto, ...) is
reached through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join_uri(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if name else base


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def remove_dir(uri: str) -> None:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def write_text(uri: str, text: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as src:
        return src.read().decode()


def stamp(uri: str) -> str:
    """Size and modification time: part of the cache fingerprint."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return f"{info.size}:{info.mtime_ns}"


def copy_to_local(uri: str, target: os.PathLike) -> None:
    """Streams a file from a path or URI to a local file."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as src, open(target, "wb") as out:
        while chunk := src.read(1 << 20):
            out.write(chunk)
