"""Supervised fine-tuning: next-token cross-entropy on the trained tokens.

The step's loss is the mean over all trained tokens (labels != -100) of all its
micro-batches on all workers, whatever their padding, packing or length: each batch's
summed cross-entropy is divided by the step's global token count (transformers'
`num_items_in_batch`), so gradient accumulation and data parallelism give the same
gradient as one large batch.
"""

from __future__ import annotations

import math
from typing import Any

from ray_app.data.collate import PackedCollate, PadCollate
from ray_app.data.tokenize import IGNORE
from ray_app.train.methods.base import TrainingMethod


class SFT(TrainingMethod):
    name = "sft"
    record_kind = "sequences"
    STATS = ("loss",)
    SUMMARY = ("perplexity",)

    def collates(self, pad_id: int, flatten: bool):
        # Packed rows keep their documents apart through position_ids (no attention mask).
        return PackedCollate(pad_id, flatten=flatten), PadCollate(pad_id)

    def units(self, batch) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss(self, engine, batch, autocast, denominator):
        with autocast:
            out = engine.model(**batch, num_items_in_batch=denominator)
        return out.loss, (out.loss.detach() * denominator).double().reshape(1)

    def eval_sums(self, engine, batch, autocast):
        # Liger's fused loss skips the logits only in training mode unless told to; without
        # it evaluation would hold a (batch, seq, vocab) tensor, the largest of the run.
        fused = getattr(engine.peft_model, "fused_linear_loss", False)
        with autocast:
            out = engine.model(**batch, num_items_in_batch=1,
                               **({"skip_logits": True} if fused else {}))
        return out.loss.detach().double().reshape(1), self.units(batch)

    def eval_metrics(self, means: dict[str, float]) -> dict[str, Any]:
        loss = means["loss"]
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
