"""The chart values of a RayJob for one validated fine-tune config.

Everything here derives from the `Config` (its defaults live in ray_app/config.py only) and
from the chart's own values (`chart`: values.yaml plus the user's values files); the chart
turns the result into manifests. Only what differs from the chart's defaults is set.

Sizing: `scaling.num_workers` N workers of `resources_per_worker["GPU"]` g GPUs on nodes of G
GPUs use ceil(N / (G // g)) pods, with the workers spread evenly, e.g. 12 workers on 8-GPU
nodes -> 2 pods of 6 GPUs (not 8 + 4). A Tune study needs that many pods per trial running at
once.

Example:
    values = job_values(cfg, chart=chart_values(CHART, []), command="train", gpu_type="H100")
"""

from __future__ import annotations

import math
import re
import shlex
from typing import Any

import yaml

from ray_app.config import Config
from ray_app.errors import UserError
from ray_app.k8s.storage import Placement, place
from ray_app.secrets import refuse_credentials

# GPUs on the usual largest node shape of each type (8x H100 = a3-highgpu-8g / p5.48xlarge).
GPUS_PER_NODE = {"H100": 8, "H200": 8, "B200": 8, "A100": 8, "L40S": 8, "L4": 4, "A10G": 4}
COMMANDS = ("train", "tune", "data")
# Optional Secrets of the experiment trackers: env var -> (Secret, key).
TRACKING_SECRETS = {
    "wandb": {"WANDB_API_KEY": ("wandb-api-key", "api_key")},
    "mlflow": {"MLFLOW_TRACKING_USERNAME": ("mlflow-credentials", "username"),
               "MLFLOW_TRACKING_PASSWORD": ("mlflow-credentials", "password"),
               "MLFLOW_TRACKING_TOKEN": ("mlflow-credentials", "token")},
}


def plan_pods(num_workers: int, gpus_per_worker: int, gpus_per_node: int) -> tuple[int, int]:
    """(pods, workers per pod) placing `num_workers` evenly on nodes of `gpus_per_node` GPUs.

    >>> plan_pods(12, 1, 8)
    (2, 6)
    """
    if gpus_per_worker > gpus_per_node:
        raise UserError(
            f"a worker needs {gpus_per_worker} GPUs (scaling.resources_per_worker.GPU) but a node "
            f"has {gpus_per_node}; lower the GPUs per worker or pass a larger --gpus-per-node")
    pods = math.ceil(num_workers / (gpus_per_node // gpus_per_worker))
    return pods, math.ceil(num_workers / pods)


def job_name(run_name: str, command: str = "train") -> str:
    """A valid RayJob name (DNS-1035, at most 47 characters): run.name, plus the command
    unless it is train, so that the train, tune and data jobs of one run differ."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower())
    name = re.sub(r"^[^a-z]+", "", name).strip("-")
    suffix = "" if command == "train" else f"-{command}"
    return (name or "ray-app-run")[:47 - len(suffix)].rstrip("-") + suffix


def job_values(
    cfg: Config,
    *,
    chart: dict[str, Any],
    command: str = "train",
    image: str | None = None,
    gpu_type: str | None = None,
    gpus_per_node: int | None = None,
    spot: bool = False,
    submission_mode: str = "HTTPMode",
    cluster: str | None = None,
    overrides: list[str] = (),
) -> tuple[dict[str, Any], Placement]:
    """(chart values of the RayJob, where its outputs land) for `cfg`.

    `cluster` runs the job on that existing RayCluster. Its pods cannot mount a ConfigMap of
    the job, so the job reads the config file from the shared volume
    (<mount>/configs/<run.name>.yaml) with the same `overrides` (the `--set`s `cfg` was loaded
    with) and the storage placement.
    """
    storage = chart["storage"]
    mount = storage["mountPath"]
    placement = place(cfg, mount=mount, uri=storage.get("uri") or "")
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw.setdefault("run", {}).update(storage_path=placement.storage_path,
                                     output_dir=placement.output_dir)
    refuse_credentials(raw, "the RayJob's ConfigMap")
    job: dict[str, Any] = {"command": command, "submissionMode": submission_mode}
    values: dict[str, Any] = {"kind": "RayJob", "job": job}
    if cluster:
        job["cluster"] = cluster
        job["configPath"] = f"{mount}/configs/{cfg.run.name}.yaml"
        job["args"] = shlex.join([f"--set={o}" for o in overrides] + [
            f"--set=run.{k}={raw['run'][k]}" for k in ("storage_path", "output_dir")])
    else:
        job["config"] = yaml.safe_dump(raw, sort_keys=False)
        values["workerGroups"] = _worker_groups(
            cfg, command, gpu_type=gpu_type, gpus_per_node=gpus_per_node, spot=spot)
    if cfg.model.name_or_path:
        job["annotations"] = {"ray-app/model": cfg.model.name_or_path}
    if image:
        repository, tag = _split_image(image)
        values["image"] = {"repository": repository, "tag": tag}
    secrets = {n: s for b in cfg.tracking.backends for n, s in TRACKING_SECRETS[b].items()}
    if secrets:
        values["secretEnv"] = [{"name": n, "secret": s, "key": k}
                               for n, (s, k) in secrets.items()]
    return values, placement


def _worker_groups(
    cfg: Config, command: str, *, gpu_type: str | None, gpus_per_node: int | None, spot: bool
) -> dict[str, Any]:
    per_worker = cfg.scaling.worker_resources()
    cpus_per_worker = per_worker.get("CPU", 1.0)
    tune = command == "tune"
    trials = (cfg.tune.max_concurrent_trials or 1) if tune else 1
    workers = (cfg.tune.workers_per_trial or cfg.scaling.num_workers) if tune \
        else cfg.scaling.num_workers
    # A study's driver takes one unit of `driver`; its trial drivers share the rest.
    driver = 1 + (math.ceil(trials * cfg.tune.driver_resources.get("driver", 0)) if tune else 0)
    groups: dict[str, Any] = {
        "driver": {"maxReplicas": 1, "rayResources": {"driver": str(driver)}},
        "gpuSpot": {"enabled": False},
        "gpuOnDemand": {"enabled": False},
    }
    if not cfg.scaling.use_gpu or command == "data":
        # One worker per pod, plus one CPU of headroom for Ray Data tasks.
        cpu = math.ceil(cpus_per_worker) + 1
        groups["cpu"] = {"enabled": True, "maxReplicas": workers * trials,
                         "resources": _sized(cpu, 4 * cpu)}
        return groups
    gpus_per_worker = max(1, int(per_worker.get("GPU", 1)))
    if gpu_type and not gpus_per_node and gpu_type.upper() not in GPUS_PER_NODE:
        raise UserError(
            f"GPU type {gpu_type!r} is not in the table ({', '.join(GPUS_PER_NODE)}); "
            "also pass --gpus-per-node with the GPUs of one node")
    node_gpus = gpus_per_node or GPUS_PER_NODE.get((gpu_type or "").upper(), 8)
    pods, per_pod = plan_pods(workers, gpus_per_worker, node_gpus)
    gpus, cpu = per_pod * gpus_per_worker, math.ceil(per_pod * cpus_per_worker) + 2
    gpu_group = {"enabled": True, "maxReplicas": pods * trials, "gpus": gpus,
                 "resources": _sized(cpu, 16 * cpu), "shmSizeLimit": f"{8 * gpus}Gi"}
    if gpu_type:
        gpu_group["rayLabels"] = {"ray.io/accelerator-type": gpu_type.upper()}
    groups["gpuOnDemand"] = gpu_group
    if spot:  # the chart gives the spot group the higher priority: filled first
        groups["gpuSpot"] = gpu_group
    return groups


def _sized(cpu: int, memory_gib: int) -> dict[str, Any]:
    size = {"cpu": str(cpu), "memory": f"{memory_gib}Gi"}
    return {"requests": dict(size), "limits": dict(size)}


def _split_image(image: str) -> tuple[str, str]:
    repository, _, tag = image.rpartition(":")
    if not repository or "/" in tag:
        raise UserError(f"--image {image!r} needs a tag, e.g. registry.example/ray-app:0.1.0")
    return repository, tag
