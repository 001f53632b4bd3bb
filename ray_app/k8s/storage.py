"""Where a run submitted to Kubernetes keeps its checkpoints and outputs.

A Ray job runs in a temporary working folder that Ray deletes when the job ends, and a pod's
own disk goes with the pod; so on Kubernetes `run.storage_path` (checkpoints) and
`run.output_dir` (adapter, rejects, run_summary.json) must be on storage every pod shares: the
chart's volume (`storage.mountPath`) or, for checkpoints, object storage (`storage.uri`).
Relative paths, such as the defaults `outputs/checkpoints` and `outputs/<run.name>`, are placed
under it; absolute paths elsewhere are refused.

Example:
    place(cfg, mount="/mnt/shared")   # defaults -> /mnt/shared/outputs/checkpoints, ...
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ray_app.config import Config
from ray_app.errors import UserError


@dataclass(frozen=True)
class Placement:
    """Absolute locations of one run's outputs on the cluster's shared storage."""

    storage_path: str  # checkpoints under <storage_path>/<run.name>
    output_dir: str  # adapter, rejects/, run_summary.json

    def describe(self, run_name: str) -> str:
        """One line saying where the run's outputs land."""
        return (f"checkpoints in {self.storage_path}/{run_name}; adapter, rejects and "
                f"run_summary.json in {self.output_dir}")


def place(cfg: Config, *, mount: str, uri: str = "") -> Placement:
    """The run's storage_path and output_dir on shared storage; UserError when one cannot be."""
    return Placement(
        storage_path=_shared("run.storage_path", cfg.run.storage_path, uri or mount, mount),
        output_dir=_shared("run.output_dir", cfg.run.output_dir or f"outputs/{cfg.run.name}",
                           mount, mount, files=True),
    )


def _shared(key: str, value: str, base: str, mount: str, *, files: bool = False) -> str:
    if "://" in value:
        if files:
            raise UserError(
                f"{key} is {value!r}, but the adapter and run_summary.json are written as "
                f"files: on Kubernetes set {key} under the shared volume {mount} "
                "(storage.mountPath), or leave it relative to have it placed there.")
        return value
    path = value if value.startswith("/") else f"{base.rstrip('/')}/{value}"
    resolved = path if "://" in path else posixpath.normpath(path)
    if "://" in resolved or _under(resolved, mount):
        return resolved
    where = "an s3:// or gs:// URI, " if not files else ""
    raise UserError(
        f"{key} is {value!r}, which is not on the shared volume {mount}: it would be written "
        f"to one pod's own disk and lost with the pod. On Kubernetes set it under {mount} "
        f"(the chart's storage.mountPath), to {where}or to a relative path, which "
        f"`ray-app k8s render` places under {base}.")


def _under(path: str, mount: str) -> bool:
    return (path.rstrip("/") + "/").startswith(mount.rstrip("/") + "/")
