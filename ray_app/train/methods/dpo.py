"""Direct Preference Optimization (train.method=dpo) on (prompt, chosen, rejected) pairs.

The reference policy is the base model itself: the same weights with the LoRA adapter
disabled (`PeftModel.disable_adapter()`), so DPO needs no second copy of the model in
memory, and at step 0 (adapter B = 0) policy and reference agree exactly. Each pair's
score is the sum of the log-probabilities of its answer tokens (prompt tokens masked).

The losses follow TRL's `DPOTrainer` definitions (sigmoid with label smoothing, hinge,
length-normalised IPO); TRL computes them inside its trainer's `compute_loss`, so they are
restated here for the Ray Train loop, which keeps its own strategies and checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ray_app.config import DpoSection
from ray_app.data.collate import REAL_TOKENS, PackedCollate
from ray_app.data.order import SAMPLE_ID
from ray_app.data.tokenize import IGNORE

# Per pair, summed over pairs (then divided by the pair count for the metrics).
STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
ROW = "row_index"  # batch key: the row (answer) each token belongs to, -1 for padding


class PairCollate:
    """n pairs -> 2n rows, the n chosen answers then the n rejected, laid out as the SFT
    sequences are (`PackedCollate`): no attention mask, each row its own document by its
    position_ids; right-padded (sdpa, eager) or flattened into one row (`flatten`, for
    flash_attention_2), so padding costs no attention work there. `ROW` maps every token
    to its row, for the per-answer sums."""

    def __init__(self, pad_id: int, *, flatten: bool = False):
        self.pack = PackedCollate(pad_id, flatten=flatten)
        self.flatten = flatten

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(r) for r in (*batch["input_ids"], *batch["rejected_input_ids"])]
        labels = [np.asarray(r).copy() for r in (*batch["labels"], *batch["rejected_labels"])]
        for row in labels:
            row[0] = IGNORE  # flattened rows: never the first token from the previous row
        out = self.pack({"input_ids": ids, "labels": labels})
        lengths = [len(r) for r in ids]
        if self.flatten:
            rows = np.repeat(np.arange(len(ids)), lengths)[None]
        else:
            rows = np.full(tuple(out["input_ids"].shape), -1, dtype=np.int64)
            for i, n in enumerate(lengths):
                rows[i, :n] = i
        out[ROW] = torch.from_numpy(rows.astype(np.int64))
        if SAMPLE_ID in batch:
            out[SAMPLE_ID] = torch.as_tensor(np.asarray(batch[SAMPLE_ID], dtype=np.int64))
        return out


def answer_logps(model, batch: dict[str, torch.Tensor], autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's trained tokens, their count), per row."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE, reduction="none").view_as(labels)
    trained = labels != IGNORE
    owner = batch[ROW][:, 1:][trained]
    rows = int(batch[ROW].max()) + 1
    sums = token_logps.new_zeros(rows).index_add(0, owner, token_logps[trained])
    counts = torch.zeros(rows, dtype=torch.long, device=owner.device).index_add(
        0, owner, torch.ones_like(owner))
    return sums, counts


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor,
                settings: DpoSection) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, stats per pair [pairs, len(STATS)]) from per-row answer log-probs of
    the 2n rows (chosen first)."""
    beta = settings.beta
    chosen, rejected = (policy - reference).chunk(2)  # log-ratios to the reference
    delta = chosen - rejected
    if settings.loss == "sigmoid":
        eps = settings.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif settings.loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo: the log-ratios per answer token, so the target does not scale with length
        n_chosen, n_rejected = tokens.clamp(min=1).chunk(2)
        losses = (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
    stats = torch.stack([losses.detach(), (chosen_reward > rejected_reward).double(),
                         chosen_reward - rejected_reward, chosen_reward, rejected_reward], 1)
    return losses, stats.double()


def _pair_forward(engine, batch, autocast, settings: DpoSection):
    with torch.no_grad(), engine.peft_model.disable_adapter():
        reference, _ = answer_logps(engine.model, batch, autocast)
    policy, tokens = answer_logps(engine.model, batch, autocast)
    return pair_losses(policy, reference, tokens, settings)


def optimizer_step(engine, micro, autocast, world: int, device, settings: DpoSection):
    """One optimizer step over `micro` (batches of PairCollate); the loss is the mean over
    all pairs of all micro-batches on all workers. Returns (loss, real tokens, grad norm,
    the mean of each of STATS)."""
    local = [sum((int(b[ROW].max()) + 1) // 2 for b in micro),
             sum(int(b.pop(REAL_TOKENS)) for b in micro)]
    counts = torch.tensor(local, device=device, dtype=torch.long)
    if world > 1:
        dist.all_reduce(counts)
    pairs, real_tokens = int(counts[0]), int(counts[1])
    denominator = max(pairs, 1) / world  # gradients are averaged over workers
    sums = torch.zeros(len(STATS), device=device, dtype=torch.float64)
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with engine.no_sync(last):
            losses, stats = _pair_forward(engine, batch, autocast, settings)
            engine.backward(losses.sum() / denominator, last)
        sums += stats.sum(0)
    grad_norm = engine.step()
    if world > 1:
        dist.all_reduce(sums)
    means = {name: float(v) for name, v in zip(STATS, sums / max(pairs, 1))}
    return means.pop("loss"), real_tokens, grad_norm, means


@torch.no_grad()
def evaluate(engine, shard, collate, batch_size: int, device, autocast,
             settings: DpoSection) -> dict[str, float]:
    """eval_loss (the DPO loss), eval_reward_accuracy, eval_reward_margin, eval_chosen_reward
    and eval_rejected_reward over the eval pairs of all workers."""
    engine.model.eval()
    sums = torch.zeros(len(STATS) + 1, device=device, dtype=torch.float64)
    for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate,
                                          device=device):
        batch.pop(REAL_TOKENS, None)
        _, stats = _pair_forward(engine, batch, autocast, settings)
        sums[:-1] += stats.sum(0)
        sums[-1] += stats.shape[0]
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.model.train()
    means = sums[:-1] / sums[-1].clamp(min=1)
    return {f"eval_{name}": float(v) for name, v in zip(STATS, means)}
