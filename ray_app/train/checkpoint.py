"""Checkpoint contents: adapter, optimizer, scheduler, RNG states and loop position.

Each strategy's engine writes its own files (rank 0 only for DDP/FSDP, one partition per
rank for DeepSpeed); Ray Train merges the ranks' folders into one checkpoint and makes it
the latest only once every rank's part is in storage. The frozen base is never written.

Every rank also writes its RNG states and a manifest (size and SHA-256 of each file it
wrote). A checkpoint whose manifests do not match its files (a truncated upload, a
corrupted object) is refused on resume, and the newest intact earlier one is used.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "train_state.json"
RNG_FILE = "rng_rank{rank:04d}.pt"
MANIFEST_FILE = "manifest_rank{rank:04d}.json"


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    sample_cursor: int = 0  # global samples of this epoch trained on (ray_app.data.order)
    tokens_seen: int = 0
    restarts: int = 0
    train_seconds: float = 0.0
    eval_initial: dict[str, float] = field(default_factory=dict)  # eval metrics at step 0
    world_size: int = 0  # when saved
    resumes: list[dict] = field(default_factory=list)  # {"step", "world_size"} per resume


def save(engine, state: LoopState, rank: int) -> str:
    """Writes this rank's part of a checkpoint into a new folder and returns it."""
    folder = Path(tempfile.mkdtemp(prefix="ray_app_ckpt_"))  # must outlive the report call
    engine.save(folder, rank)
    torch.save(_rng_state(), folder / RNG_FILE.format(rank=rank))
    if rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
    files = {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*"))
             if p.is_file()}
    (folder / MANIFEST_FILE.format(rank=rank)).write_text(json.dumps(files))
    return str(folder)


def problem_with(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is complete and intact."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        world = json.loads((folder / STATE_FILE).read_text())["world_size"]
    except (ValueError, KeyError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    manifests = sorted(folder.glob("manifest_rank*.json"))
    if len(manifests) != world:
        return f"{len(manifests)} of {world} ranks' manifests present"
    for manifest in manifests:
        for name, (size, digest) in json.loads(manifest.read_text()).items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size or _digest(path)[1] != digest:
                return f"{name} does not match its manifest (truncated or corrupted)"
    return None


@contextmanager
def newest_intact(checkpoint) -> Iterator[tuple[str | None, list[str]]]:
    """(folder, warnings): the newest intact checkpoint, starting at `checkpoint` (Ray
    Train's latest) and going back through the run's earlier ones; a warning names each
    one refused and why. The folder is None when none is intact."""
    warnings: list[str] = []
    for candidate in [checkpoint, *_earlier(checkpoint)]:
        with candidate.as_directory() as folder:
            problem = problem_with(folder)
            if problem is None:
                yield folder, warnings
                return
        warnings.append(f"checkpoint {candidate.path} is not usable: {problem}")
    yield None, warnings


def _earlier(checkpoint) -> list:
    """The run's other checkpoints (folders step_NNNNNNN beside it), newest first."""
    import pyarrow.fs as pafs
    import ray.train

    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    step = _step_of(name)
    if step is None:
        return []
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted(((s, i.path) for i in infos
                    if i.type == pafs.FileType.Directory
                    and (s := _step_of(i.path.rsplit("/", 1)[-1])) is not None and s < step),
                   reverse=True)
    return [ray.train.Checkpoint(path, filesystem=checkpoint.filesystem) for _, path in older]


def _step_of(name: str) -> int | None:
    match = re.fullmatch(r"step_(\d+)", name)
    return int(match.group(1)) if match else None


def load(folder: str | Path, engine, rank: int) -> LoopState:
    folder = Path(folder)
    engine.load(folder)
    state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
    rng = folder / RNG_FILE.format(rank=rank)
    if rng.is_file() and state.world_size:  # a rank that did not exist before keeps its seed
        _set_rng_state(torch.load(rng, weights_only=False))
    return state


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return path.stat().st_size, sha.hexdigest()


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
