"""Kahneman-Tversky Optimization (train.method=kto) on labelled completions: unpaired
records `{prompt, completion, label}` (thumbs-up / thumbs-down feedback), or preference
pairs split into a desirable and an undesirable completion.

As in TRL's `KTOTrainer` (loss_type="kto"): with r = log p_policy - log p_reference of a
completion (the reference is the base with the adapter disabled) and z the KL estimate,
a desirable completion's loss is w_d * (1 - sigmoid(beta * (r - z))) and an undesirable
one's w_u * (1 - sigmoid(beta * (z - r))); every completion weighs the same in the mean.
z is estimated as TRL does: over mismatched pairs, each prompt of the batch with the
completion of the record before it (`answers.CompletionCollate`), as the batch mean of
their log-ratio, averaged over the data-parallel ranks, clamped at 0 and not
differentiated. In evaluation the mean is this rank's batch's (eval batches are not
aligned across ranks). The run's tokens/s counts the KL rows' tokens too: they are
computed (forward only, under the policy and the reference).
"""

from __future__ import annotations

from typing import Any

import torch

from ray_app.config import KtoSection
from ray_app.train.methods.answers import (
    ROW,
    CompletionCollate,
    answer_logps,
    kl_view,
    reference_logps,
)
from ray_app.train.methods.base import TrainingMethod

# Per completion; chosen_reward / rejected_reward are summed over the desirable /
# undesirable completions only, and turned into class means by `metrics`.
STATS = ("loss", "kl", "desirable", "chosen_reward", "rejected_reward")


def kto_losses(policy: torch.Tensor, reference: torch.Tensor, kl: torch.Tensor,
               desirable: torch.Tensor, settings: KtoSection) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per completion, STATS per completion) from per-completion log-probs under the
    policy and the reference, the KL estimate `kl` and the labels."""
    beta = settings.beta
    logratios = policy - reference
    chosen = settings.desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected = settings.undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen, rejected)
    rewards = beta * logratios.detach()
    zero = torch.zeros_like(rewards)
    stats = torch.stack([losses.detach(), kl.expand_as(rewards), desirable.to(rewards.dtype),
                         torch.where(desirable, rewards, zero),
                         torch.where(desirable, zero, rewards)], 1)
    return losses, stats.double()


def kl_estimate(engine, batch, autocast) -> torch.Tensor:
    """This batch's mean log-ratio over its mismatched rows (no gradient)."""
    rows = kl_view(batch)
    reference = reference_logps(engine, rows, autocast)
    with torch.no_grad():
        policy, _ = answer_logps(engine.model, rows, autocast)
    return (policy - reference).mean()


class KTO(TrainingMethod):
    """train.method=kto; settings in train.kto."""

    name = "kto"
    record_kind = "completions"
    STATS = STATS
    SUMMARY = ("kl", "chosen_reward", "rejected_reward", "reward_margin")

    def collates(self, pad_id: int, flatten: bool):
        collate = CompletionCollate(pad_id, self.cfg.data.max_seq_len, flatten=flatten)
        return collate, collate

    def units(self, batch) -> int:
        return int(batch[ROW].max()) + 1

    def _losses(self, engine, batch, autocast, kl: torch.Tensor):
        reference = reference_logps(engine, batch, autocast)
        policy, _ = answer_logps(engine.model, batch, autocast)
        return kto_losses(policy, reference, kl.clamp(min=0), batch["desirable"],
                          self.cfg.train.kto)

    def loss(self, engine, batch, autocast, denominator):
        # Every rank runs the same number of micro-batches per step, so this all-reduce
        # pairs up across ranks.
        kl = engine.all_reduce(kl_estimate(engine, batch, autocast).reshape(1)) / engine.dp_size
        losses, stats = self._losses(engine, batch, autocast, kl[0])
        return losses.sum() / denominator, stats.sum(0)

    def eval_sums(self, engine, batch, autocast):
        _, stats = self._losses(engine, batch, autocast, kl_estimate(engine, batch, autocast))
        return stats.sum(0), stats.shape[0]

    def metrics(self, means: dict[str, float]) -> dict[str, Any]:
        """Class means of the rewards (0 for a class absent from the step), and their
        margin, as TRL's KTO logs rewards/chosen, rewards/rejected and rewards/margins."""
        share, chosen, rejected = (means.pop(k) for k in ("desirable", "chosen_reward",
                                                           "rejected_reward"))
        chosen = chosen / share if share > 0 else 0.0
        rejected = rejected / (1 - share) if share < 1 else 0.0
        return {**means, "chosen_reward": chosen, "rejected_reward": rejected,
                "reward_margin": chosen - rejected, "desirable_share": share}

    def describe(self):
        return {**super().describe(), **self.cfg.train.kto.model_dump()}
