"""Checkpoint contents: the adapter, optimizer, scheduler and loop position; never the base."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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


def save(model, optimizer, scheduler, state: LoopState) -> str:
    """Writes a checkpoint folder (rank 0 only) and returns its path."""
    folder = tempfile.mkdtemp(prefix="ray_app_ckpt_")
    model.save_pretrained(folder)  # PEFT: adapter_config.json + adapter_model.safetensors
    torch.save(optimizer.state_dict(), Path(folder) / "optimizer.pt")
    torch.save(scheduler.state_dict(), Path(folder) / "scheduler.pt")
    (Path(folder) / STATE_FILE).write_text(json.dumps(asdict(state)))
    return folder


def load(folder: str, model, optimizer, scheduler) -> LoopState:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder)
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    return LoopState(**json.loads((path / STATE_FILE).read_text()))
