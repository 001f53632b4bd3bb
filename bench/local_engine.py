"""`LocalEngine`: ray_app's DDP engine for one process, without Ray Train.

The plain loop of `bench/gpu_throughput.py` runs ray_app's own step
(`ray_app.train.steps.optimizer_step`) through this engine, so its backward, clipping,
optimizer and scheduler step are `ray_app.train.engines.Engine`'s. Only the set-up
differs: `Engine.__init__` asks Ray Train for the rank, world size and device and wraps
the model with `ray.train.torch.prepare_model` (which leaves a single worker's model
unwrapped), so here they are given: rank 0 of 1, the model as it is.
"""

from __future__ import annotations

import torch
from transformers import get_scheduler

from ray_app.config import Config
from ray_app.train.engines import Engine, make_optimizer


class LocalEngine(Engine):
    """`Engine` with its layout given instead of asked of Ray Train."""

    def __init__(self, peft_model, cfg: Config, device: torch.device):
        # Engine.__init__ is not called: it needs a Ray Train worker context.
        self.cfg, self.device = cfg, device
        self.peft_model = self.model = peft_model
        self.dp_rank, self.dp_size = 0, 1
        self.accum_steps = cfg.train.grad_accum_steps
        self.params = [p for p in peft_model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        # The loop's scheduler for train.schedule=constant and no warm-up: a constant rate.
        self.scheduler = get_scheduler("constant_with_warmup", self.optimizer,
                                       num_warmup_steps=0)
