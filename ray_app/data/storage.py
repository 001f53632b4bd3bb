"""Local paths and object-storage URIs (s3://, gs://, abfs://) through pyarrow filesystems,
and Hugging Face Hub files (hf://) through huggingface_hub's.

Credentials come from each filesystem's usual environment and config files (AWS_*
variables and ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...); they are never logged.
pyarrow's S3 client retries transient failures (5xx, SlowDown, timeouts, dropped
connections) with backoff (the AWS standard strategy, 3 attempts); Ray Train uploads
checkpoints through the same client. An S3-compatible server (MinIO, moto, ...) is
reached through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if uri.startswith("hf://"):
        from ray_app.data.hub import hub_pyarrow_filesystem

        return hub_pyarrow_filesystem(), uri.removeprefix("hf://")
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
    """Writes `text` so that readers see the old content or all of the new, never a part:
    see `write_bytes`."""
    write_bytes(uri, text.encode())


def write_bytes(uri: str, data: bytes) -> None:
    """Replaces the file at `uri` with `data`, atomically.

    Locally: a temporary file in the same folder, flushed to disk, renamed over the target
    (os.replace), so a killed writer leaves the old file or the new one. On object storage
    an object appears only when its upload completes, which pyarrow does on close(); but it
    closes (and so publishes) also when an exception leaves a `with` block or the stream is
    garbage-collected, and it has no abort. So the bytes are complete before the stream is
    opened, and one write hands them over whole."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        _replace_local(path, data)
        return
    out = fs.open_output_stream(path)
    out.write(data)
    out.close()


def create_once(uri: str, data: bytes) -> bool:
    """Writes `data` to `uri` unless a file is there already; True when this call wrote it.

    Locally exact among concurrent writers: the complete temporary file is hard-linked to
    the name, which fails when the name exists. Object storage through pyarrow has no
    conditional put: the check and the write are two requests, so two writers within the
    same moment may both write (each object is complete; the last one stays)."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        if fs.get_file_info(path).type == pafs.FileType.File:
            return False
        write_bytes(uri, data)
        return True
    tmp = _temp_file(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _replace_local(path: str, data: bytes) -> None:
    tmp = _temp_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _temp_file(path: str, data: bytes) -> str:
    """A complete, fsynced copy of `data` next to `path`, under a name no other writer uses."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def list_dirs(uri: str) -> list[str]:
    """Names of the folders directly inside `uri` (none when it does not exist)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


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
