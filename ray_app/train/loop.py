"""The per-worker training loop that Ray Train runs on every worker.

Plain PyTorch: load the frozen base, add LoRA, AdamW with a warm-up schedule, gradient
accumulation with token-weighted loss, clipping, periodic eval and checkpoints. All state
needed to continue (adapter, optimizer, scheduler, step, data position) is in the
checkpoint, so a restarted worker group carries on where the last checkpoint left off.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any

import ray.train
import torch
import torch.distributed as dist

from ray_app.config import Config
from ray_app.data.collate import REAL_TOKENS, PadCollate
from ray_app.data.tokenize import IGNORE, load_tokenizer
from ray_app.model.loading import add_lora, apply_speedups, load_base
from ray_app.train import checkpoint as ckpt
from ray_app.train.engines import build_engine
from ray_app.train.faults import FAIL_AT_STEP_ENV
from ray_app.train.flops import flops_per_token, peak_tflops
from ray_app.train.plan import StepPlan

SHUFFLE_BUFFER = 2048


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    cfg = Config.model_validate(loop_config["config"])
    plan = StepPlan(**loop_config["plan"])
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

    state = ckpt.LoopState()
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as folder:
            state = ckpt.load(folder, engine)
        state.restarts += 1
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.scaling.use_gpu
                else nullcontext())
    collate = PadCollate(tokenizer.pad_token_id)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval") if plan.has_eval else None

    def evaluate() -> float | None:
        return _eval_loss(engine.model, eval_shard, collate, t.batch_size_per_worker, device,
                          autocast) if eval_shard else None

    def publish(metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        metrics = {**metrics, "restarts": state.restarts, "total_steps": plan.total_steps,
                   "eval_loss_initial": state.eval_loss_initial}
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        if rank == 0 and hub is not None:
            hub.update.remote(metrics)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=f"step_{state.step:07d}" if checkpoint else None)

    eval_loss = evaluate()
    initial = {"step": state.step, "epoch": state.epoch, "eval_loss": eval_loss,
               "eval_perplexity": _ppl(eval_loss), "resumed": bool(resumed)}
    if not resumed:
        state.eval_loss_initial = eval_loss
    publish(initial)

    window_tokens, window_loss, window_seconds = 0, 0.0, 0.0
    start_step = state.step
    fail_at = int(loop_config.get("fail_at_step") or 0)
    last_checkpoint_step = state.step if resumed else -1
    while state.step < plan.total_steps:
        batches = train_shard.iter_torch_batches(
            batch_size=t.batch_size_per_worker, collate_fn=collate, device=device,
            local_shuffle_buffer_size=SHUFFLE_BUFFER, local_shuffle_seed=t.seed + state.epoch,
        )
        micro: list[dict[str, torch.Tensor]] = []
        for index, batch in enumerate(batches):
            if index < state.micro_batches_in_epoch:
                continue  # already trained on before the restart
            micro.append(batch)
            if len(micro) < t.grad_accum_steps:
                continue
            step_start = time.perf_counter()
            loss, tokens, grad_norm = _optimizer_step(engine, micro, autocast, world, device)
            state.step += 1
            state.micro_batches_in_epoch = index + 1
            state.tokens_seen += tokens
            step_seconds = time.perf_counter() - step_start
            state.train_seconds += step_seconds
            window_seconds += step_seconds
            window_tokens += tokens
            window_loss += loss
            micro = []
            if state.step == fail_at and not resumed:
                raise RuntimeError(f"injected failure at step {fail_at} ({FAIL_AT_STEP_ENV})")
            metrics: dict[str, Any] = {}
            if state.step % t.log_every == 0 or state.step == plan.total_steps:
                steps_in_window = (state.step - 1) % t.log_every + 1
                metrics.update(
                    step=state.step, epoch=state.epoch, loss=window_loss / steps_in_window,
                    lr=engine.lr(), grad_norm=grad_norm,
                    tokens_per_s=window_tokens / max(window_seconds, 1e-9),
                    tokens_seen=state.tokens_seen,
                    **speed(window_tokens / max(window_seconds, 1e-9)),
                )
                window_tokens, window_loss, window_seconds = 0, 0.0, 0.0
            if t.eval_every and state.step % t.eval_every == 0 and state.step < plan.total_steps:
                loss_eval = evaluate()
                metrics.update(step=state.step, epoch=state.epoch, eval_loss=loss_eval,
                               eval_perplexity=_ppl(loss_eval))
            folder = None
            if state.step % t.checkpoint_every == 0 or state.step == plan.total_steps:
                if state.step == plan.total_steps:
                    final_loss = evaluate()
                    metrics.update(eval_loss=final_loss, eval_perplexity=_ppl(final_loss),
                                   final=True, train_seconds=state.train_seconds,
                                   start_step=start_step, tokens_seen=state.tokens_seen)
                folder = ckpt.save(engine, state, rank)
                metrics.setdefault("step", state.step)
                last_checkpoint_step = state.step
            if metrics:
                publish(metrics, folder)
            if state.step >= plan.total_steps:
                break
        if state.step < plan.total_steps:
            state.epoch += 1
            state.micro_batches_in_epoch = 0
    if last_checkpoint_step != state.step:  # resumed at the very end: still hand back a result
        publish({"step": state.step, "final": True, "start_step": start_step,
                 "tokens_seen": state.tokens_seen, "train_seconds": state.train_seconds},
                ckpt.save(engine, state, rank))


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
    return float(loss), real_tokens, grad_norm


@torch.no_grad()
def _eval_loss(model, shard, collate, batch_size, device, autocast) -> float:
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float64)
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                          device=device):
        batch.pop(REAL_TOKENS, None)
        with autocast:
            out = model(**batch, num_items_in_batch=1)
        sums[0] += float(out.loss)
        sums[1] += int((batch["labels"][:, 1:] != IGNORE).sum())
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train()
    return float(sums[0] / sums[1].clamp(min=1))


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))
