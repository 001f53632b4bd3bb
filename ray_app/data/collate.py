"""Turns a batch of token rows into model inputs for the training step."""

from __future__ import annotations

import numpy as np
import torch

from ray_app.data.order import SAMPLE_ID
from ray_app.data.tokenize import IGNORE

# Key of the batch entry that counts real (non-pad) tokens; the loop pops it before the
# forward pass. SAMPLE_ID (the ids of the batch's sequences, when the rows carry them)
# is popped as well. Every other key is passed to the model as a keyword argument.
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


class PackedCollate:
    """Packed (or plain) rows -> `input_ids`, `labels`, `position_ids`, and no attention mask.

    Documents are told apart by their `position_ids` restarting at 0; transformers then
    keeps them from attending to each other. Without an `attention_mask` argument:
    - `flatten=False` (sdpa, eager): rows are right-padded to a common width (multiple of
      `multiple`); the padding continues the last document's positions with label -100:
      causal attention keeps real tokens from seeing it, and a batch whose rows each hold
      one document (DPO pairs, packing off) has no restart in its positions, so
      transformers runs plain causal attention with no mask tensor (the fast kernels, and
      none of the masked-SDPA backward paths that gave NaN gradients on H100).
    - `flatten=True` (flash_attention_2): the whole batch becomes one row of shape
      [1, total tokens] with no padding at all (transformers' varlen path needs batch 1).
    Rows without a `position_ids` column (packing off) count as one document each.
    """

    def __init__(self, pad_id: int, *, flatten: bool = False, multiple: int = 8):
        self.pad_id = pad_id
        self.flatten = flatten
        self.multiple = multiple

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(r, dtype=np.int64) for r in batch["input_ids"]]
        labels = [np.asarray(r, dtype=np.int64) for r in batch["labels"]]
        positions = ([np.asarray(r, dtype=np.int64) for r in batch["position_ids"]]
                     if "position_ids" in batch else [np.arange(len(r)) for r in ids])
        real = sum(len(r) for r in ids)
        if self.flatten:
            out = [torch.from_numpy(np.concatenate(x))[None] for x in (ids, labels, positions)]
        else:
            width = -(-max(len(r) for r in ids) // self.multiple) * self.multiple
            out = [torch.from_numpy(np.stack([_pad(r, width, fill) for r in rows]))
                   for rows, fill in ((ids, self.pad_id), (labels, IGNORE), (positions, None))]
        batch_out = {"input_ids": out[0], "labels": out[1], "position_ids": out[2],
                     REAL_TOKENS: torch.tensor(real)}
        if SAMPLE_ID in batch:
            batch_out[SAMPLE_ID] = torch.as_tensor(np.asarray(batch[SAMPLE_ID], dtype=np.int64))
        return batch_out


def _pad(row: np.ndarray, width: int, fill: int | None) -> np.ndarray:
    """`row` right-padded to `width` with `fill`, or when fill is None (positions) with the
    positions that continue its last one."""
    start = (int(row[-1]) + 1 if len(row) else 0) if fill is None else 0
    tail = (np.arange(start, start + width - len(row)) if fill is None
            else np.full(width - len(row), fill))
    return np.concatenate([row, tail.astype(np.int64)])
