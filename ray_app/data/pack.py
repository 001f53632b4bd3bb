"""Packing: several tokenized records into each `max_seq_len` sequence.

Records are placed by best-fit decreasing within each Ray Data batch (a few thousand
records), which fills sequences to well over 90% on typical SFT length mixes. Every
document keeps its own `position_ids` (0, 1, 2, ... from its first token), which is how
transformers recognises a packed row and keeps documents from attending to each other
(sdpa/eager: a block-diagonal mask when no attention mask is given; flash_attention_2:
varlen kernels on a flattened batch). The first label of every document is masked, so no
document is trained to predict the first token of the next.

The same step drops exact duplicates and applies per-source sampling weights, because it
is the one pass over the accepted train records before they are written for training.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
import pyarrow as pa

from ray_app.data.tokenize import IGNORE

PAIR_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("rejected_input_ids", pa.list_(pa.int32())), ("rejected_labels", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
])
COMPLETION_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("desirable", pa.bool_()), ("num_tokens", pa.int32()),
])
SEQUENCE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())), ("num_tokens", pa.int32()), ("num_docs", pa.int32()),
])


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups item indices into bins of at most `capacity` (each length <= capacity).

    Longest first, each into the fullest bin that still has room; ties go to the earlier
    item and the earlier bin, so the result is a pure function of `lengths`.

    >>> best_fit_decreasing([5, 3, 4, 2], 8)
    [[0, 1], [2, 3]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def copies_of(content_hash: str, weight: float) -> int:
    """How many times a record appears per epoch under its source's sampling weight:
    floor(weight), plus one more for a hash-chosen `weight % 1` share of the records."""
    whole, part = int(weight), weight - int(weight)
    extra = part > 0 and int(content_hash[8:16], 16) / 0x1_0000_0000 < part
    return whole + int(extra)


def pack_batch(batch: dict[str, Any], *, max_seq_len: int, packing: bool,
               weights: dict[int, float], duplicates: np.ndarray) -> pa.Table:
    """Ray Data batch function: accepted train records in, training sequences out."""
    docs: list[tuple[np.ndarray, np.ndarray]] = []
    for i, n in _kept(batch, weights, duplicates):
        ids = np.asarray(batch["input_ids"][i], dtype=np.int32)
        labels = np.asarray(batch["labels"][i], dtype=np.int32).copy()
        labels[0] = IGNORE  # never trained to predict a document's first token
        docs += [(ids, labels)] * n
    groups = (best_fit_decreasing([len(d[0]) for d in docs], max_seq_len) if packing
              else [[i] for i in range(len(docs))])
    rows = {name: [] for name in SEQUENCE_SCHEMA.names}
    for group in groups:
        parts = [docs[i] for i in group]
        rows["input_ids"].append(np.concatenate([p[0] for p in parts]))
        rows["labels"].append(np.concatenate([p[1] for p in parts]))
        rows["position_ids"].append(np.concatenate(
            [np.arange(len(p[0]), dtype=np.int32) for p in parts]))
        rows["num_tokens"].append(sum(len(p[0]) for p in parts))
        rows["num_docs"].append(len(parts))
    return pa.Table.from_pydict(rows, schema=SEQUENCE_SCHEMA)


def pair_batch(batch: dict[str, Any], *, weights: dict[int, float],
               duplicates: np.ndarray) -> pa.Table:
    """Ray Data batch function for train.method=dpo: accepted preference records in, one
    row per (chosen, rejected) pair out (never packed: DPO compares whole answers)."""
    rows = {name: [] for name in PAIR_SCHEMA.names}
    for i, n in _kept(batch, weights, duplicates):
        for _ in range(n):
            for name in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
                rows[name].append(np.asarray(batch[name][i], dtype=np.int32))
            rows["num_tokens"].append(len(rows["input_ids"][-1]) + len(rows["rejected_input_ids"][-1]))
    return pa.Table.from_pydict(rows, schema=PAIR_SCHEMA)


def completion_batch(batch: dict[str, Any], *, weights: dict[int, float],
                     duplicates: np.ndarray) -> pa.Table:
    """Ray Data batch function for train.method=kto: accepted records in, one row per
    labelled completion out, never packed. An unpaired record gives its completion and
    label; a preference pair gives two rows, its chosen answer desirable and its rejected
    one not (as TRL's `unpair_preference_dataset` does)."""
    rows = {name: [] for name in COMPLETION_SCHEMA.names}

    def add(ids, labels, desirable: bool) -> None:
        rows["input_ids"].append(np.asarray(ids, dtype=np.int32))
        rows["labels"].append(np.asarray(labels, dtype=np.int32))
        rows["desirable"].append(bool(desirable))
        rows["num_tokens"].append(len(rows["input_ids"][-1]))

    for i, n in _kept(batch, weights, duplicates):
        for _ in range(n):
            add(batch["input_ids"][i], batch["labels"][i], batch["desirable"][i])
            if len(batch["rejected_input_ids"][i]):
                add(batch["rejected_input_ids"][i], batch["rejected_labels"][i], False)
    return pa.Table.from_pydict(rows, schema=COMPLETION_SCHEMA)


def _kept(batch: dict[str, Any], weights: dict[int, float],
          duplicates: np.ndarray) -> list[tuple[int, int]]:
    """(row index, copies per epoch) of the batch's records that are not later duplicates."""
    origins = np.asarray(batch["origin"], dtype=np.int64)
    keep = ~np.isin(origins, duplicates) if len(duplicates) else np.ones(len(origins), bool)
    return [(int(i), copies_of(str(batch["content_hash"][i]),
                               weights.get(int(batch["source_id"][i]), 1.0)))
            for i in np.flatnonzero(keep)]
