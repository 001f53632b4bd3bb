"""Loading checkpoint files without running code from them.

`torch.load(weights_only=True)` unpickles only tensors, containers and plain values, so a
planted pickle in the checkpoint storage cannot execute on the workers. DeepSpeed's own
checkpoint files also hold three small, plain DeepSpeed classes (its loss scaler, the ZeRO
stage enum and a fragment address tuple); those, and only those, are allowed as well, and
DeepSpeed's loader is pointed at the same function (`guard_deepspeed_loads`).
"""

from __future__ import annotations

import importlib.util
import pickle
from functools import cache
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file would run code or build objects other than plain data."""


@cache
def _allowed_globals() -> tuple:
    if importlib.util.find_spec("deepspeed") is None:
        return ()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def safe_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` of tensors and plain data only; UnsafeCheckpointError otherwise."""
    try:
        with torch.serialization.safe_globals(list(_allowed_globals())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpointError(
            f"{Path(path).name} holds objects other than tensors and plain data, which would "
            f"run code when loaded; refused ({first})") from None


def guard_deepspeed_loads(engine) -> None:
    """Makes a DeepSpeed engine read its checkpoint files through `safe_load` (its own
    loader unpickles with weights_only=False)."""
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
