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
import torch.nn.functional as F

from ray_app.config import DpoSection
from ray_app.data.collate import PackedCollate
from ray_app.data.order import SAMPLE_ID
from ray_app.data.tokenize import IGNORE
from ray_app.train.methods.base import TrainingMethod

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


class DPO(TrainingMethod):
    """train.method=dpo; each pair weighs the same in the step's mean."""

    name = "dpo"
    record_kind = "pairs"
    STATS = STATS
    SUMMARY = ("reward_accuracy", "reward_margin")

    def collates(self, pad_id: int, flatten: bool):
        collate = PairCollate(pad_id, flatten=flatten)
        return collate, collate

    def units(self, batch) -> int:
        return (int(batch[ROW].max()) + 1) // 2

    def loss(self, engine, batch, autocast, denominator):
        losses, stats = _pair_forward(engine, batch, autocast, self.cfg.train.dpo)
        return losses.sum() / denominator, stats.sum(0)

    def eval_sums(self, engine, batch, autocast):
        _, stats = _pair_forward(engine, batch, autocast, self.cfg.train.dpo)
        return stats.sum(0), stats.shape[0]

    def describe(self):
        return {**super().describe(), **self.cfg.train.dpo.model_dump()}
