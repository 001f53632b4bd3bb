"""What a worker reports, and when: windowed step metrics, the log/eval schedule, memory
peaks, and the reports themselves (to Ray Train, with checkpoints, and to the driver's
progress hub)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any

import ray.train
import torch

from ray_app.config import Config
from ray_app.train import checkpoint as ckpt
from ray_app.train.flops import flops_per_token, peak_tflops
from ray_app.train.plan import StepPlan
from ray_app.train.steps import StepResult

# The first steps of every attempt compile, autotune and grow the allocator's pools; the
# steady-state rate leaves them out.
WARMUP_STEPS = 3


class Reporter:
    """One per worker. Rank 0's reports reach the driver's hub; every rank calls
    `publish` and `checkpoint` at the same steps (Ray Train's report is a barrier).

    Time is wall clock between the moments the loop has read one step's numbers and the
    next one's (so data hand-off, reports and everything else between steps count), with
    evaluation and checkpoints left out: `pause()` after them restarts the clock at the
    next step's start."""

    def __init__(self, cfg: Config, plan: StepPlan, engine, state: ckpt.LoopState, hub,
                 attempt: str, worker_started: float, phases: dict[str, float] | None = None):
        self.cfg, self.plan, self.engine, self.state, self.attempt = cfg, plan, engine, state, attempt
        self.rank = ray.train.get_context().get_world_rank()
        self.hub = hub if self.rank == 0 else None
        self.flops = flops_per_token(engine.peft_model, cfg.data.max_seq_len)
        self.peak, self.peak_source = peak_tflops(engine.device)
        self.cuda = engine.device.type == "cuda"
        self.train_peak = self.eval_peak = 0
        self.worker_started = worker_started
        self.phases = phases or {}  # seconds of this attempt's set-up phases, for its record
        self.clock: float | None = None  # when the last step's numbers were read
        self.attempt_steps = 0
        self._reset_window()

    # -- step metrics, averaged over the steps since the last log line
    def _reset_window(self) -> None:
        self.tokens, self.seconds, self.loss, self.steps = 0, 0.0, 0.0, 0
        self.stats: dict[str, float] = {}

    def pause(self) -> None:
        """Evaluation or a checkpoint ran: not training time."""
        self.clock = None

    def add_step(self, result: StepResult, queued_at: float) -> None:
        """Counts a step whose numbers were just read; `queued_at` is when the loop started
        queuing it (its clock after a pause)."""
        now = time.perf_counter()
        seconds = now - (queued_at if self.clock is None else self.clock)
        self.clock = now
        state = self.state
        self.attempt_steps += 1
        if self.attempt_steps == 1:
            self.first_step_s = now - self.worker_started
            if state.first_step_s is None:
                state.first_step_s = self.first_step_s
        if self.attempt_steps <= WARMUP_STEPS:
            state.warmup_seconds += seconds
            state.warmup_tokens += result.tokens
        else:
            state.steady_seconds += seconds
            state.steady_tokens += result.tokens
        state.train_seconds += seconds
        self.tokens += result.tokens
        self.seconds += seconds
        self.loss += result.loss
        self.steps += 1
        self.grad_norm = result.grad_norm
        for name, value in result.stats.items():
            self.stats[name] = self.stats.get(name, 0.0) + value

    def first_step(self) -> None:
        """Tells the driver's hub that this attempt's first step has ended, so that a
        restart's record says how long the run stood still and where that time went
        (ProgressHub.restarts)."""
        if self.hub is not None:
            self.hub.update.remote({"event": "first_step", "first_step_s": self.first_step_s,
                                    **self.phases})

    def log_due(self, step: int, final: bool) -> bool:
        return final or step % self.cfg.train.log_every == 0

    def window_metrics(self, step: int, epoch: int) -> dict[str, Any]:
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        per_worker = tokens_per_s / self.engine.dp_size
        metrics: dict[str, Any] = {
            "step": step, "epoch": epoch, "loss": self.loss / self.steps,
            "lr": self.engine.lr(), "grad_norm": self.grad_norm, "tokens_per_s": tokens_per_s,
            "tokens_seen": self.state.tokens_seen, "tokens_per_s_per_worker": per_worker,
            **{name: value / self.steps for name, value in self.stats.items()},
            **self.memory(),
        }
        if self.peak:
            metrics["mfu"] = per_worker * self.flops / (self.peak * 1e12)
            metrics["mfu_peak"] = self.peak_source
        self._reset_window()
        return metrics

    def speed(self) -> dict[str, Any]:
        """The run's speed so far, as the summary shows it (ray_app.summary.speed)."""
        s = self.state
        return {"train_seconds": s.train_seconds, "tokens_seen": s.tokens_seen,
                "warmup_seconds": s.warmup_seconds, "warmup_tokens": s.warmup_tokens,
                "steady_seconds": s.steady_seconds, "steady_tokens": s.steady_tokens,
                "first_step_s": s.first_step_s}

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

    def wait_until_taken(self, timeout_s: float = 30.0) -> None:
        """Returns once Ray Train's controller has taken every rank's last report. A worker
        that stops right after reporting a checkpoint could otherwise fail the group before
        the controller has that checkpoint from every rank, and the restart would go back
        to the one before. Each rank waits for its own report, then for the others."""
        try:  # the worker's report queue: Ray Train marks a report done when it takes it
            from ray.train.v2._internal.execution.context import get_train_context

            reports = get_train_context().get_result_queue()
            deadline = time.monotonic() + timeout_s
            while reports.unfinished_tasks and time.monotonic() < deadline:
                time.sleep(0.05)
        except (ImportError, AttributeError):  # another Ray Train: a few of its polls
            time.sleep(3 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")))
        self.engine.agree([1], "max")

    def checkpoint(self, metrics: dict[str, Any], final: bool) -> None:
        """Writes and reports a checkpoint of the current step (all ranks)."""
        state = self.state
        state.world_size = self.engine.dp_size
        metrics.setdefault("step", state.step)
        if final:
            metrics.update(**self.speed(), **self.memory())
        with ckpt.staged(self.engine, state, self.rank) as folder:
            self.publish(metrics, folder)
