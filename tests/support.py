"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any


def write_lines(path: Path, lines: list[str | bytes], compress: bool = False) -> Path:
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def tiny_config(train_paths: Path | list[str], tmp: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict for a fast 2-worker CPU run; `sections` update its sections."""
    cfg: dict[str, Any] = {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": [str(train_paths)] if isinstance(train_paths, Path) else train_paths,
                 "eval_fraction": 0.1, "max_seq_len": 64, "tokenize_actors": 1},
        "train": {"max_steps": 4, "lr": 3e-3, "batch_size_per_worker": 8, "log_every": 1,
                  "eval_every": 0, "checkpoint_every": 2},
        "scaling": {"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        "run": {"name": "t", "storage_path": str(tmp / "storage"), "output_dir": str(tmp / "out"),
                "max_failures": 0},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg
