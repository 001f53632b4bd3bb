"""Simple Preference Optimization (train.method=simpo) on (prompt, chosen, rejected)
pairs: reference-free, with the mean log-probability per answer token as the implicit
reward, and a target margin `gamma` between the chosen and the rejected reward. One
forward pass of the adapted model per batch.

As in TRL's `CPOTrainer` with loss_type="simpo" and cpo_alpha=0 (pure SimPO, no SFT
term): logits = (c - r) - gamma / beta over the per-token means c and r,
loss = -(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits),
rewards = beta * c and beta * r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_app.config import SimpoSection
from ray_app.train.methods.answers import answer_logps
from ray_app.train.methods.pairwise import REWARD_STATS, PairwiseMethod, reward_stats

STATS = REWARD_STATS


def simpo_losses(logps: torch.Tensor, tokens: torch.Tensor, settings: SimpoSection
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, STATS per pair) from per-row answer log-prob sums and token counts
    of the 2n rows (chosen first)."""
    beta, eps = settings.beta, settings.label_smoothing
    chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)
    logits = chosen - rejected - settings.gamma / beta
    losses = -(1 - eps) * F.logsigmoid(beta * logits) - eps * F.logsigmoid(-beta * logits)
    return losses, reward_stats(losses, beta * chosen, beta * rejected)


class SimPO(PairwiseMethod):
    """train.method=simpo; settings in train.simpo."""

    name = "simpo"
    STATS = STATS
    SUMMARY = ("reward_accuracy", "reward_margin")

    def pair_losses(self, engine, batch, autocast):
        logps, tokens = answer_logps(engine.model, batch, autocast)
        return simpo_losses(logps, tokens, self.cfg.train.simpo)
