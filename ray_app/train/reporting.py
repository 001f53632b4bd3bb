"""What a worker reports, and when: windowed step metrics, the log/eval schedule, memory
peaks, and the reports themselves (to Ray Train, with checkpoints, and to the driver's
progress hub)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import ray.train
import torch

from ray_app.config import Config
from ray_app.train import checkpoint as ckpt
from ray_app.train.flops import flops_per_token, peak_tflops
from ray_app.train.plan import StepPlan
from ray_app.train.steps import StepResult


class Reporter:
    """One per worker. Rank 0's reports reach the driver's hub; every rank calls
    `publish` and `checkpoint` at the same steps (Ray Train's report is a barrier)."""

    def __init__(self, cfg: Config, plan: StepPlan, engine, state: ckpt.LoopState, hub,
                 attempt: str):
        self.cfg, self.plan, self.engine, self.state, self.attempt = cfg, plan, engine, state, attempt
        self.rank = ray.train.get_context().get_world_rank()
        self.hub = hub if self.rank == 0 else None
        self.flops = flops_per_token(engine.peft_model, cfg.data.max_seq_len)
        self.peak = peak_tflops(engine.device)
        self.cuda = engine.device.type == "cuda"
        self.train_peak = self.eval_peak = 0
        self._reset_window()

    # -- step metrics, averaged over the steps since the last log line
    def _reset_window(self) -> None:
        self.tokens, self.seconds, self.loss, self.steps = 0, 0.0, 0.0, 0
        self.stats: dict[str, float] = {}

    def add_step(self, result: StepResult, seconds: float) -> None:
        self.state.train_seconds += seconds
        self.tokens += result.tokens
        self.seconds += seconds
        self.loss += result.loss
        self.steps += 1
        self.grad_norm = result.grad_norm
        for name, value in result.stats.items():
            self.stats[name] = self.stats.get(name, 0.0) + value

    def log_due(self, final: bool) -> bool:
        return final or self.state.step % self.cfg.train.log_every == 0

    def window_metrics(self) -> dict[str, Any]:
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        per_worker = tokens_per_s / self.engine.dp_size
        metrics: dict[str, Any] = {
            "step": self.state.step, "epoch": self.state.epoch, "loss": self.loss / self.steps,
            "lr": self.engine.lr(), "grad_norm": self.grad_norm, "tokens_per_s": tokens_per_s,
            "tokens_seen": self.state.tokens_seen, "tokens_per_s_per_worker": per_worker,
            **{name: value / self.steps for name, value in self.stats.items()},
            **self.memory(),
        }
        if self.peak:
            metrics["mfu"] = per_worker * self.flops / (self.peak * 1e12)
        self._reset_window()
        return metrics

    def eval_due(self, final: bool, checkpoint_due: bool) -> bool:
        """A periodic eval, unless the step's checkpoint evaluates anyway."""
        t = self.cfg.train
        return bool(t.eval_every) and self.state.step % t.eval_every == 0 and not final \
            and not (checkpoint_due and t.keep_best_by == "eval_loss")

    # -- memory: evaluation's peak (full logits without a fused loss) kept apart
    def memory(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        train = max(self.train_peak, torch.cuda.max_memory_allocated(self.engine.device))
        return {"peak_gib": max(train, self.eval_peak) / 2**30, "train_peak_gib": train / 2**30,
                "eval_peak_gib": self.eval_peak / 2**30}

    @contextmanager
    def timing_eval(self):
        if self.cuda:
            self.train_peak = max(self.train_peak, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        try:
            yield
        finally:
            if self.cuda:
                self.eval_peak = max(self.eval_peak, torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()

    # -- reports
    def publish(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        state = self.state
        metrics = {**metrics, "restarts": state.restarts, "total_steps": self.plan.total_steps,
                   **{f"{k}_initial": v for k, v in state.eval_initial.items()}}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if self.hub is not None:
            self.hub.update.remote(metrics)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=(ckpt.folder_name(state.step, self.attempt)
                                              if checkpoint else None))

    def checkpoint(self, metrics: dict[str, Any], final: bool) -> None:
        """Writes and reports a checkpoint of the current step (all ranks)."""
        state = self.state
        state.world_size = self.engine.dp_size
        metrics.setdefault("step", state.step)
        if final:
            metrics.update(train_seconds=state.train_seconds, tokens_seen=state.tokens_seen,
                           **self.memory())
        with ckpt.staged(self.engine, state, self.rank) as folder:
            self.publish(metrics, folder)
