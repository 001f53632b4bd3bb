"""Checkpoint contents: the adapter, optimizer, scheduler and loop position; never the base.

Each strategy's engine writes its own files (rank 0 only for DDP/FSDP, one partition per
rank for DeepSpeed); Ray Train merges the ranks' folders into one checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "train_state.json"


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    micro_batches_in_epoch: int = 0  # consumed in the current epoch, to skip on resume
    tokens_seen: int = 0
    restarts: int = 0
    train_seconds: float = 0.0
    eval_loss_initial: float | None = None


def save(engine, state: LoopState, rank: int) -> str | None:
    """Writes this rank's part of a checkpoint; returns its folder, or None when empty."""
    folder = tempfile.mkdtemp(prefix="ray_app_ckpt_")  # must outlive the report call
    engine.save(Path(folder), rank)
    if rank == 0:
        (Path(folder) / STATE_FILE).write_text(json.dumps(asdict(state)))
    if not os.listdir(folder):
        shutil.rmtree(folder)
        return None
    return folder


def load(folder: str, engine) -> LoopState:
    engine.load(Path(folder))
    return LoopState(**json.loads((Path(folder) / STATE_FILE).read_text()))
