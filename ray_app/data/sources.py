"""Expands the user's data paths (files, folders, globs, URIs) into concrete shard files."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from ray_app.errors import UserError

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def is_uri(path: str) -> bool:
    return "://" in path


def expand_sources(patterns: list[str], key: str = "data.train") -> list[str]:
    """Every shard named by `patterns`, sorted and de-duplicated, or a UserError naming the
    pattern that matched nothing."""
    files: list[str] = []
    for pattern in patterns:
        found = _expand_uri(pattern, key) if is_uri(pattern) else _expand_local(pattern)
        if not found:
            raise UserError(
                f"{key}: {pattern!r} matches no JSONL shard (looked for files ending in "
                f"{', '.join(SHARD_SUFFIXES)}). Check the path, or that the folder is mounted "
                "on every node of the cluster."
            )
        files += found
    return sorted(dict.fromkeys(files))


def _is_shard(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def _expand_local(pattern: str) -> list[str]:
    path = Path(os.path.expanduser(pattern))
    if path.is_dir():
        return [str(p.resolve()) for p in sorted(path.rglob("*")) if p.is_file() and _is_shard(p.name)]
    if path.is_file():
        return [str(path.resolve())]
    return [str(Path(p).resolve()) for p in sorted(glob.glob(str(path), recursive=True))
            if Path(p).is_file() and _is_shard(p)]


def _expand_uri(pattern: str, key: str) -> list[str]:
    import fnmatch

    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(pattern.split("*")[0].rsplit("/", 1)[0]
                                            if "*" in pattern else pattern)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many kinds for bad URIs
        raise UserError(f"{key}: cannot open {pattern!r}: {err}") from None
    scheme = pattern.split("://", 1)[0]
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [pattern]
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{key}: cannot list {pattern!r}: {err}") from None
    uris = [f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File and _is_shard(i.path)]
    if "*" in pattern:
        uris = [u for u in uris if fnmatch.fnmatch(u, pattern)]
    return sorted(uris)
