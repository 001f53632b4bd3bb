"""The per-worker training loop that Ray Train runs on every worker.

Plain PyTorch: load the frozen base, add LoRA, AdamW with a warm-up schedule, gradient
accumulation with token-weighted loss (or the DPO loss, `ray_app.train.dpo`), clipping,
periodic eval and checkpoints. All state
needed to continue (adapter, optimizer, scheduler, step, data position) is in the
checkpoint, so a restarted worker group carries on where the last checkpoint left off.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import ray.train.collective
import torch
import torch.distributed as dist

from ray_app.config import Config
from ray_app.data.collate import REAL_TOKENS, PackedCollate, PadCollate
from ray_app.data.order import SAMPLE_ID, TrainStream
from ray_app.data.tokenize import IGNORE, load_tokenizer
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train import checkpoint as ckpt
from ray_app.train import dpo
from ray_app.train.engines import build_engine
from ray_app.train.faults import inject
from ray_app.train.flops import flops_per_token, peak_tflops
from ray_app.train.plan import StepPlan
from ray_app.train.preemption import PreemptedError, PreemptionWatch
from ray_app.train.prefetch import prefetch
from ray_app.train.trace import SampleTrace, trace_folder


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
    stream: TrainStream = loop_config["train_stream"]
    hub = loop_config.get("progress")
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed + rank)

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               cfg.model.trust_remote_code)
    base = load_base(cfg.model, cfg.scaling.use_gpu, device)
    base = apply_speedups(base, cfg.model, t.activation_checkpointing, cfg.scaling.use_gpu)
    engine = build_engine(add_lora(base, cfg.lora), cfg,
                          lambda optimizer: _scheduler(optimizer, t.schedule, plan))
    # from_pretrained returns eval mode, which silently disables dropout, activation
    # checkpointing and Liger's fused loss.
    engine.model.train()

    flops = flops_per_token(engine.peft_model, cfg.data.max_seq_len)
    peak = peak_tflops(device)

    def speed(tokens_per_s: float) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens_per_s_per_worker": tokens_per_s / world}
        if peak:
            out["mfu"] = tokens_per_s / world * flops / (peak * 1e12)
        if device.type == "cuda":
            out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    state, resumed, warnings = _restore(engine, rank, world)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.use_gpu
                else nullcontext())
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    if t.method == "dpo":
        train_collate = eval_collate = dpo.PairCollate(
            tokenizer.pad_token_id, flatten=cfg.model.attn_implementation == "flash_attention_2")

        def optimizer_step(micro):
            return dpo.optimizer_step(engine, micro, autocast, world, device, t.dpo)

        def evaluate() -> dict[str, float]:
            return dpo.evaluate(engine, eval_shard, eval_collate, t.batch_size_per_worker,
                                device, autocast, t.dpo) if eval_shard else {}
    else:
        eval_collate = PadCollate(tokenizer.pad_token_id)
        # Packed rows keep their documents apart through position_ids (no attention mask).
        train_collate = PackedCollate(tokenizer.pad_token_id,
                                      flatten=cfg.model.attn_implementation == "flash_attention_2")

        def optimizer_step(micro):
            return _optimizer_step(engine, micro, autocast, world, device)

        def evaluate() -> dict[str, float]:
            return _eval_metrics(_eval_loss(engine, eval_shard, eval_collate,
                                            t.batch_size_per_worker, device, autocast)
                                 if eval_shard else None)

    # This attempt's checkpoint folders never reuse a folder an earlier attempt wrote.
    attempt = ray.train.collective.broadcast_from_rank_zero(ckpt.new_attempt_id())

    def publish(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        metrics = {**metrics, "restarts": state.restarts, "total_steps": plan.total_steps,
                   **{f"{k}_initial": v for k, v in state.eval_initial.items()}}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if rank == 0 and hub is not None:
            hub.update.remote(metrics)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=(ckpt.folder_name(state.step, attempt)
                                              if checkpoint else None))

    eval_now = evaluate()
    initial = {"step": state.step, "epoch": state.epoch, **eval_now, "resumed": resumed,
               "world_size": world, "warnings": warnings}
    if not resumed:
        state.eval_initial = {k: v for k, v in eval_now.items() if v is not None}
    publish(initial)

    trace = (SampleTrace(trace_folder(loop_config["storage"], cfg.run.name), rank, world)
             if cfg.run.record_samples else None)
    window_tokens, window_loss, window_seconds = 0, 0.0, 0.0
    window_stats: dict[str, float] = {}  # extra per-step means (DPO rewards), summed
    start_step = state.step
    faults = loop_config.get("faults") or {}
    last_checkpoint_step = state.step if resumed else -1
    # Elastic runs keep the global batch of scaling.num_workers workers.
    accum = math.ceil(t.grad_accum_steps * cfg.scaling.num_workers / world)
    watch = PreemptionWatch(cfg.run.preemption_check_every, device)

    def checkpoint(metrics: dict[str, Any], final: bool = False) -> None:
        nonlocal last_checkpoint_step
        if final or t.keep_best_by == "eval_loss":
            metrics.update(evaluate())
        if final:
            metrics.update(final=True, train_seconds=state.train_seconds,
                           start_step=start_step, tokens_seen=state.tokens_seen)
        state.world_size = world
        metrics.setdefault("step", state.step)
        with ckpt.staged(engine, state, rank) as folder:
            publish(metrics, folder)
        last_checkpoint_step = state.step
    while state.step < plan.total_steps:
        # The epoch's order is fixed by (seed, epoch, world size); the cursor skips what
        # was trained on before a restart, also when the world size changed.
        state.sample_cursor = stream.start_of(state.sample_cursor, world)
        batches = prefetch(stream.batches(
            epoch=state.epoch, seed=t.seed, world_size=world, rank=rank,
            batch_size=t.batch_size_per_worker, start_sample=state.sample_cursor,
            collate=train_collate))
        micro: list[dict[str, torch.Tensor]] = []
        for batch in batches:
            micro.append({k: v.to(device, non_blocking=True) for k, v in batch.items()})
            if len(micro) < accum:
                continue
            sample_ids = [int(i) for b in micro for i in b.pop(SAMPLE_ID)]
            step_start = time.perf_counter()
            loss, tokens, grad_norm, stats = optimizer_step(micro)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise DivergedError(
                    f"step {state.step + 1}: loss {loss}, gradient norm {grad_norm}. Training "
                    "diverged (lower train.lr or train.max_grad_norm) or the model computes "
                    "NaN/inf in this precision. Stopped before any non-finite adapter is "
                    "checkpointed; the last checkpoint is intact.")
            for name, value in stats.items():
                window_stats[name] = window_stats.get(name, 0.0) + value
            state.step += 1
            state.sample_cursor += len(sample_ids) * world  # every rank took as many
            if trace:
                trace.write(state, sample_ids)
            state.tokens_seen += tokens
            step_seconds = time.perf_counter() - step_start
            state.train_seconds += step_seconds
            window_seconds += step_seconds
            window_tokens += tokens
            window_loss += loss
            micro = []
            inject(faults, state.step, rank, resumed)
            metrics: dict[str, Any] = {}
            if state.step % t.log_every == 0 or state.step == plan.total_steps:
                steps_in_window = (state.step - 1) % t.log_every + 1
                metrics.update(
                    step=state.step, epoch=state.epoch, loss=window_loss / steps_in_window,
                    lr=engine.lr(), grad_norm=grad_norm,
                    tokens_per_s=window_tokens / max(window_seconds, 1e-9),
                    tokens_seen=state.tokens_seen,
                    **speed(window_tokens / max(window_seconds, 1e-9)),
                    **{k: v / steps_in_window for k, v in window_stats.items()},
                )
                window_tokens, window_loss, window_seconds = 0, 0.0, 0.0
                window_stats = {}
            final = state.step == plan.total_steps
            due = state.step % t.checkpoint_every == 0
            if t.eval_every and state.step % t.eval_every == 0 and not final \
                    and not (due and t.keep_best_by == "eval_loss"):
                metrics.update(step=state.step, epoch=state.epoch, **evaluate())
            notice = watch.poll(state.step)
            if final or due or notice:
                if notice:
                    metrics["preemption"] = "drain" if notice == watch.DRAIN else "sigterm"
                checkpoint(metrics, final)
            elif metrics:
                publish(metrics)
            if notice == watch.SIGTERM and not final:
                raise PreemptedError(f"SIGTERM: checkpoint written at step {state.step}; "
                                     "stopping so that Ray Train restarts from it")
            if final:
                break
        if state.step < plan.total_steps:
            state.epoch += 1
            state.sample_cursor = 0
    if last_checkpoint_step != state.step:  # resumed at the very end: still hand back a result
        checkpoint({}, final=True)


class DivergedError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite."""


def _restore(engine, rank: int, world: int) -> tuple[ckpt.LoopState, bool, list[str]]:
    """(state, resumed, warnings): the newest intact checkpoint's state, or a fresh one."""
    latest = ray.train.get_checkpoint()
    if not latest:
        return ckpt.LoopState(), False, []
    with ckpt.newest_intact(latest) as (folder, warnings):
        if folder is None:
            warnings.append("no intact checkpoint is left: training starts from step 0")
            return ckpt.LoopState(), False, warnings
        state = ckpt.load(folder, engine, rank)
    state.restarts += 1
    state.resumes.append({"step": state.step, "world_size": world, "time": time.time()})
    return state, True, warnings


def _eval_metrics(loss: float | None) -> dict[str, Any]:
    return {"eval_loss": loss, "eval_perplexity": _ppl(loss)}


def _scheduler(optimizer, schedule: str, plan: StepPlan):
    from transformers import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=plan.warmup_steps,
                         num_training_steps=plan.total_steps)


def _optimizer_step(engine, micro, autocast, world, device):
    """One optimizer step over `micro`; the loss is the mean over all trained tokens of
    all micro-batches on all workers, whatever their padding or length."""
    local_trained = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    local_real = sum(int(b.pop(REAL_TOKENS)) for b in micro)  # non-pad input tokens
    counts = torch.tensor([local_trained, local_real], device=device, dtype=torch.long)
    if world > 1:
        dist.all_reduce(counts)
    trained_tokens, real_tokens = int(counts[0]), int(counts[1])
    # Gradients are averaged over workers, so each worker divides by the global count / world.
    denominator = max(trained_tokens, 1) / world
    total = 0.0
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with engine.no_sync(last), autocast:
            out = engine.model(**batch, num_items_in_batch=denominator)
        engine.backward(out.loss, last)
        total += float(out.loss.detach())
    grad_norm = engine.step()
    loss = torch.tensor([total / world], device=device)
    if world > 1:
        dist.all_reduce(loss)
    return float(loss), real_tokens, grad_norm, {}


@torch.no_grad()
def _eval_loss(engine, shard, collate, batch_size, device, autocast) -> float:
    model = engine.model
    # Liger's fused loss skips the logits only in training mode unless told to; without it
    # evaluation would hold a (batch, seq, vocab) tensor, the largest of the run.
    extra = {"skip_logits": True} if getattr(engine.peft_model, "fused_linear_loss", False) else {}
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                          device=device):
        batch.pop(REAL_TOKENS, None)
        with autocast:
            out = model(**batch, num_items_in_batch=1, **extra)
        sums[0] += float(out.loss)
        sums[1] += int((batch["labels"][:, 1:] != IGNORE).sum())
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))
