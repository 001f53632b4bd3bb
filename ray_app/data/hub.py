"""Hugging Face datasets as sources: `save_to_disk` folders and Hub ids, as shard lists.

Both end as a list of Parquet or Arrow files that `ray_app.data.tables` reads row by row,
so a Hugging Face dataset is accounted, deduplicated and ordered like any JSONL shard.

- A `save_to_disk` folder holds `state.json` (its Arrow files, in order) and
  `dataset_info.json`; a DatasetDict holds `dataset_dict.json` and one such folder per split.
- A Hub id `hf://datasets/ORG/NAME`, with a `subset` (the config name of
  `datasets.load_dataset`), a `split` and a `revision`, is listed through
  `huggingface_hub.HfFileSystem` the way the Hub lays a repository out: the `configs` of
  the README's YAML header, or else the split names in file and folder names
  (`data/train-00000-of-00002.parquet`, `test/x.jsonl`). A repository without readable
  shards for that split (CSV, a loading script) is read from the Parquet files the Hub
  converts every dataset to (revision `refs/convert/parquet`, `<subset>/<split>/0000.parquet`).
  The revision is pinned to its commit when listed, so the files, the record ids and the
  cache key stay the same while the branch moves on.

Credentials: `HF_TOKEN` or the token `huggingface-cli login` stores, on every node.
"""

from __future__ import annotations

import fnmatch
import json
import re
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs
import yaml

from ray_app.config import HUB_PREFIX, hub_id_problem
from ray_app.errors import UserError

PARQUET_REVISION = "refs/convert/parquet"
SAVED_METADATA = ("dataset_info.json", "state.json", "dataset_dict.json")
# The Hub's split keywords (datasets.data_files), in the order a file is assigned.
SPLIT_KEYWORDS = {"train": ("train", "training"),
                  "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}
EVAL_SPLITS = ("validation", "test")  # tried in this order for data.eval without `split`
_DATA_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv", ".tsv", ".txt",
                  ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".csv.gz", ".zip")


def is_hub(path: str) -> bool:
    return path.startswith("hf://")


def repo_of(path: str) -> str:
    """ORG/NAME of a Hub id; a UserError when it is not one."""
    problem = hub_id_problem(path)
    if problem:
        raise UserError(f"{path!r}: {problem}.")
    return path[len(HUB_PREFIX):].rstrip("/")


def hub_uri(repo: str, revision: str, path_in_repo: str) -> str:
    """The hf:// URI of a file at a revision, as HfFileSystem names it."""
    return f"{HUB_PREFIX}{repo}@{quote(revision, safe='')}/{path_in_repo}"


def hub_filesystem():
    """HfFileSystem, the fsspec filesystem of the Hub (token from the environment)."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def hub_pyarrow_filesystem() -> pafs.FileSystem:
    """The Hub as a pyarrow filesystem, for Ray Data's readers (paths without hf://)."""
    return pafs.PyFileSystem(pafs.FSSpecHandler(hub_filesystem()))


def expand_hub(path: str, *, subset: str | None, split: str | None, revision: str | None,
               role: str, key: str, fs: Any = None) -> list[str]:
    """The hf:// URIs of the shards of one subset and split of a Hub dataset.

    `fs`: an fsspec filesystem laid out as HfFileSystem (`datasets/ORG/NAME@REV/...`); by
    default the Hub itself, whose revision is then pinned to its commit."""
    repo = repo_of(path)
    pin = fs is None
    fs = fs if fs is not None else hub_filesystem()
    revisions = [revision] if revision else ["main", PARQUET_REVISION]
    problems: list[str] = []
    for rev in revisions:
        try:
            commit = _commit(repo, rev, key) if pin else rev
        except UserError as err:
            if revision or rev != PARQUET_REVISION:  # no such dataset, offline, no access
                raise
            problems.append(f"revision {rev!r}: not converted ({str(err).split(': ', 3)[-1]})")
            continue
        root = f"datasets/{repo}@{quote(commit, safe='')}"
        try:
            files = sorted(f[len(root) + 1:] for f in fs.find(root))
        except FileNotFoundError as err:
            problems.append(f"revision {rev!r}: {err}")
            continue
        except Exception as err:  # noqa: BLE001 - network and auth errors of many kinds
            raise UserError(f"{key}: cannot list {path} at revision {rev!r}: {err}. Check the "
                            "id and the revision; a private or gated dataset needs HF_TOKEN on "
                            "every node.") from None
        layout = (converted_layout(files) if rev == PARQUET_REVISION
                  else repo_layout(files, _readme(fs, root, files)))
        chosen = pick(layout, subset, split, role, f"{key}: {path} (revision {rev!r})")
        shards = [f for f in chosen if f.endswith(_readable())]
        if shards:
            return [hub_uri(repo, commit, f) for f in shards]
        problems.append(f"revision {rev!r}: {', '.join(chosen[:5]) or 'no data files'} "
                        "(no Parquet, Arrow or JSONL file)")
    raise UserError(f"{key}: {path} has no shard this app can read for subset "
                    f"{subset or 'default'!r}, split {split or 'default'!r}: "
                    f"{'; '.join(problems)}.")


def _commit(repo: str, revision: str, key: str) -> str:
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception as err:  # noqa: BLE001 - not found, gated, offline: all say the same fix
        raise UserError(f"{key}: cannot open {HUB_PREFIX}{repo} at revision {revision!r}: "
                        f"{type(err).__name__}: {err}. Check the id and the revision; a private "
                        "or gated dataset needs HF_TOKEN (or `huggingface-cli login`) on every "
                        "node.") from None


def _readable() -> tuple[str, ...]:
    from ray_app.data.sources import SHARD_SUFFIXES

    return SHARD_SUFFIXES


def _readme(fs: Any, root: str, files: list[str]) -> str:
    if "README.md" not in files:
        return ""
    with fs.open(f"{root}/README.md", "rb") as f:
        return f.read().decode("utf-8", errors="replace")


Layout = dict[str, dict[str, list[str]]]  # subset -> split -> files (repo-relative)


def repo_layout(files: list[str], readme: str = "") -> Layout:
    """The subsets and splits of a dataset repository's own files: the `configs` of its
    README header when it has them, else one subset `default` split by file names."""
    configs = _readme_configs(readme)
    data = [f for f in files if f.endswith(_DATA_SUFFIXES) and not _hidden(f)]
    if not configs:
        return {"default": _splits_by_name(data)}
    layout: Layout = {}
    for config in configs:
        name = str(config.get("config_name", "default"))
        data_files = config.get("data_files")
        if isinstance(data_files, (str, list)) and all(isinstance(d, str) for d in data_files):
            data_files = [{"split": "train", "path": data_files}]
        if isinstance(data_files, dict):
            data_files = [{"split": s, "path": p} for s, p in data_files.items()]
        splits: dict[str, list[str]] = {}
        for entry in data_files or []:
            patterns = entry.get("path", [])
            patterns = [patterns] if isinstance(patterns, str) else patterns
            splits[str(entry.get("split", "train"))] = [
                f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
        layout[name] = splits
    return layout


def converted_layout(files: list[str]) -> Layout:
    """The layout of the Hub's Parquet conversion: `<subset>/<split>/NNNN.parquet` (and
    `<subset>/partial-<split>/...` for a dataset converted in part)."""
    layout: Layout = {}
    for f in files:
        parts = f.split("/")
        if len(parts) == 3 and parts[2].endswith(".parquet"):
            split = parts[1].removeprefix("partial-")
            layout.setdefault(parts[0], {}).setdefault(split, []).append(f)
    return layout


def pick(layout: Layout, subset: str | None, split: str | None, role: str,
         what: str) -> list[str]:
    """The files of the chosen subset and split, or a UserError listing the ones there are."""
    if not layout or not any(layout.values()):
        return []
    if subset is None:
        names = sorted(layout)
        if len(names) > 1 and "default" not in layout:
            raise UserError(f"{what} has several subsets ({', '.join(names)}): choose one with "
                            f"subset:, e.g. {{path: ..., subset: {names[0]}}}.")
        subset = "default" if "default" in layout else names[0]
    if subset not in layout:
        raise UserError(f"{what} has no subset {subset!r}; its subsets: "
                        f"{', '.join(sorted(layout))}. Set subset: to one of them.")
    return layout[subset][_split_name(layout[subset], split, role, f"{what}, subset {subset!r}")]


def _split_name(splits: dict[str, Any], split: str | None, role: str, what: str) -> str:
    wanted = [split] if split else ["train"] if role == "train" else list(EVAL_SPLITS)
    for name in wanted:
        if name in splits:
            return name
    which = f"no split {split!r}" if split else f"no {' or '.join(map(repr, wanted))} split"
    raise UserError(f"{what} has {which}; its splits: {', '.join(sorted(splits)) or 'none'}. "
                    "Set split: to one of them.")


def _splits_by_name(files: list[str]) -> dict[str, list[str]]:
    """Files assigned to splits by the keywords in their folder and file names, as the Hub
    does for a repository without `configs`; all of them are `train` when none has one."""
    splits: dict[str, list[str]] = {}
    for f in files:
        parts = f.split("/")
        for split, words in SPLIT_KEYWORDS.items():
            if any(re.search(rf"(^|[-._ 0-9]){w}([-._ 0-9]|$)", part)
                   for part in parts for w in words):
                splits.setdefault(split, []).append(f)
                break
    if not splits:
        return {"train": list(files)} if files else {}
    return splits


def _readme_configs(readme: str) -> list[dict]:
    if not readme.startswith("---"):
        return []
    header = readme[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(header) or {}
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _hidden(path: str) -> bool:
    return any(p.startswith((".", "_")) for p in path.split("/"))


def saved_dataset_files(fs: pafs.FileSystem, root: str, split: str | None, role: str,
                        what: str) -> list[str] | None:
    """The Arrow files of a `save_to_disk` folder (for a DatasetDict, of the chosen split:
    `split`, else `train` for data.train and `validation` or `test` for data.eval), in the
    order `datasets` reads them; None when `root` is not such a folder."""
    def read_json(name: str) -> dict | None:
        path = f"{root}/{name}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            try:
                value = json.loads(f.read())
            except ValueError as err:
                raise UserError(f"{what}: {path} is not valid JSON ({err}); the save_to_disk "
                                "folder is damaged: save it again.") from None
        return value if isinstance(value, dict) else {}

    splits = read_json("dataset_dict.json")
    if splits is not None:
        names = {str(s): s for s in splits.get("splits", [])}
        chosen = _split_name(names, split, role, f"{what} (a saved DatasetDict)")
        files = saved_dataset_files(fs, f"{root}/{chosen}", None, role, what)
        if files is None:
            raise UserError(f"{what}: the saved split {chosen!r} has no state.json; the "
                            "save_to_disk folder is damaged: save it again.")
        return files
    state = read_json("state.json")
    if state is None:
        return None
    own = state.get("_split")
    if split and own and own != split:
        raise UserError(f"{what} is the saved {own!r} split, not {split!r}: remove split:, or "
                        "point at the folder of that split.")
    return [f"{root}/{d['filename']}" for d in state.get("_data_files", [])
            if isinstance(d, dict) and "filename" in d]
