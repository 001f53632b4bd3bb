"""Checkpoint contents: adapter, optimizer, scheduler, RNG states and loop position.

Each strategy's engine writes its own files (rank 0 only for DDP/FSDP, one partition per
rank for DeepSpeed); Ray Train merges the ranks' folders into one checkpoint and makes it
the latest only once every rank's part is in storage. The frozen base is never written.

Every rank also writes its RNG states and a manifest (size and SHA-256 of each file it
wrote). A checkpoint whose manifests do not match its files (a truncated upload, a
corrupted object), or one with a file that would run code when unpickled, is refused on
resume, and the newest intact earlier one is used.

Durability:
- A rank's part is staged in a local folder that is removed as soon as Ray Train has
  uploaded it (and folders left by killed processes are removed at the next start), so
  local disk use does not grow with the number of checkpoints.
- Each attempt of a run (a start, or a restart of the worker group) names its folders
  `step_NNNNNNN-<attempt>`: a step that a failed attempt had already written (in part, or
  whole but corrupted) is never written into again, and Ray Train's bookkeeping of the
  old folder (`keep_checkpoints` deletes it) cannot touch the new one.
- Nothing is unpickled beyond tensors and plain data (`torch.load(weights_only=True)`):
  whoever can write the bucket must not be able to run code on the workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ray_app.model.adapters import INITIAL_ADAPTER
from ray_app.train.safe_load import UnsafeCheckpointError, safe_load

STATE_FILE = "train_state.json"
RNG_FILE = "rng_rank{rank:04d}.pt"
MANIFEST_FILE = "manifest_rank{rank:04d}.json"
STAGING_ROOT = Path(tempfile.gettempdir()) / "ray_app_staging"
_FOLDER = re.compile(r"step_(\d+)(?:-[0-9a-f]+)?")


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    sample_cursor: int = 0  # global samples of this epoch trained on (ray_app.data.order)
    tokens_seen: int = 0
    restarts: int = 0
    train_seconds: float = 0.0  # training wall clock: all steps, eval and checkpoints left out
    # The same wall clock split (ray_app.train.reporting): the first steps of each attempt
    # (compilation, autotuning) apart from the steady state after them.
    warmup_seconds: float = 0.0
    warmup_tokens: int = 0
    steady_seconds: float = 0.0
    steady_tokens: int = 0
    first_step_s: float | None = None  # worker start to the end of the run's first step
    eval_initial: dict[str, float] = field(default_factory=dict)  # eval metrics at step 0
    world_size: int = 0  # when saved
    resumes: list[dict] = field(default_factory=list)  # {"step", "world_size"} per resume


def new_attempt_id() -> str:
    """A fresh id for this attempt's checkpoint folders (call on rank 0, then share it)."""
    return uuid.uuid4().hex[:6]


def folder_name(step: int, attempt: str) -> str:
    return f"step_{step:07d}-{attempt}"


@contextmanager
def staged(engine, state: LoopState, rank: int) -> Iterator[str]:
    """This rank's part of a checkpoint in a new local folder, removed when the block ends
    (report it to Ray Train inside the block: its upload is synchronous)."""
    remove_orphaned_staging()
    folder = STAGING_ROOT / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        engine.save(folder, rank)
        initial = getattr(engine.peft_model, "initial_adapter", None)  # PiSSA/OLoRA only
        if rank == 0 and initial:
            save_file(initial, folder / INITIAL_ADAPTER)
        torch.save(_rng_state(), folder / RNG_FILE.format(rank=rank))
        if rank == 0:
            (folder / STATE_FILE).write_text(json.dumps(asdict(state)))
        files = {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        (folder / MANIFEST_FILE.format(rank=rank)).write_text(json.dumps(files))
        yield str(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def remove_orphaned_staging() -> None:
    """Removes staging folders whose process is gone (killed before it could clean up)."""
    if not STAGING_ROOT.is_dir():
        return
    for folder in STAGING_ROOT.iterdir():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def problem_with(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is complete, intact and
    holds nothing but tensors and plain data."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        world = json.loads((folder / STATE_FILE).read_text())["world_size"]
    except (ValueError, KeyError, TypeError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    manifests = sorted(folder.glob("manifest_rank*.json"))
    if len(manifests) != world:
        return f"{len(manifests)} of {world} ranks' manifests present"
    for manifest in manifests:
        try:
            entries = {name: (int(size), str(digest))
                       for name, (size, digest) in json.loads(manifest.read_text()).items()}
        except (ValueError, TypeError, AttributeError) as err:
            return f"{manifest.name} is unreadable (truncated or corrupted: {err})"
        for name, (size, digest) in entries.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size or _digest(path)[1] != digest:
                return f"{name} does not match its manifest (truncated or corrupted)"
    for path in sorted(folder.rglob("*.pt")):
        try:
            safe_load(path)
        except UnsafeCheckpointError as err:
            return str(err)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
            return f"{path.relative_to(folder)} is unreadable ({type(err).__name__}: {err})"
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
    # Several attempts may have written the same step; a partial one is refused when tried.
    older = sorted(((s, i.mtime_ns or 0, i.path) for i in infos
                    if i.type == pafs.FileType.Directory and i.path != checkpoint.path
                    and (s := _step_of(i.path.rsplit("/", 1)[-1])) is not None and s <= step),
                   reverse=True)
    return [ray.train.Checkpoint(path, filesystem=checkpoint.filesystem) for *_, path in older]


def _step_of(name: str) -> int | None:
    match = _FOLDER.fullmatch(name)
    return int(match.group(1)) if match else None


def load(folder: str | Path, engine, rank: int) -> LoopState:
    folder = Path(folder)
    engine.load(folder)
    state = LoopState(**json.loads((folder / STATE_FILE).read_text()))
    rng = folder / RNG_FILE.format(rank=rank)
    if rng.is_file() and state.world_size:  # a rank that did not exist before keeps its seed
        _set_rng_state(safe_load(rng))
    return state


def _digest(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return path.stat().st_size, sha.hexdigest()


def _rng_state() -> dict:
    """Every RNG of this process as tensors and plain values (loadable with
    weights_only=True; NumPy's key array is the one part that needs converting)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
