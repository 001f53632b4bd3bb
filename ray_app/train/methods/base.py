"""The TrainingMethod seam: what one training objective needs from the data and the loop.

A method says which records it trains on (`record_kind`: packed "sequences",
preference "pairs" or labelled "completions"), how a batch of them becomes model inputs (`collates`), what a micro-batch
weighs in the step's average (`units`: trained tokens, pairs, ...), its loss and the
per-unit statistics it reports (`loss`, `STATS`), and the same for evaluation. The loop
and `ray_app.train.steps` do the rest the same way for every method: accumulation over
micro-batches and workers, clipping, the optimizer step, metrics, checkpoints.

A new method is one module with a subclass, plus one line in `METHODS`
(`ray_app/train/methods/__init__.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, ClassVar

import torch

from ray_app.config import Config

Batch = dict[str, torch.Tensor]


class TrainingMethod(ABC):
    """One training objective. Instances are built on the driver from the validated config
    and shipped to the workers, so they hold settings only (no tensors, no model)."""

    name: ClassVar[str]
    # What the data pipeline must prepare: "sequences" (any SFT format, packed), "pairs"
    # (preference records: prompt, chosen, rejected) or "completions" (prompt, completion,
    # desirable or not); the last two are never packed.
    record_kind: ClassVar[str] = "sequences"
    # Statistics summed per unit over a step's micro-batches and workers, then divided by
    # the step's units; "loss" first. Reported as metrics under these names.
    STATS: ClassVar[tuple[str, ...]] = ("loss",)
    # Eval metrics (beyond eval_loss) that run_summary.json keeps, before and after.
    SUMMARY: ClassVar[tuple[str, ...]] = ()
    # Rows per record in the forward pass that keeps activations (`ray-app estimate`).
    TRAINED_ROWS: ClassVar[int] = 1

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def collates(self, pad_id: int, flatten: bool) -> tuple[Callable, Callable]:
        """(train collate, eval collate): rows of the prepared data -> model inputs."""

    @abstractmethod
    def units(self, batch: Batch) -> int:
        """How much `batch` weighs in the step's average (e.g. its trained tokens)."""

    @abstractmethod
    def loss(self, engine, batch: Batch, autocast: AbstractContextManager,
             denominator: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate, sums of STATS over the batch's units): the loss is the
        batch's share of the step's mean, i.e. its sum over units / `denominator`."""

    @abstractmethod
    def eval_sums(self, engine, batch: Batch, autocast: AbstractContextManager
                  ) -> tuple[torch.Tensor, int]:
        """(sums of STATS over the batch's units, the units), without gradients."""

    def metrics(self, means: dict[str, float]) -> dict[str, Any]:
        """The reported metrics from the per-unit means of STATS (of a step, or of the eval
        split): the means themselves, unless a method derives others from them."""
        return means

    def eval_metrics(self, means: dict[str, float]) -> dict[str, Any]:
        """The eval metrics from the per-unit means of STATS over the eval split."""
        return {f"eval_{name}": value for name, value in self.metrics(means).items()}

    def describe(self) -> dict[str, Any]:
        """What a run records about the method (run_summary.json)."""
        return {"name": self.name, "record_kind": self.record_kind}
