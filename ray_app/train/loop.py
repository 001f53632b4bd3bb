"""The per-worker training recipe that Ray Train runs on every worker.

    set up:   tokenizer, frozen base (+ speed-ups), LoRA adapter, engine (strategy,
              optimizer, scheduler), the method's collates
    restore:  the newest intact checkpoint, if any (adapter, optimizer, scheduler, RNG,
              step, data cursor)
    evaluate: once before training (the "initial" metrics)
    for each optimizer step:
              micro-batches in the fixed, resumable order -> method loss -> engine step
              -> metrics -> eval / checkpoint / preemption when due
    finish:   a final checkpoint with the final eval metrics

Features: any `TrainingMethod` (`ray_app/train/methods/`), DDP / FSDP2 / DeepSpeed (the engine owns
the data-parallel layout), gradient accumulation with a loss that is exactly that of one
large batch, clipping, bf16 autocast on GPU, exact resume (the data order is a pure
function of seed, epoch and data-parallel size; the cursor is in the checkpoint), elastic
world sizes, preemption checkpoints on Ray's drain notice or SIGTERM, and a hard stop on
non-finite loss before anything non-finite is checkpointed. Everything needed to continue
is in the checkpoint, so a restarted worker group carries on where it left off.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.collective
import torch

from ray_app.config import Config
from ray_app.data.collate import REAL_TOKENS
from ray_app.data.order import SAMPLE_ID, TrainStream
from ray_app.data.tokenize import load_tokenizer
from ray_app.errors import UserError
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train import checkpoint as ckpt
from ray_app.train.engines import Engine, build_engine
from ray_app.train.faults import inject
from ray_app.train.methods.base import TrainingMethod
from ray_app.train.plan import StepPlan
from ray_app.train.preemption import PreemptedError, PreemptionWatch
from ray_app.train.prefetch import prefetch
from ray_app.train.reporting import Reporter
from ray_app.train.steps import MicroBatch, StepResult, evaluate, optimizer_step
from ray_app.train.trace import SampleTrace, trace_folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    method: TrainingMethod = loop_config["method"]
    stream: TrainStream = loop_config["train_stream"]
    t = cfg.train

    # Set up: the same on every attempt; a failure here that a retry cannot fix fails
    # the run at once (UserError) instead of being retried run.max_failures times.
    engine, pad_id = _set_up(cfg, plan)
    flatten = cfg.model.attn_implementation == "flash_attention_2"
    train_collate, eval_collate = method.collates(pad_id, flatten)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.use_gpu
                else nullcontext())
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None

    def run_eval() -> dict[str, Any]:
        if eval_shard is None:
            return {}
        with reporter.timing_eval():
            return evaluate(engine, method, eval_shard, eval_collate, t.batch_size_per_worker,
                            autocast)

    # Restore, and evaluate where training starts.
    state, resumed, warnings = _restore(engine)
    # This attempt's checkpoint folders never reuse a folder an earlier attempt wrote.
    attempt = ray.train.collective.broadcast_from_rank_zero(ckpt.new_attempt_id())
    reporter = Reporter(cfg, plan, engine, state, loop_config.get("progress"), attempt)
    initial = run_eval()
    if not resumed:
        state.eval_initial = {k: v for k, v in initial.items() if v is not None}
    reporter.publish({"step": state.step, "epoch": state.epoch, **initial, "resumed": resumed,
                      "world_size": engine.dp_size, "warnings": warnings})

    trace = (SampleTrace(trace_folder(loop_config["storage"], cfg.run.name), engine.dp_rank,
                         engine.dp_size) if cfg.run.record_samples else None)
    faults = loop_config.get("faults") or {}
    watch = PreemptionWatch(cfg.run.preemption_check_every, engine.device)
    start_step = state.step
    last_checkpoint = -1

    # Train.
    while state.step < plan.total_steps:
        for micro in _steps_of_epoch(stream, state, engine, method, t, train_collate):
            sample_ids = [i for m in micro for i in m.inputs.pop(SAMPLE_ID).tolist()]
            started = time.perf_counter()
            result = optimizer_step(engine, method, micro, autocast)
            _stop_if_diverged(result, state.step + 1)
            state.step += 1
            state.sample_cursor += len(sample_ids) * engine.dp_size  # every rank took as many
            state.tokens_seen += result.tokens
            if trace:
                trace.write(state, sample_ids)
            reporter.add_step(result, time.perf_counter() - started)
            inject(faults, state.step, engine.dp_rank, resumed,
                   shrunk=engine.dp_size < cfg.scaling.num_workers)

            final = state.step == plan.total_steps
            metrics = reporter.window_metrics() if reporter.log_due(final) else {}
            checkpoint_due = state.step % t.checkpoint_every == 0
            if reporter.eval_due(final, checkpoint_due):
                metrics.update(step=state.step, epoch=state.epoch, **run_eval())
            notice = watch.poll(state.step)
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
            if notice == watch.SIGTERM and not final:
                raise PreemptedError(f"SIGTERM: checkpoint written at step {state.step}; "
                                     "stopping so that Ray Train restarts from it")
            if final:
                break
        if state.step < plan.total_steps:
            state.epoch += 1
            state.sample_cursor = 0

    # Resumed at the very end (the same command after the run finished): Ray Train's result
    # is its newest checkpoint's metrics, so this attempt writes the final one again.
    if last_checkpoint != state.step:
        reporter.checkpoint({**initial, "final": True, "start_step": start_step}, True)


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
        engine = build_engine(add_lora(base, cfg.lora), cfg, plan)
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
    already on the device. The order is fixed by (seed, epoch, data-parallel size); the
    cursor skips what was trained on before a restart, also when the size changed. What
    each batch weighs is counted on its host copy, so the step needs no device sync."""
    state.sample_cursor = stream.start_of(state.sample_cursor, engine.dp_size)
    batches = prefetch(stream.batches(
        epoch=state.epoch, seed=t.seed, world_size=engine.dp_size, rank=engine.dp_rank,
        batch_size=t.batch_size_per_worker, start_sample=state.sample_cursor,
        collate=collate))
    micro: list[MicroBatch] = []
    for batch in batches:
        real = int(batch.pop(REAL_TOKENS))
        units = method.units(batch)
        micro.append(MicroBatch({k: v.to(engine.device, non_blocking=True)
                                 for k, v in batch.items()}, units, real))
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
