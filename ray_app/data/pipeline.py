"""The data path: shards -> validated, tokenized, masked records (Parquet) -> train/eval datasets.

The tokenized records are written once, streaming, to `<storage>/datasets/<fingerprint>/`
(keyed by the inputs, the tokenizer and the data config) and reused by later runs. The
training workers then stream their shards of that Parquet through Ray Data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import ray
from ray.data.expressions import col

from ray_app.config import BUILTIN_TINY_LLAMA, Config
from ray_app.data.jsonl_datasource import JsonlLinesDatasource
from ray_app.data.report import DataReport, report_from_counts
from ray_app.data.sources import expand_sources
from ray_app.data.tokenize import TokenizeRecords

PIPELINE_VERSION = "1"  # bump when the tokenized output of the same inputs changes
STATS_COLUMNS = ["source", "status", "reason", "split", "num_tokens", "trained_tokens"]


@dataclass
class PreparedData:
    path: str  # Parquet folder of every record (accepted and rejected)
    report: DataReport
    cached: bool

    def split(self, name: str) -> ray.data.Dataset:
        return (ray.data.read_parquet(self.path)
                .select_columns(["input_ids", "labels", "status", "split"])
                .filter(expr=(col("status") == "accepted") & (col("split") == name))
                .select_columns(["input_ids", "labels"]))


def tokenizer_path(cfg: Config) -> str:
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    if cfg.model.name_or_path == BUILTIN_TINY_LLAMA:
        from ray_app.quickstart import TOKENIZER_DIR

        return str(TOKENIZER_DIR)
    return cfg.model.name_or_path


def resolve_files(cfg: Config) -> tuple[list[str], list[str]]:
    train = expand_sources(cfg.data.train, "data.train")
    evals = expand_sources(cfg.data.eval, "data.eval") if cfg.data.eval else []
    return train, evals


def fingerprint(cfg: Config, files: list[str]) -> str:
    """Changes when an input file, the tokenizer or a data setting changes."""
    parts = [PIPELINE_VERSION, tokenizer_path(cfg), cfg.data.model_dump_json(exclude={"tokenize_actors"})]
    for path in files:
        parts.append(f"{path}:{_file_stamp(path)}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=10).hexdigest()


def _file_stamp(path: str) -> str:
    fs, inner = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    info = fs.get_file_info(inner)
    return f"{info.size}:{info.mtime_ns}"


def prepare(cfg: Config, storage: str, rejects_dir: Path) -> PreparedData:
    """Tokenizes the data (or reuses the cached result) and writes the reject report."""
    train_files, eval_files = resolve_files(cfg)
    files = train_files + [f for f in eval_files if f not in set(train_files)]
    cache = f"{storage.rstrip('/')}/datasets/{fingerprint(cfg, files)}"
    records = f"{cache}/records"
    report_file = f"{cache}/report.json"
    cached = _exists(report_file)
    if not cached:
        eval_fraction = 0.0 if eval_files else cfg.data.eval_fraction
        ds = ray.data.read_datasource(JsonlLinesDatasource(files, eval_paths=set(eval_files)))
        ds = ds.map_batches(
            TokenizeRecords,
            fn_constructor_kwargs={
                "tokenizer_path": tokenizer_path(cfg), "max_seq_len": cfg.data.max_seq_len,
                "fmt": cfg.data.format, "eval_fraction": eval_fraction,
                "trust_remote_code": cfg.model.trust_remote_code,
            },
            compute=ray.data.ActorPoolStrategy(size=cfg.data.tokenize_actors),
            batch_size=256, batch_format="numpy", num_cpus=0.5,
        )
        _remove_dir(records)  # leftovers of an interrupted run would be counted twice
        ds.write_parquet(records)
        report = _count(records, files)
        _write_text(report_file, json.dumps(report.to_dict(), indent=2))
    else:
        report = DataReport.from_dict(json.loads(_read_text(report_file)))
    write_rejects(records, rejects_dir)
    return PreparedData(path=records, report=report, cached=cached)


def _count(records: str, files: list[str]) -> DataReport:
    from ray.data.aggregate import Count, Sum

    grouped = (ray.data.read_parquet(records).select_columns(STATS_COLUMNS)
               .groupby(["source", "status", "reason", "split"])
               .aggregate(Count(), Sum("num_tokens"), Sum("trained_tokens"))
               .to_pandas())
    return report_from_counts(grouped.to_dict("records"), files)


def write_rejects(records: str, rejects_dir: Path) -> Path:
    """`<output>/rejects/rejects.jsonl`: one line per rejected record, with source and line."""
    rejects_dir.mkdir(parents=True, exist_ok=True)
    out = rejects_dir / "rejects.jsonl"
    rejected = (ray.data.read_parquet(records)
                .select_columns(["source", "line", "status", "reason", "raw"])
                .filter(expr=col("status") == "rejected")
                .select_columns(["source", "line", "reason", "raw"]))
    with open(out, "w") as fh:
        fh.writelines(json.dumps({k: row[k] for k in ("source", "line", "reason", "raw")}) + "\n" for row in rejected.iter_rows())
    return out


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _remove_dir(uri: str) -> None:
    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def _write_text(uri: str, text: str) -> None:
    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def _read_text(uri: str) -> str:
    fs, path = _fs(uri)
    with fs.open_input_stream(path) as src:
        return src.read().decode()
