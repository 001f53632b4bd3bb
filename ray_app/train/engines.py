"""Distribution strategies behind one small interface, so the loop is the same for all.

- `ddp`: every worker holds the whole (frozen) base; gradients of the adapter are averaged.
- `fsdp`: FSDP2 `fully_shard` per decoder layer and at the root; bf16 parameters with fp32
  gradient reduction on GPU. Checkpoints hold full (unsharded) adapter and optimizer state,
  so they load under any world size.
- `deepspeed`: ZeRO-2 or ZeRO-3, optional CPU offload; DeepSpeed writes its own sharded
  checkpoint (one file per rank), which Ray Train merges into one checkpoint folder.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ray_app.config import Config
from ray_app.extras import require
from ray_app.model.adapters import lora_plus_groups
from ray_app.model.loading import decoder_layers
from ray_app.train.plan import StepPlan
from ray_app.train.safe_load import guard_deepspeed_loads, safe_load

OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"


def make_scheduler(optimizer, cfg: Config, plan: StepPlan):
    """train.schedule with the plan's warm-up and total steps (transformers' schedules)."""
    from transformers import get_scheduler

    schedule = cfg.train.schedule
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=plan.warmup_steps,
                         num_training_steps=plan.total_steps)


def make_optimizer(params, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    name = t.optimizer
    if name == "auto":
        offloaded = cfg.scaling.strategy == "deepspeed" and cfg.scaling.ds_offload != "none"
        name = "adamw_fused" if cfg.scaling.use_gpu and not offloaded else "adamw"
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        bnb = require("bitsandbytes", f"train.optimizer: {name}")

        cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay,
                             fused=name == "adamw_fused")


@dataclass(frozen=True)
class Layout:
    """Where this process sits: its device and its data-parallel rank and size."""

    device: torch.device
    dp_rank: int
    dp_size: int

    @classmethod
    def of_ray_train_worker(cls) -> Layout:
        """Every Ray Train worker is a data-parallel rank (a device mesh for tensor or
        context parallelism would make the data-parallel group a sub-group)."""
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        return cls(ray.train.torch.get_device(), context.get_world_rank(),
                   context.get_world_size())


class Engine:
    """DDP (and the base of the others): the parallel layout, forward/backward, the
    optimizer step, checkpoint state.

    The engine owns the layout: `dp_rank` and `dp_size` are the data-parallel rank and
    size, which the loop, the data order, the sample trace and the loss normalisation use.
    It also builds the optimizer and the learning-rate schedule, in one place for every
    strategy. `layout` defaults to the Ray Train worker's; a single process without Ray
    (a benchmark's plain loop) gives `Layout(device, 0, 1)`."""

    def __init__(self, peft_model, cfg: Config, plan: StepPlan, layout: Layout | None = None):
        layout = layout or Layout.of_ray_train_worker()
        self.cfg = cfg
        self.peft_model = peft_model
        self.device, self.dp_rank, self.dp_size = layout.device, layout.dp_rank, layout.dp_size
        # Elastic runs keep the global batch of scaling.num_workers data-parallel ranks.
        self.accum_steps = math.ceil(
            cfg.train.grad_accum_steps * cfg.scaling.num_workers / self.dp_size)
        # Host numbers (batch counts, preemption flags) are agreed over gloo, so that agreeing
        # on them never waits for the GPU's queued work (NCCL results live on the GPU).
        self._host_group = (dist.new_group(backend="gloo")
                            if self.dp_size > 1 and self.device.type == "cuda" else None)
        self.model = self._wrap(peft_model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(lora_plus_groups(self.model, cfg.train.lr,
                                                    cfg.train.lora_plus_ratio), cfg)
        self.optimizer, self.scheduler = self._attach(optimizer,
                                                      make_scheduler(optimizer, cfg, plan))

    def _wrap(self, peft_model):
        if self.dp_size == 1:
            return peft_model.to(self.device)
        import ray.train.torch

        # No buffer broadcast before every forward: the model's buffers (rotary tables, FP8
        # weights of model.precision: fp8) never change, and the FP8 ones are gigabytes.
        return ray.train.torch.prepare_model(
            peft_model, parallel_strategy_kwargs={"broadcast_buffers": False})

    def _attach(self, optimizer, scheduler):
        return optimizer, scheduler

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums `tensor` over the data-parallel ranks, in place; returns it."""
        if self.dp_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def agree(self, values: list[int], op: str = "sum") -> list[int]:
        """`values` summed (or their maximum, op="max") over the data-parallel ranks, on
        the host: no wait for the device."""
        if self.dp_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                        group=self._host_group)
        return tensor.tolist()

    def no_sync(self, last_micro_batch: bool):
        if last_micro_batch or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        loss.backward()

    def step(self) -> torch.Tensor | float:
        """The optimizer step; returns the gradient norm before clipping, as a device
        tensor where the strategy allows (reading it would wait for the step)."""
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # -- checkpoints: every rank calls these (some strategies gather collectively)
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft_model)

    def save(self, folder: Path, rank: int) -> None:
        adapter = self.adapter_state()
        if rank == 0:
            self.peft_model.save_pretrained(folder, state_dict=adapter)
            torch.save(self.optimizer.state_dict(), folder / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.peft_model, load_file(folder / "adapter_model.safetensors"))
        self.optimizer.load_state_dict(safe_load(folder / OPTIMIZER_FILE))
        self.scheduler.load_state_dict(safe_load(folder / SCHEDULER_FILE))


class FSDPEngine(Engine):
    def _wrap(self, peft_model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        peft_model.to(self.device)
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.cfg.scaling.use_gpu else MixedPrecisionPolicy())
        for layer in decoder_layers(peft_model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(peft_model, mp_policy=policy)
        return peft_model

    def no_sync(self, last_micro_batch: bool):
        self.model.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.model, options=self._options())
        return get_peft_model_state_dict(self.peft_model, state_dict=full)

    def save(self, folder: Path, rank: int) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        adapter = self.adapter_state()
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=self._options())
        if rank == 0:
            self.peft_model.save_pretrained(folder, state_dict=adapter)
            torch.save(optim, folder / OPTIMIZER_FILE)
            torch.save(self.scheduler.state_dict(), folder / SCHEDULER_FILE)

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        adapter = load_file(folder / "adapter_model.safetensors")
        names = {n for n, _ in self.model.named_parameters()}
        full = {_model_key(k, names): v for k, v in adapter.items()}
        set_model_state_dict(self.model, full, options=self._options(strict=False))
        optim = safe_load(folder / OPTIMIZER_FILE)
        set_optimizer_state_dict(self.model, self.optimizer, optim, options=self._options())
        self.scheduler.load_state_dict(safe_load(folder / SCHEDULER_FILE))


def _model_key(adapter_key: str, names: set[str]) -> str:
    """PEFT saves `...lora_A.weight`; the live module has `...lora_A.default.weight`
    (DoRA: `...lora_magnitude_vector` is `...lora_magnitude_vector.default.weight`)."""
    live = adapter_key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")
    if live.endswith(".lora_magnitude_vector"):
        live += ".default.weight"
    if live not in names:
        raise KeyError(f"adapter tensor {adapter_key!r} has no parameter {live!r} in the model")
    return live


class DeepSpeedEngine(Engine):
    def _wrap(self, peft_model):
        if not self.cfg.scaling.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return peft_model  # deepspeed.initialize wraps it, with the optimizer

    def _attach(self, optimizer, scheduler):
        deepspeed = require("deepspeed", "scaling.strategy: deepspeed")
        self.engine, optimizer, _, scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, self.accum_steps), dist_init_required=False,
        )
        guard_deepspeed_loads(self.engine)
        self.model = self.engine
        return optimizer, scheduler

    def no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces gradients at step()

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already token-weighted
        if not last_micro_batch:
            self.engine.step()  # DeepSpeed counts micro-steps; it only updates at the boundary

    def step(self) -> torch.Tensor | float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        import deepspeed
        from peft import get_peft_model_state_dict

        trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
            return {k: v.detach().cpu().clone()
                    for k, v in get_peft_model_state_dict(self.peft_model).items()}

    def save(self, folder: Path, rank: int) -> None:
        adapter = self.adapter_state()
        # Every rank writes its optimizer partition; Ray Train merges the folders.
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    exclude_frozen_parameters=True)
        if rank == 0:
            self.peft_model.save_pretrained(folder, state_dict=adapter)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                    load_module_strict=False)


def deepspeed_config(cfg: Config, accum_steps: int) -> dict[str, Any]:
    """`accum_steps`: the micro-batches the loop accumulates per optimizer step on this
    world size (more than train.grad_accum_steps when an elastic run has shrunk). DeepSpeed
    steps the optimizer every `gradient_accumulation_steps` micro-steps, so the two must be
    the same, or a shrunk run would take extra optimizer and scheduler steps."""
    t, s = cfg.train, cfg.scaling
    zero: dict[str, Any] = {"stage": s.ds_stage, "overlap_comm": s.use_gpu,
                            "contiguous_gradients": True}
    if s.ds_offload != "none":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": s.use_gpu}
    if s.ds_offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": s.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.batch_size_per_worker,
        "gradient_accumulation_steps": accum_steps,
        # The optimizer updates only the adapter, whose state is small: torch's AdamW on
        # the CPU is enough with offload (DeepSpeed otherwise insists on its own CPU Adam).
        "zero_force_ds_cpu_optimizer": False,
        "gradient_clipping": t.max_grad_norm,
        "bf16": {"enabled": s.use_gpu},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


ENGINES = {"ddp": Engine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def build_engine(peft_model, cfg: Config, plan: StepPlan, layout: Layout | None = None) -> Engine:
    """The engine of scaling.strategy around `peft_model`, with optimizer and schedule."""
    return ENGINES[cfg.scaling.strategy](peft_model, cfg, plan, layout)

