"""One optimizer step and one evaluation pass, the same for every training method.

The step's objective is the mean of the method's per-unit loss (its units: trained
tokens, answers, ...) over all micro-batches of all data-parallel ranks. Each rank divides its
batches' summed loss by the step's global unit count over the data-parallel size, so the
gradients that the engine averages over ranks are exactly those of one large batch,
whatever the padding, packing or accumulation (the grad-accumulation bug many trainers
shipped is absent here).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from ray_app.train.methods.base import Batch, TrainingMethod


@dataclass
class MicroBatch:
    """A collated batch on the device, with what was counted on the host before the copy
    (so the step needs no device-to-host sync to weigh it)."""

    inputs: Batch
    units: int  # the method's units (trained tokens, answers, ...)
    real_tokens: int  # non-pad input tokens
    sample_ids: list[int] = field(default_factory=list)  # the samples it holds (resume trace)


@dataclass(frozen=True)
class StepResult:
    loss: float
    tokens: int  # real tokens of the step, all ranks
    grad_norm: float
    stats: dict[str, float]  # the method's other STATS, per-unit means


@dataclass
class QueuedStep:
    """A step whose work is queued on the device; `result()` waits for it and reads its
    numbers. Until then the host is free to prepare the next step."""

    names: tuple[str, ...]  # the method's STATS
    sums: torch.Tensor  # their sums over all units of all ranks, on the device
    units: int
    tokens: int
    grad_norm: torch.Tensor | float
    metrics: Callable[[dict[str, float]], dict[str, float]]  # the method's `metrics`

    def result(self) -> StepResult:
        means = dict(zip(self.names, (self.sums / max(self.units, 1)).tolist()))
        return StepResult(means.pop("loss"), self.tokens, float(self.grad_norm),
                          self.metrics(means))


def optimizer_step(engine, method: TrainingMethod, micro: list[MicroBatch],
                   autocast: AbstractContextManager) -> QueuedStep:
    """Forward and backward over `micro`, then the engine's optimizer step, queued on the
    device without waiting for it: the counts that weigh the batches were taken on the host
    and are agreed over the host, and the loss and norm stay on the device."""
    units, real_tokens = engine.agree([sum(m.units for m in micro),
                                       sum(m.real_tokens for m in micro)])
    denominator = max(units, 1) / engine.dp_size  # the engine averages gradients over ranks
    sums = torch.zeros(len(method.STATS), device=engine.device, dtype=torch.float64)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with engine.no_sync(last):
            loss, stats = method.loss(engine, batch.inputs, autocast, denominator)
            engine.backward(loss, last)
        sums += stats
    grad_norm = engine.step()
    return QueuedStep(method.STATS, engine.all_reduce(sums), units, real_tokens, grad_norm,
                      method.metrics)


@torch.no_grad()
def evaluate(engine, method: TrainingMethod, shard, collate, batch_size: int,
             autocast: AbstractContextManager) -> dict[str, float]:
    """The method's eval metrics over this rank's eval shard, summed over all ranks."""
    from ray_app.data.collate import REAL_TOKENS

    engine.model.eval()
    sums = torch.zeros(len(method.STATS) + 1, device=engine.device, dtype=torch.float64)
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                          device=engine.device):
        batch.pop(REAL_TOKENS, None)
        stats, units = method.eval_sums(engine, batch, autocast)
        sums[:-1] += stats
        sums[-1] += units
    engine.model.train()
    sums = engine.all_reduce(sums)
    means = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
    return method.eval_metrics(dict(zip(method.STATS, means)))
