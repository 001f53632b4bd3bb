"""The sample trace (run.record_samples): which sequences each optimizer step trained on.

Every rank appends one JSON line per step to `<storage>/<run>/sample_trace/rank-NNNN.jsonl`:
step, epoch, attempt (restarts so far), world size and the sample ids. Steps trained and
then lost to a failure appear again under a later attempt; the last attempt's line for a
step is the one that counts. Audits that a resumed run trained on every sample once.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_app.errors import UserError

FOLDER = "sample_trace"


def trace_folder(storage: str, run_name: str) -> Path:
    if "://" in storage:
        raise UserError("run.record_samples needs a local or NFS run.storage_path "
                        f"(appending to {storage.split('://')[0]}:// objects is not possible).")
    return Path(storage) / run_name / FOLDER


class SampleTrace:
    def __init__(self, folder: Path, rank: int, world_size: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / f"rank-{rank:04d}.jsonl"
        self.rank, self.world_size = rank, world_size

    def write(self, state, sample_ids: list[int]) -> None:
        line = {"step": state.step, "epoch": state.epoch, "attempt": state.restarts,
                "rank": self.rank, "world_size": self.world_size, "samples": sample_ids}
        with self.file.open("a") as f:
            f.write(json.dumps(line) + "\n")


def committed_steps(folder: Path) -> dict[int, list[int]]:
    """step -> sample ids of all ranks, from each step's last attempt."""
    latest: dict[int, tuple[int, dict[int, list[int]]]] = {}
    for file in sorted(folder.glob("rank-*.jsonl")):
        for raw in file.read_text().splitlines():
            line = json.loads(raw)
            attempt, ranks = latest.get(line["step"], (-1, {}))
            if line["attempt"] > attempt:
                attempt, ranks = line["attempt"], {}
            if line["attempt"] == attempt:
                ranks[line["rank"]] = line["samples"]
                latest[line["step"]] = (attempt, ranks)
    return {step: [i for r in sorted(ranks) for i in ranks[r]]
            for step, (_, ranks) in sorted(latest.items())}
