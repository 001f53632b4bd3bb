"""Pads a batch of variable-length records into tensors for the training step."""

from __future__ import annotations

import numpy as np
import torch

from ray_app.data.tokenize import IGNORE

# Key of the batch entry that counts real (non-pad) tokens; the loop pops it before the
# forward pass. Every other key is passed to the model as a keyword argument.
REAL_TOKENS = "num_real_tokens"


class PadCollate:
    """Right-pads to the longest record of the batch, rounded up to a multiple of 8."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id = pad_id
        self.multiple = multiple

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        rows = list(batch["input_ids"])
        width = max(len(r) for r in rows)
        width = -(-width // self.multiple) * self.multiple
        n = len(rows)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, batch["labels"])):
            k = len(ids)
            input_ids[i, :k] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
            labels[i, :k] = torch.as_tensor(np.asarray(lab, dtype=np.int64))
            attention[i, :k] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention,
                REAL_TOKENS: attention.sum()}
