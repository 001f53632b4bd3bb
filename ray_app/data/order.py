"""The order in which training workers see the train sequences, and the resume cursor.

The prepared train sequences (`<cache>/train/*.parquet`) are read in *chunks* (Parquet
row groups of `CHUNK_ROWS` sequences). For each epoch there is one global order of all N
sequences, a pure function of (seed, epoch) and the prepared data:

    chunks in a seeded permutation, the rows of each chunk in a seeded permutation.

Global position g of that order goes to rank g % world_size, and only the first
(N // world_size) * world_size positions are used, so every rank gets the same number of
samples (and so the same number of steps, which DDP/FSDP need). What a worker receives
is therefore a pure function of (seed, epoch, world size).

The resume hook is one integer per epoch, the *global sample cursor*: how many positions
of the epoch's global order have been trained on by all ranks together. After every rank
has consumed k samples, cursor = k * world_size. Passing it back as `start_sample` skips
exactly those samples; with a different world size after the restart the cursor is
rounded up to a multiple of the new world size (skipping at most world_size - 1 samples)
so that ranks stay equal.

Reading is plain pyarrow on the worker, one row group at a time (bounded memory, any
pyarrow filesystem including s3:// and gs://). Ray Data's streaming split hands blocks
to whichever worker asks first, which is fast but not reproducible; exact resume needs
the order fixed, and all the heavy work (reading shards, tokenizing, dedup, packing) has
already been done by Ray Data when this runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK_ROWS = 256  # sequences per Parquet row group of the train split
COLUMNS = ("input_ids", "labels", "position_ids")  # SFT sequences (packed or not)
PAIR_COLUMNS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")  # DPO pairs
COMPLETION_COLUMNS = ("input_ids", "labels", "desirable")  # KTO's labelled completions
# The columns of the prepared rows, by what the training method trains on.
RECORD_COLUMNS = {"sequences": COLUMNS, "pairs": PAIR_COLUMNS, "completions": COMPLETION_COLUMNS}
SAMPLE_ID = "sample_id"  # a sequence's index in the prepared data (file, row group, row order)


@dataclass(frozen=True)
class Chunk:
    file: str  # path or URI of a Parquet file
    row_group: int
    rows: int


@dataclass(frozen=True)
class TrainStream:
    """The prepared train sequences as an ordered, resumable stream. Small and picklable:
    build it on the driver (`PreparedData.train_stream()`), pass it to the workers."""

    chunks: tuple[Chunk, ...]
    columns: tuple[str, ...] = COLUMNS

    @property
    def num_samples(self) -> int:
        return sum(c.rows for c in self.chunks)

    def samples_per_rank(self, world_size: int) -> int:
        """Samples each rank gets per epoch (the same on every rank)."""
        return self.num_samples // world_size

    def batches_per_rank(self, world_size: int, batch_size: int) -> int:
        """Micro-batches per rank per epoch (the last one may be short)."""
        return math.ceil(self.samples_per_rank(world_size) / batch_size)

    def start_of(self, cursor: int, world_size: int) -> int:
        """Where a run resumed at `cursor` really starts: rounded up to a multiple of the
        world size, so that every rank still gets the same number of samples."""
        return math.ceil(cursor / world_size) * world_size

    def samples(self, *, epoch: int, seed: int, world_size: int, rank: int,
                start_sample: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The rank's samples as dicts of numpy arrays plus their `sample_id` (the
        sequence's index in the prepared data), reading one chunk at a time."""
        _check(world_size, rank, start_sample)
        usable = self.samples_per_rank(world_size) * world_size
        first = self.start_of(start_sample, world_size)
        offsets = np.cumsum([0] + [c.rows for c in self.chunks])
        rng = np.random.default_rng([seed, epoch])
        g = 0
        for c in rng.permutation(len(self.chunks)):
            chunk = self.chunks[int(c)]
            start, g = g, g + chunk.rows
            if g <= first:
                continue  # wholly before the cursor: not even read
            if start >= usable:
                return
            rows = np.random.default_rng([seed, epoch, int(c)]).permutation(chunk.rows)
            positions = start + np.arange(chunk.rows)
            mine = rows[(positions >= first) & (positions < usable)
                        & (positions % world_size == rank)]
            if len(mine):
                lists = _read_chunk(chunk, self.columns)
                for r in mine:
                    sample = {name: values[r] if bounds is None else values[bounds[r]:bounds[r + 1]]
                              for name, (bounds, values) in lists.items()}
                    sample[SAMPLE_ID] = np.int64(offsets[int(c)] + r)
                    yield sample

    def batches(self, *, epoch: int, seed: int, world_size: int, rank: int, batch_size: int,
                start_sample: int = 0,
                collate: Callable[[dict[str, list]], Any] | None = None) -> Iterator[Any]:
        """Micro-batches of `batch_size` samples for `rank`, through `collate` when given.

        Every rank yields `batches_per_rank(world_size, batch_size)` batches when started
        at cursor 0. After k batches on each rank the cursor is
        `k * batch_size * world_size` (`cursor_after(k, batch_size, world_size)`)."""
        keys = [*self.columns, SAMPLE_ID]
        pending: dict[str, list] = {name: [] for name in keys}
        for sample in self.samples(epoch=epoch, seed=seed, world_size=world_size, rank=rank,
                                   start_sample=start_sample):
            for name in keys:
                pending[name].append(sample[name])
            if len(pending["input_ids"]) == batch_size:
                yield collate(pending) if collate else pending
                pending = {name: [] for name in keys}
        if pending["input_ids"]:
            yield collate(pending) if collate else pending


def cursor_after(batches: int, batch_size: int, world_size: int) -> int:
    """The global sample cursor once every rank has trained on `batches` micro-batches of
    the epoch: what the loop saves in its checkpoint and passes back as `start_sample`."""
    return batches * batch_size * world_size


def _check(world_size: int, rank: int, start_sample: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world size {world_size}")
    if start_sample < 0:
        raise ValueError(f"start_sample must be >= 0, got {start_sample}")


def _read_chunk(chunk: Chunk, columns: tuple[str, ...]
                ) -> dict[str, tuple[np.ndarray | None, np.ndarray]]:
    """{column: (row bounds, flat values)}: row r is values[bounds[r]:bounds[r + 1]],
    sliced without building a Python list per row; a scalar column (KTO's `desirable`)
    has no bounds, its row r is values[r]."""
    import pyarrow.parquet as pq

    from ray_app.data.storage import filesystem

    fs, path = filesystem(chunk.file)
    with fs.open_input_file(path) as f:
        table = pq.ParquetFile(f).read_row_group(chunk.row_group, columns=list(columns))
    out = {}
    for name in columns:
        lists = table.column(name).combine_chunks()
        if not hasattr(lists, "offsets"):
            out[name] = (None, lists.to_numpy(zero_copy_only=False))
            continue
        bounds = lists.offsets.to_numpy()
        out[name] = (bounds - bounds[0], lists.flatten().to_numpy(zero_copy_only=False))
    return out


def index_chunks(folder: str) -> tuple[Chunk, ...]:
    """Every row group of every Parquet file under `folder`, files in name order."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from ray_app.data.storage import filesystem, join_uri

    fs, root = filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    chunks = []
    for info in sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path):
        uri = join_uri(folder, info.path[len(root):].lstrip("/"))
        with fs.open_input_file(info.path) as f:
            meta = pq.ParquetFile(f).metadata
        chunks += [Chunk(uri, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)
                   if meta.row_group(g).num_rows]
    return tuple(chunks)
