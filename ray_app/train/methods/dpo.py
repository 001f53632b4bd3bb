"""Direct Preference Optimization (train.method=dpo) on (prompt, chosen, rejected) pairs.

The reference policy is the base model itself: the same weights with the LoRA adapter
disabled (`PeftModel.disable_adapter()`), so DPO needs no second copy of the model in
memory, and at step 0 (adapter B = 0) policy and reference agree exactly. Each pair's
score is the sum of the log-probabilities of its answer tokens (prompt tokens masked;
`answers.answer_logps`).

The losses follow TRL's `DPOTrainer` definitions (sigmoid with label smoothing, hinge,
length-normalised IPO); TRL computes them inside its trainer's `compute_loss`, so they are
restated here for the Ray Train loop, which keeps its own strategies and checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_app.config import DpoSection
from ray_app.train.methods.answers import answer_logps, reference_logps
from ray_app.train.methods.pairwise import REWARD_STATS, PairwiseMethod, reward_stats

# Per pair, summed over pairs (then divided by the pair count for the metrics).
STATS = REWARD_STATS


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
    return losses, reward_stats(losses, beta * chosen, beta * rejected)


class DPO(PairwiseMethod):
    """train.method=dpo; each pair weighs the same in the step's mean."""

    name = "dpo"
    STATS = STATS
    SUMMARY = ("reward_accuracy", "reward_margin")

    def pair_losses(self, engine, batch, autocast):
        reference = reference_logps(engine, batch, autocast)
        policy, tokens = answer_logps(engine.model, batch, autocast)
        return pair_losses(policy, reference, tokens, self.cfg.train.dpo)
