"""Expands the user's data paths (files, folders, globs, URIs, Hugging Face datasets) into
concrete shard files: JSONL, Parquet and Arrow."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.fs as pafs

from ray_app.data.hub import SAVED_METADATA, expand_hub, is_hub, saved_dataset_files
from ray_app.errors import UserError

SHARD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst",
                  ".parquet", ".arrow")


def is_uri(path: str) -> bool:
    return "://" in path


def expand_sources(patterns: list[str], key: str = "data.train", *, split: str | None = None,
                   subset: str | None = None, revision: str | None = None,
                   role: str = "train") -> list[str]:
    """Every shard named by `patterns`, sorted and de-duplicated, or a UserError naming the
    pattern that matched nothing.

    A `save_to_disk` folder gives its Arrow files (of `split` for a DatasetDict; default
    `train` for role "train", `validation` or `test` for "eval"); an hf://datasets/ORG/NAME
    id the files of its `subset`, `split` and `revision` (`ray_app.data.hub`)."""
    files: list[str] = []
    for pattern in patterns:
        if is_hub(pattern):
            found = expand_hub(pattern, subset=subset, split=split, revision=revision,
                               role=role, key=key)
        else:
            found = _expand_saved(pattern, split, role, key)
            if found is None and split:
                raise UserError(f"{key}: split: {split!r} applies to save_to_disk folders and "
                                f"hf:// ids, and {pattern!r} is neither. Remove split:, or list "
                                "the files of that split.")
            if found is None:
                found = _expand_uri(pattern, key) if is_uri(pattern) else _expand_local(pattern)
        if not found:
            raise UserError(
                f"{key}: {pattern!r} matches no JSONL shard, nor a Parquet or Arrow one (looked "
                f"for files ending in "
                f"{', '.join(SHARD_SUFFIXES)}). Check the path, or that the folder is mounted "
                "on every node of the cluster."
            )
        files += found
    return sorted(dict.fromkeys(files))


def _is_shard(name: str) -> bool:
    # The metadata files of a save_to_disk folder inside a folder are not records.
    return name.endswith(SHARD_SUFFIXES) and name.rsplit("/", 1)[-1] not in SAVED_METADATA


def _expand_saved(pattern: str, split: str | None, role: str, key: str) -> list[str] | None:
    """The Arrow files of a save_to_disk folder, or None when `pattern` is not one."""
    if "*" in pattern:
        return None
    try:
        if is_uri(pattern):
            fs, root = pafs.FileSystem.from_uri(pattern.rstrip("/"))
            prefix = pattern.split("://", 1)[0] + "://"
        else:
            path = Path(os.path.expanduser(pattern)).resolve()
            fs, root, prefix = pafs.LocalFileSystem(), str(path), ""
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return None
    except Exception:  # noqa: BLE001 - not openable here: _expand_uri says why
        return None
    files = saved_dataset_files(fs, root, split, role, f"{key}: {pattern!r}")
    return None if files is None else [prefix + f for f in files]


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
