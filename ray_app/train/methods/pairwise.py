"""The base of the methods that train on (prompt, chosen, rejected) pairs: DPO, ORPO,
SimPO. Each pair weighs the same in the step's mean; a subclass only turns a batch's
per-answer log-probs into per-pair losses and statistics."""

from __future__ import annotations

from abc import abstractmethod

import torch

from ray_app.train.methods.answers import ROW, PairCollate
from ray_app.train.methods.base import TrainingMethod

# The statistics of a method whose loss compares a reward of the chosen answer with one of
# the rejected answer (DPO, SimPO), per pair.
REWARD_STATS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def reward_stats(losses: torch.Tensor, chosen_reward: torch.Tensor,
                 rejected_reward: torch.Tensor) -> torch.Tensor:
    """REWARD_STATS per pair [pairs, 5], in float64 (summed over many batches)."""
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return torch.stack([losses.detach(), (chosen_reward > rejected_reward).to(losses.dtype),
                        chosen_reward - rejected_reward, chosen_reward, rejected_reward],
                       1).double()


class PairwiseMethod(TrainingMethod):
    record_kind = "pairs"
    TRAINED_ROWS = 2  # chosen and rejected

    @abstractmethod
    def pair_losses(self, engine, batch, autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss per pair, STATS per pair [pairs, len(STATS)], loss first) of a batch of
        2n rows, the n chosen answers first."""

    def collates(self, pad_id: int, flatten: bool):
        collate = PairCollate(pad_id, flatten=flatten)
        return collate, collate

    def units(self, batch) -> int:
        return (int(batch[ROW].max()) + 1) // 2

    def loss(self, engine, batch, autocast, denominator):
        losses, stats = self.pair_losses(engine, batch, autocast)
        return losses.sum() / denominator, stats.sum(0)

    def eval_sums(self, engine, batch, autocast):
        _, stats = self.pair_losses(engine, batch, autocast)
        return stats.sum(0), stats.shape[0]

    def describe(self):
        return {**super().describe(), **getattr(self.cfg.train, self.name).model_dump()}
