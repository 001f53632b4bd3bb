"""How many optimizer steps a run takes, computed once on the driver."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ray_app.config import Config
from ray_app.errors import UserError


@dataclass(frozen=True)
class StepPlan:
    micro_batches_per_epoch: int  # per worker
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    has_eval: bool

    def to_dict(self) -> dict:
        return asdict(self)


def plan_steps(cfg: Config, train_sequences: int, eval_records: int, world_size: int) -> StepPlan:
    """`train_sequences`: packed sequences (or records when packing is off) per epoch."""
    t = cfg.train
    per_worker = train_sequences // world_size  # the equal split drops the remainder
    micro = math.ceil(per_worker / t.batch_size_per_worker)
    steps_per_epoch = micro // t.grad_accum_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"Too little training data: {train_sequences} train sequences over {world_size} workers "
            f"give no full step of batch_size_per_worker={t.batch_size_per_worker} x "
            f"grad_accum_steps={t.grad_accum_steps}. Add data or lower those settings."
        )
    total = t.max_steps or steps_per_epoch * t.epochs
    return StepPlan(micro, steps_per_epoch, total, round(total * t.warmup_ratio),
                    eval_records >= world_size)
