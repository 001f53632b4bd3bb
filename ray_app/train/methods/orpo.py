"""Odds Ratio Preference Optimization (train.method=orpo) on (prompt, chosen, rejected)
pairs: the SFT loss on the chosen answer plus `beta` times an odds-ratio term that
favours the chosen answer over the rejected one. No reference model: one forward pass of
the adapted model per batch.

As in TRL's `ORPOTrainer` (`odds_ratio_loss`), the odds are those of the mean
log-probability per answer token: log_odds = (c - r) - (log(1 - e^c) - log(1 - e^r)),
loss = NLL(chosen) - beta * log sigmoid(log_odds), rewards = beta * c and beta * r. One
difference, on purpose: the SFT term is each chosen answer's mean token NLL, averaged
over pairs, where TRL averages over the batch's tokens; so every pair weighs the same and
a step's loss does not depend on how it is split over micro-batches and workers (the two
agree when the chosen answers are equally long).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_app.train.methods.answers import answer_logps
from ray_app.train.methods.pairwise import PairwiseMethod

STATS = ("loss", "nll_loss", "log_odds_ratio", "log_odds_chosen", "reward_accuracy",
         "reward_margin", "chosen_reward", "rejected_reward")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, as TRL's)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def orpo_losses(logps: torch.Tensor, tokens: torch.Tensor, beta: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss per pair, STATS per pair) from per-row answer log-prob sums and token counts
    of the 2n rows (chosen first)."""
    chosen, rejected = (logps / tokens.clamp(min=1)).chunk(2)  # mean log p per token
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    nll = -chosen
    losses = nll - beta * ratio
    chosen_reward, rejected_reward = beta * chosen.detach(), beta * rejected.detach()
    stats = torch.stack([losses.detach(), nll.detach(), ratio.detach(), log_odds.detach(),
                         (chosen_reward > rejected_reward).to(losses.dtype),
                         chosen_reward - rejected_reward, chosen_reward, rejected_reward], 1)
    return losses, stats.double()


class ORPO(PairwiseMethod):
    """train.method=orpo; settings in train.orpo."""

    name = "orpo"
    STATS = STATS
    SUMMARY = ("nll_loss", "log_odds_ratio", "reward_accuracy", "reward_margin")

    def pair_losses(self, engine, batch, autocast):
        logps, tokens = answer_logps(engine.model, batch, autocast)
        return orpo_losses(logps, tokens, self.cfg.train.orpo.beta)
