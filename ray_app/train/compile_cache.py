"""torch.compile's caches kept with the run, so that a restarted worker does not compile again.

Inductor keeps compiled kernels and graphs in a node-local folder (TORCHINDUCTOR_CACHE_DIR,
by default /tmp/torchinductor_<user>), which a worker restarted on the same node finds. One
restarted on another node (a replaced pod, a reclaimed VM) would start cold, so rank 0 also
saves the caches' artifacts (`torch.compiler.save_cache_artifacts`: FX and AOTAutograd
graphs, Triton kernels, autotuning results) under the run's storage after the first step of
an attempt, and every worker loads them before it first compiles. The file's name carries
the torch version and the GPU model, for which alone the artifacts are valid; within that,
entries are keyed by the graphs they compile, so loading some that this run does not use
is harmless.
"""

from __future__ import annotations

import re

import torch

from ray_app.data import storage


def cache_uri(storage_uri: str, run_name: str, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tag = re.sub(r"[^A-Za-z0-9.]+", "_", f"torch{torch.__version__}-{name}")
    return storage.join_uri(storage_uri, f"{run_name}/compile_cache/{tag}.bin")


def load(uri: str) -> bool:
    """Loads the artifacts saved at `uri` into this process's caches; False if none (or
    unreadable: a cache only saves time, so a bad one must not stop training)."""
    try:
        if not storage.exists(uri):
            return False
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as src:
            torch.compiler.load_cache_artifacts(src.read())
    except Exception:  # noqa: BLE001 - compiling from scratch is the fallback
        return False
    return True


def save(uri: str) -> bool:
    """Saves what this process has compiled so far to `uri`; False if nothing."""
    artifacts = torch.compiler.save_cache_artifacts()
    if not artifacts:
        return False
    storage.write_bytes(uri, artifacts[0])
    return True
