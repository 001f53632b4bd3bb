"""The per-worker training recipe that Ray Train runs on every worker.

    set up:   tokenizer, frozen base (+ speed-ups), LoRA adapter, engine (strategy,
              optimizer, scheduler), the method's collates
    restore:  the newest intact checkpoint, if any (adapter, optimizer, scheduler, RNG,
              step, data cursor)
    evaluate: once before a new run's training (the "initial" metrics; not on a resume)
    for each optimizer step:
              micro-batches in the fixed, resumable order -> method loss -> engine step
              -> metrics -> eval / checkpoint / preemption when due
    finish:   a final checkpoint with the final eval metrics

Features: any `TrainingMethod` (`ray_app/train/methods/`), DDP / FSDP2 / DeepSpeed (the engine owns
the data-parallel layout), gradient accumulation with a loss that is exactly that of one
large batch, clipping, bf16 autocast on GPU, exact resume (the data order is a pure
function of seed, epoch and data-parallel size; the cursor is in the checkpoint), elastic
world sizes, preemption checkpoints on Ray's drain notice or SIGTERM, a hard stop on
non-finite loss before anything non-finite is checkpointed, an FP8 frozen base
(`model.precision: fp8`), steps queued one ahead of their bookkeeping (no device sync
inside a step) and compiled kernels kept with the run for restarts. Everything needed to continue
is in the checkpoint, so a restarted worker group carries on where it left off.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.collective
import torch

from ray_app.config import Config
from ray_app.data.collate import REAL_TOKENS
from ray_app.data.order import SAMPLE_ID, TrainStream
from ray_app.data.tokenize import load_tokenizer
from ray_app.errors import UserError
from ray_app.model.fp8 import check_fp8_device, to_fp8_base
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train import checkpoint as ckpt
from ray_app.train import compile_cache
from ray_app.train.engines import Engine, build_engine
from ray_app.train.faults import inject
from ray_app.train.methods.base import TrainingMethod
from ray_app.train.plan import StepPlan
from ray_app.train.preemption import PreemptedError, PreemptionWatch
from ray_app.train.prefetch import prefetch
from ray_app.train.reporting import Reporter
from ray_app.train.steps import MicroBatch, QueuedStep, StepResult, evaluate, optimizer_step
from ray_app.train.trace import SampleTrace, trace_folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    method: TrainingMethod = loop_config["method"]
    stream: TrainStream = loop_config["train_stream"]
    t = cfg.train
    worker_started = time.perf_counter()

    # Set up: the same on every attempt; a failure here that a retry cannot fix fails
    # the run at once (UserError) instead of being retried run.max_failures times.
    engine, pad_id = _set_up(cfg, plan)
    set_up_s = time.perf_counter() - worker_started
    flatten = cfg.model.attn_implementation == "flash_attention_2"
    train_collate, eval_collate = method.collates(pad_id, flatten)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.use_gpu
                else nullcontext())
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    compiled = (compile_cache.cache_uri(loop_config["storage"], cfg.run.name, engine.device)
                if cfg.model.compile else None)
    if compiled:
        compile_cache.load(compiled)

    def run_eval() -> dict[str, Any]:
        if eval_shard is None:
            return {}
        with reporter.timing_eval():
            return evaluate(engine, method, eval_shard, eval_collate, t.batch_size_per_worker,
                            autocast)

    # Restore, and evaluate where a new run starts. A resumed attempt does not evaluate
    # again: its time is the recovery's, which the run loses (8B shape: a pass in eval mode
    # and its compilation before the first step back).
    restore_started = time.perf_counter()
    state, resumed, warnings = _restore(engine)
    restore_s = time.perf_counter() - restore_started
    # This attempt's checkpoint folders never reuse a folder an earlier attempt wrote.
    attempt = ray.train.collective.broadcast_from_rank_zero(ckpt.new_attempt_id())
    reporter = Reporter(cfg, plan, engine, state, loop_config.get("progress"), attempt,
                        worker_started, phases={"set_up_s": set_up_s, "restore_s": restore_s})
    initial = {} if resumed else run_eval()
    if not resumed:
        state.eval_initial = {k: v for k, v in initial.items() if v is not None}
    reporter.publish({"step": state.step, "epoch": state.epoch, **initial, "resumed": resumed,
                      "world_size": engine.dp_size, "warnings": warnings})

    trace = (SampleTrace(trace_folder(loop_config["storage"], cfg.run.name), engine.dp_rank,
                         engine.dp_size) if cfg.run.record_samples else None)
    faults = loop_config.get("faults") or {}
    watch = PreemptionWatch(cfg.run.preemption_check_every, engine.agree)
    start_step = state.step
    last_checkpoint = -1

    # Train. Steps are queued on the device one ahead of their bookkeeping: step N's numbers
    # are read (the loop's only wait for the device) once step N+1 is queued, so that the
    # data hand-off, the next batch's copy and the reports overlap the device's work. A step
    # that evaluates, checkpoints or stops is read at once, before any of that.
    in_flight: _InFlight | None = None

    def read(step: _InFlight) -> dict[str, Any]:
        """Waits for `step`, counts it; its log line's metrics when one is due."""
        result = step.queued.result()
        _stop_if_diverged(result, step.step)
        state.tokens_seen += result.tokens
        reporter.add_step(result, step.queued_at)
        if step.step == start_step + 1:
            reporter.first_step()
            if compiled and engine.dp_rank == 0:
                compile_cache.save(compiled)
        if not reporter.log_due(step.step, step.step == plan.total_steps):
            return {}
        return reporter.window_metrics(step.step, step.epoch)

    while state.step < plan.total_steps:
        for micro in _steps_of_epoch(stream, state, engine, method, t, train_collate):
            sample_ids = [i for m in micro for i in m.sample_ids]
            queued_at = time.perf_counter()
            queued = optimizer_step(engine, method, micro, autocast)
            state.step += 1
            state.sample_cursor += len(sample_ids) * engine.dp_size  # every rank took as many
            if trace:
                trace.write(state, sample_ids)
            if in_flight is not None and (metrics := read(in_flight)):
                reporter.publish(metrics)
            in_flight = _InFlight(state.step, state.epoch, queued, queued_at)
            inject(faults, state.step, engine.dp_rank, resumed,
                   shrunk=engine.dp_size < cfg.scaling.num_workers)

            final = state.step == plan.total_steps
            checkpoint_due = state.step % t.checkpoint_every == 0
            eval_due = reporter.eval_due(final, checkpoint_due)
            notice = watch.poll(state.step)
            if not (final or checkpoint_due or eval_due or notice):
                continue
            metrics = read(in_flight)
            in_flight = None
            if eval_due:
                metrics.update(step=state.step, epoch=state.epoch, **run_eval())
            if final or checkpoint_due or notice:
                if notice:
                    metrics["preemption"] = "drain" if notice == watch.DRAIN else "sigterm"
                if final or t.keep_best_by == "eval_loss":
                    metrics.update(run_eval())
                if final:
                    metrics.update(final=True, start_step=start_step)
                reporter.checkpoint(metrics, final)
                last_checkpoint = state.step
            elif metrics:
                reporter.publish(metrics)
            reporter.pause()
            if notice == watch.SIGTERM and not final:
                reporter.wait_until_taken()
                raise PreemptedError(f"SIGTERM: checkpoint written at step {state.step}; "
                                     "stopping so that Ray Train restarts from it")
            if final:
                break
        if in_flight is not None and (metrics := read(in_flight)):
            reporter.publish(metrics)
        in_flight = None
        if state.step < plan.total_steps:
            state.epoch += 1
            state.sample_cursor = 0

    # Resumed at the very end (the same command after the run finished): Ray Train's result
    # is its newest checkpoint's metrics, so this attempt writes the final one again, with
    # the final eval metrics.
    if last_checkpoint != state.step:
        reporter.checkpoint({**(initial or run_eval()), "final": True, "start_step": start_step},
                            True)


@dataclass
class _InFlight:
    """A step queued on the device whose numbers the loop has not read yet."""

    step: int
    epoch: int
    queued: QueuedStep
    queued_at: float


def _set_up(cfg: Config, plan: StepPlan) -> tuple[Engine, int]:
    """(engine, pad token id): the frozen base with its speed-ups and adapter, wrapped by
    the strategy's engine with its optimizer and scheduler."""
    t = cfg.train
    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                                   cfg.model.trust_remote_code)
        # The same seed on every rank for the adapter's init: FSDP keeps each rank's own
        # shard of it (DDP and DeepSpeed copy rank 0's), so per-rank seeds here would give a
        # patchwork of different inits that depends on the world size.
        torch.manual_seed(t.seed)
        device = ray.train.torch.get_device()
        base = load_base(cfg.model, cfg.scaling.use_gpu, device)
        base = apply_speedups(base, cfg.model, t.activation_checkpointing, cfg.scaling.use_gpu)
        model = add_lora(base, cfg.lora, autocast=cfg.scaling.use_gpu)
        if cfg.model.precision == "fp8":
            check_fp8_device(device)
            to_fp8_base(model, device)
        engine = build_engine(model, cfg, plan)
        torch.manual_seed(t.seed + ray.train.get_context().get_world_rank())  # dropout
    except (ImportError, NotImplementedError) as err:
        raise UserError(f"Cannot set up training on the worker: {type(err).__name__}: "
                        f"{err}") from err
    # from_pretrained returns eval mode, which silently disables dropout, activation
    # checkpointing and Liger's fused loss.
    engine.model.train()
    return engine, tokenizer.pad_token_id


def _steps_of_epoch(stream: TrainStream, state: ckpt.LoopState, engine: Engine,
                    method: TrainingMethod, t, collate):
    """This rank's micro-batches of the rest of the epoch, `engine.accum_steps` at a time,
    their copies to the device queued. The order is fixed by (seed, epoch, data-parallel
    size); the cursor skips what was trained on before a restart, also when the size
    changed. What each batch weighs and which samples it holds are read on its host copy,
    so the step needs no device sync; on GPU the host copy is in pinned memory (done in the
    prefetch thread), so the copy to the device does not wait for the queued step either."""
    state.sample_cursor = stream.start_of(state.sample_cursor, engine.dp_size)
    batches = stream.batches(
        epoch=state.epoch, seed=t.seed, world_size=engine.dp_size, rank=engine.dp_rank,
        batch_size=t.batch_size_per_worker, start_sample=state.sample_cursor, collate=collate)
    if engine.device.type == "cuda":
        batches = ({k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()} for batch in batches)
    micro: list[MicroBatch] = []
    for batch in prefetch(batches):
        real = int(batch.pop(REAL_TOKENS))
        sample_ids = batch.pop(SAMPLE_ID).tolist()
        units = method.units(batch)
        micro.append(MicroBatch({k: v.to(engine.device, non_blocking=True)
                                 for k, v in batch.items()}, units, real, sample_ids))
        if len(micro) == engine.accum_steps:
            yield micro
            micro = []


def _stop_if_diverged(result: StepResult, step: int) -> None:
    if not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
        raise DivergedError(
            f"step {step}: loss {result.loss}, gradient norm {result.grad_norm}. Training "
            "diverged (lower train.lr or train.max_grad_norm) or the model computes NaN/inf "
            "in this precision. Stopped before any non-finite adapter is checkpointed; the "
            "last checkpoint is intact.")


class DivergedError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite."""


def _restore(engine: Engine) -> tuple[ckpt.LoopState, bool, list[str]]:
    """(state, resumed, warnings): the newest intact checkpoint's state, or a fresh one."""
    latest = ray.train.get_checkpoint()
    if not latest:
        return ckpt.LoopState(), False, []
    with ckpt.newest_intact(latest) as (folder, warnings):
        if folder is None:
            warnings.append("no intact checkpoint is left: training starts from step 0")
            return ckpt.LoopState(), False, warnings
        state = ckpt.load(folder, engine, ray.train.get_context().get_world_rank())
    state.restarts += 1
    state.resumes.append({"step": state.step, "world_size": engine.dp_size, "time": time.time()})
    return state, True, warnings
