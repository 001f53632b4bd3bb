"""What the preference methods share: whole answers as batch rows, and each answer's
log-probability under the model.

A batch holds one row per answer (the prompt and its answer; prompt tokens masked),
laid out as the SFT sequences are (`PackedCollate`): no attention mask, each row its own
document by its position_ids; right-padded (sdpa, eager) or flattened into one row
(`flatten`, for flash_attention_2), so padding costs no attention work there. `ROW` maps
every token to its row, for the per-answer sums.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ray_app.data.collate import REAL_TOKENS, PackedCollate
from ray_app.data.order import SAMPLE_ID
from ray_app.data.tokenize import IGNORE

ROW = "row_index"  # batch key: the row (answer) each token belongs to, -1 for padding
KL_PREFIX = "kl_"  # KTO: the batch of mismatched (prompt, completion) rows, keys prefixed


class RowsCollate:
    """Token rows -> model inputs with `ROW`; every row's first label is masked, so a
    flattened batch never trains one row on the first token of the next."""

    def __init__(self, pad_id: int, *, flatten: bool = False):
        self.pack = PackedCollate(pad_id, flatten=flatten)
        self.flatten = flatten

    def __call__(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> dict[str, torch.Tensor]:
        labels = [np.asarray(r, dtype=np.int64).copy() for r in labels]
        for row in labels:
            row[0] = IGNORE
        out = self.pack({"input_ids": ids, "labels": labels})
        lengths = [len(r) for r in ids]
        if self.flatten:
            rows = np.repeat(np.arange(len(ids)), lengths)[None]
        else:
            rows = np.full(tuple(out["input_ids"].shape), -1, dtype=np.int64)
            for i, n in enumerate(lengths):
                rows[i, :n] = i
        out[ROW] = torch.from_numpy(rows.astype(np.int64))
        return out


class PairCollate:
    """n pairs -> 2n rows, the n chosen answers then the n rejected."""

    def __init__(self, pad_id: int, *, flatten: bool = False):
        self.rows = RowsCollate(pad_id, flatten=flatten)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(r) for r in (*batch["input_ids"], *batch["rejected_input_ids"])]
        out = self.rows(ids, [*batch["labels"], *batch["rejected_labels"]])
        if SAMPLE_ID in batch:
            out[SAMPLE_ID] = torch.as_tensor(np.asarray(batch[SAMPLE_ID], dtype=np.int64))
        return out


class CompletionCollate:
    """n labelled completions -> their n rows, plus (keys prefixed `KL_PREFIX`) n
    mismatched rows for KTO's KL estimate: prompt i with the completion of record i - 1,
    the batch's completions rotated by one as TRL's KTOTrainer pairs them, cut to
    `max_len` tokens."""

    def __init__(self, pad_id: int, max_len: int, *, flatten: bool = False):
        self.rows = RowsCollate(pad_id, flatten=flatten)
        self.max_len = max_len

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = [np.asarray(r, dtype=np.int64) for r in batch["input_ids"]]
        labels = [np.asarray(r, dtype=np.int64) for r in batch["labels"]]
        out = self.rows(ids, labels)
        starts = [_answer_start(row) for row in labels]
        kl_ids, kl_labels = [], []
        for i in range(len(ids)):
            j = i - 1  # record 0 takes the last record's completion
            kl_ids.append(np.concatenate([ids[i][:starts[i]], ids[j][starts[j]:]])[:self.max_len])
            kl_labels.append(np.concatenate([np.full(starts[i], IGNORE),
                                             labels[j][starts[j]:]])[:self.max_len])
        kl = self.rows(kl_ids, kl_labels)
        out[REAL_TOKENS] = out[REAL_TOKENS] + kl.pop(REAL_TOKENS)
        out.update({KL_PREFIX + k: v for k, v in kl.items()})
        out["desirable"] = torch.as_tensor(np.asarray(batch["desirable"], dtype=bool))
        if SAMPLE_ID in batch:
            out[SAMPLE_ID] = torch.as_tensor(np.asarray(batch[SAMPLE_ID], dtype=np.int64))
        return out


def _answer_start(labels: np.ndarray) -> int:
    """Where a row's answer begins: its first trained token (after the masked prompt)."""
    trained = np.flatnonzero(labels[1:] != IGNORE)
    return int(trained[0]) + 1 if len(trained) else len(labels)


def kl_view(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mismatched rows of a `CompletionCollate` batch, under the usual keys."""
    return {k[len(KL_PREFIX):]: v for k, v in batch.items() if k.startswith(KL_PREFIX)}


# The logits of at most this many bytes exist at once in `answer_logps` (bf16 logits, their
# fp32 copy and fp32 log-softmax: 10 bytes per token and vocabulary entry). 8 pairs of
# 512-token answers under a 128k vocabulary would take 10 GiB in one piece.
LOGITS_BUDGET_BYTES = 1 << 30
_BYTES_PER_LOGIT = 10
_WHOLE_LOGITS = "_ray_app_whole_logits"  # set on an output layer that the probe refuted


def answer_logps(model, batch: dict[str, torch.Tensor], autocast,
                 chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's trained tokens, their count), per row.

    Only the trained tokens' logits are computed (the prompts', often most of a preference
    batch, never are), and those a chunk of `chunk_tokens` at a time (by default as many
    as fit LOGITS_BUDGET_BYTES): the model returns its final hidden states, its output
    layer runs per chunk under activation checkpointing, and backward recomputes one
    chunk's logits at a time. The model's own logits at one position are computed in the
    same forward and checked against the output layer's: an architecture that transforms
    its logits in a way not known here falls back to whole logits (exact, more memory)."""
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    trained = labels != IGNORE
    keep = trained.any(0).nonzero().squeeze(1)
    inner = _unwrapped(model)
    head = inner.get_output_embeddings()
    # ZeRO-3 gathers a partitioned weight for the model's forward only, not for the
    # recomputation of a chunk in backward: whole logits there.
    partitioned = hasattr(getattr(head, "weight", None), "ds_id")
    if partitioned or getattr(head, _WHOLE_LOGITS, False) or len(keep) == 0:
        return _whole_logits_logps(model, batch, autocast, labels, keep)
    cap = getattr(inner.config, "final_logit_softcapping", None)  # Gemma 2 and 3
    with autocast:
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                    use_cache=False, output_hidden_states=True, logits_to_keep=keep[:1])
    final = out.hidden_states[-1]
    with torch.no_grad():
        probe = _logits(head, final[:, keep[:1]].detach(), autocast, cap)
        expected = out.logits.detach().float()
        reproduced = torch.allclose(probe, expected, rtol=0.0,
                                    atol=0.02 * max(1.0, float(expected.abs().max())))
    if not reproduced:
        setattr(head, _WHOLE_LOGITS, True)
        return _whole_logits_logps(model, batch, autocast, labels, keep)
    hidden = final[:, :-1][trained]  # [trained tokens, hidden]
    targets = labels[trained]
    if chunk_tokens is None:
        vocab = getattr(head, "out_features", 0) or int(expected.shape[-1])
        chunk_tokens = max(1, LOGITS_BUDGET_BYTES // (_BYTES_PER_LOGIT * vocab))
    pieces = []
    for start in range(0, len(targets), chunk_tokens):
        piece = (head, hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens],
                 autocast, cap)
        pieces.append(checkpoint(_token_logps, *piece, use_reentrant=False)
                      if torch.is_grad_enabled() else _token_logps(*piece))
    return _per_row(torch.cat(pieces), batch[ROW][:, 1:][trained], batch)


def _whole_logits_logps(model, batch, autocast, labels, keep):
    """answer_logps with the logits of every kept position in one piece."""
    with autocast:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False, logits_to_keep=keep).logits
    labels = labels[:, keep]
    logits = logits.float()
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE, reduction="none").view_as(labels)
    trained = labels != IGNORE
    return _per_row(token_logps[trained], batch[ROW][:, 1:][:, keep][trained], batch)


def _per_row(token_logps: torch.Tensor, owner: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    rows = int(batch[ROW].max()) + 1
    sums = token_logps.new_zeros(rows).index_add(0, owner, token_logps)
    counts = torch.zeros(rows, dtype=torch.long, device=owner.device).index_add(
        0, owner, torch.ones_like(owner))
    return sums, counts


def _logits(head, hidden: torch.Tensor, autocast, cap: float | None) -> torch.Tensor:
    with autocast:
        logits = head(hidden)
    logits = logits.float()
    return torch.tanh(logits / cap) * cap if cap else logits


def _token_logps(head, hidden, targets, autocast, cap) -> torch.Tensor:
    return -F.cross_entropy(_logits(head, hidden, autocast, cap), targets, reduction="none")


def _unwrapped(model) -> torch.nn.Module:
    """The PEFT model under a DDP or DeepSpeed wrapper. Its output layer is called as a
    module, so that FSDP2 and ZeRO-3 gather its weight as they do in the forward."""
    while hasattr(model, "module"):
        model = model.module
    return model


def reference_logps(engine, batch: dict[str, torch.Tensor], autocast) -> torch.Tensor:
    """Per-row answer log-probs under the reference: the base with the adapter disabled
    (no second copy of the model; at step 0 it equals the policy exactly)."""
    with torch.no_grad(), engine.peft_model.disable_adapter():
        return answer_logps(engine.model, batch, autocast)[0]
