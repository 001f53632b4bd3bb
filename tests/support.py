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


def kill_trees(pids: list[int]) -> None:
    """SIGKILL each process and all its descendants at once (a lost machine), and wait."""
    import psutil

    procs = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            procs += [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def checkpoint_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders (`step_NNNNNNN-<attempt>`), oldest step first."""
    return sorted((p for p in run_dir.glob("step_*") if p.is_dir()),
                  key=lambda p: (p.name[:12], p.stat().st_mtime))


def newest_checkpoint(run_dir: Path) -> Path:
    return checkpoint_folders(run_dir)[-1]


def optimizer_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of a checkpoint's optimizer state, by a path of keys: optimizer.pt
    (DDP, FSDP) or DeepSpeed's optimizer partitions."""
    from ray_app.train.safe_load import safe_load

    files = [folder / "optimizer.pt"] if (folder / "optimizer.pt").exists() else sorted(
        folder.glob("deepspeed/*/*optim_states.pt"))
    out: dict[str, Any] = {}
    for file in files:
        _tensors(safe_load(file), file.name, out)
    return out


def _tensors(value: Any, path: str, out: dict[str, Any]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        out[path] = value.float()
    elif isinstance(value, dict):
        for key, item in value.items():
            _tensors(item, f"{path}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _tensors(item, f"{path}/{i}", out)


# For runs whose subject is not distribution (methods, data, outputs, tracking, results):
# one Ray Train worker process instead of two. On the 2 cores of CI each worker's start
# (torch, transformers and PEFT imports) costs ~10 CPU-seconds, and the suite is CPU-bound.
# Such runs double batch_size_per_worker where the global batch matters. Distribution,
# recovery and exact resume keep two workers (test_strategies, test_recovery, test_training).
ONE_WORKER = {"num_workers": 1}


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
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def read_tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file under `folder`: tag -> [(step, value)].
    Event files are TFRecords: u64 length, u32 crc, the Event proto, u32 crc."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows (`run.log` calls) of an offline W&B run file (`run-*.wandb`): a
    7-byte header, then 32 KiB blocks of chunks (header <IHB: crc, length, type 1 full,
    2 first, 3 middle, 4 last), each whole record a wandb_internal_pb2.Record."""
    import json
    import struct

    from wandb.proto.wandb_internal_pb2 import Record

    data, block = run_file.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", run_file
    rows, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record.FromString(parts)
            parts = b""
            if record.HasField("history"):
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def secret_sentinels() -> dict[str, str]:
    """A unique value for every secret environment variable (`ray_app.secrets.SECRET_ENV`),
    none of which may ever show up in a file or on the console."""
    from ray_app.secrets import SECRET_ENV

    return {name: f"sentinel{i:02d}{name.lower().replace('_', '')}{'0' * 40}"[:40]
            for i, name in enumerate(SECRET_ENV)}


def secret_leaks(folder: Path) -> list[str]:
    """`file: NAME` for every sentinel of `secret_sentinels` in any file under `folder`."""
    sentinels = secret_sentinels()
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, value in sentinels.items()
                      if value.encode() in data]
    return found
