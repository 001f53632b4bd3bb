"""Render one fine-tune config as a KubeRay RayJob plus the ConfigMap that carries the config.

The RayJob brings up its own RayCluster (head on CPU, a driver group, GPU workers), runs
`python -m ray_app train /etc/ray-app/config.yaml --address auto` and deletes the cluster when
the job ends. The config travels in a ConfigMap mounted on the head and driver pods, so the
entrypoint needs no shell quoting and works in every submission mode.

Sizing: with `scaling.num_workers` N workers of `resources_per_worker["GPU"]` g GPUs each and
nodes of `gpus_per_node` G GPUs, the job uses ceil(N / (G // g)) pods and spreads the workers evenly
over them, e.g. 12 workers on 8-GPU nodes -> 2 pods of 6 GPUs (not 8 + 4).

Example:
    manifests = render_manifests(cfg, image="registry.example/ray-app:0.1.0", gpu_type="H100")
    print(yaml.safe_dump_all(manifests, sort_keys=False))
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import yaml

from ray_app.errors import UserError
from ray_app.secrets import refuse_credentials

RAY_VERSION = "2.60.0"
CONFIG_MOUNT = "/etc/ray-app"
SHARED_CLAIM = "ray-shared"
SHARED_MOUNT = "/mnt/shared"
AUTH_SECRET = "ray-auth-token"
HF_TOKEN_SECRET = "hf-token"
# Optional Secrets of the experiment trackers: env var -> (Secret, key).
TRACKING_SECRETS = {
    "wandb": {"WANDB_API_KEY": ("wandb-api-key", "api_key")},
    "mlflow": {"MLFLOW_TRACKING_USERNAME": ("mlflow-credentials", "username"),
               "MLFLOW_TRACKING_PASSWORD": ("mlflow-credentials", "password"),
               "MLFLOW_TRACKING_TOKEN": ("mlflow-credentials", "token")},
}
GRACE_SECONDS = 120
DRAIN_DEADLINE_SECONDS = 90

# GPUs on the usual largest node shape of each type (8x H100 = a3-highgpu-8g / p5.48xlarge).
GPUS_PER_NODE = {"H100": 8, "H200": 8, "B200": 8, "A100": 8, "L40S": 8, "L4": 4, "A10G": 4}

# Where spot and on-demand pods go on each cloud, as pod-spec fields. The chart's overlays
# cluster/values-<cloud>.yaml place its groups the same way (a test keeps them in step).
_NOT_GKE_SPOT = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {
                    "matchExpressions": [
                        {"key": "cloud.google.com/gke-spot", "operator": "DoesNotExist"}
                    ]
                }
            ]
        }
    }
}
PLACEMENT: dict[str, dict[str, dict[str, Any]]] = {
    "gke": {
        "spot": {
            "nodeSelector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [
                {
                    "key": "cloud.google.com/gke-spot",
                    "operator": "Equal",
                    "value": "true",
                    "effect": "NoSchedule",
                }
            ],
        },
        "on-demand": {"affinity": _NOT_GKE_SPOT},
    },
    "eks": {
        "spot": {"nodeSelector": {"eks.amazonaws.com/capacityType": "SPOT"}},
        "on-demand": {"nodeSelector": {"eks.amazonaws.com/capacityType": "ON_DEMAND"}},
    },
    "karpenter": {
        "spot": {"nodeSelector": {"karpenter.sh/capacity-type": "spot"}},
        "on-demand": {"nodeSelector": {"karpenter.sh/capacity-type": "on-demand"}},
    },
}

_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "fsGroupChangePolicy": "OnRootMismatch",
    "seccompProfile": {"type": "RuntimeDefault"},
}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}

# Same hook as cluster/chart/templates/_helpers.tpl: tell Ray the node is being preempted, then
# wait until no Ray task or actor is left here, or until the deadline.
PRESTOP_SCRIPT = f"""\
deadline={DRAIN_DEADLINE_SECONDS}
timeout 30 ray drain-node --address "$RAY_ADDRESS" \\
  --reason DRAIN_NODE_REASON_PREEMPTION \\
  --reason-message "pod $HOSTNAME is terminating" \\
  --deadline-remaining-seconds "$deadline" || echo "preStop: ray drain-node failed"
end=$((SECONDS + deadline))
while [ "$SECONDS" -lt "$end" ]; do
  if command -v ps >/dev/null && ! ps -eo args= | grep '^ray::' | grep -qv '^ray::IDLE'; then
    break
  fi
  sleep 5
done
"""


def plan_pods(num_workers: int, gpus_per_worker: int, gpus_per_node: int) -> tuple[int, int]:
    """(pods, workers per pod) placing `num_workers` evenly on nodes of `gpus_per_node` GPUs.

    >>> plan_pods(12, 1, 8)
    (2, 6)
    >>> plan_pods(3, 1, 8)
    (1, 3)
    """
    if num_workers < 1 or gpus_per_worker < 1:
        raise UserError(
            f"scaling.num_workers ({num_workers}) and GPUs per worker ({gpus_per_worker}) must "
            "be >= 1"
        )
    if gpus_per_worker > gpus_per_node:
        raise UserError(
            f"a worker needs {gpus_per_worker} GPUs (scaling.resources_per_worker.GPU) but a node "
            f"has {gpus_per_node}; lower the GPUs per worker or pass a larger gpus_per_node"
        )
    per_node = gpus_per_node // gpus_per_worker
    pods = math.ceil(num_workers / per_node)
    return pods, math.ceil(num_workers / pods)


def job_name(run_name: str) -> str:
    """A valid RayJob name (DNS-1035, at most 47 characters) from `run.name`."""
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = re.sub(r"^[^a-z]+", "", name)[:47].rstrip("-")
    return name or "ray-app-run"


def render_manifests(cfg: dict[str, Any], **kwargs: Any) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] for `kubectl apply -f`; keyword arguments as for `render_rayjob`."""
    refuse_credentials(cfg, "the ConfigMap")
    job = render_rayjob(cfg, **kwargs)
    return [render_config_map(cfg, job_name=job["metadata"]["name"], **_pick(kwargs)), job]


def _pick(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in ("namespace", "shared_mount") if k in kwargs}


def render_config_map(
    cfg: dict[str, Any],
    *,
    job_name: str,
    namespace: str = "default",
    shared_mount: str = SHARED_MOUNT,
) -> dict[str, Any]:
    """The ConfigMap `<job_name>-config` holding the config as `config.yaml`."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{job_name}-config", "namespace": namespace, "labels": _labels()},
        "data": {
            "config.yaml": yaml.safe_dump(_on_shared_storage(cfg, shared_mount), sort_keys=False)
        },
    }


def render_rayjob(
    cfg: dict[str, Any],
    *,
    image: str,
    gpu_type: str | None = None,
    namespace: str = "default",
    gpus_per_node: int | None = None,
    cloud: str | None = None,
    spot: bool = False,
    submission_mode: str = "HTTPMode",
    active_deadline_seconds: int = 24 * 3600,
    shared_claim: str = SHARED_CLAIM,
    shared_mount: str = SHARED_MOUNT,
    ray_version: str = RAY_VERSION,
) -> dict[str, Any]:
    """A RayJob (ray.io/v1) with an embedded RayCluster for the fine-tune config `cfg`.

    `cfg` is the config as a dict (keys run.name, run.storage_path, model.name_or_path,
    scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker). With `spot`, GPU
    workers prefer spot nodes and fall back to on-demand ones; `cloud` (gke, eks, karpenter)
    adds that cloud's capacity-type node selectors. The result passes `validate_manifest`.
    """
    if submission_mode not in ("HTTPMode", "SidecarMode", "K8sJobMode"):
        raise UserError(
            f"submission mode {submission_mode!r} is not supported here; use HTTPMode "
            "(default), SidecarMode or K8sJobMode"
        )
    if cloud is not None and cloud not in PLACEMENT:
        raise UserError(f"cloud {cloud!r} is unknown; use one of {', '.join(PLACEMENT)}")
    run = cfg.get("run") or {}
    name = job_name(str(run.get("name") or "ray-app-run"))
    _on_shared_storage(cfg, shared_mount)  # fail early on storage that pods cannot share
    scaling = cfg.get("scaling") or {}
    num_workers = int(scaling.get("num_workers", 2))
    use_gpu = bool(scaling.get("use_gpu", False))
    per_worker = scaling.get("resources_per_worker") or (
        {"CPU": 4, "GPU": 1} if use_gpu else {"CPU": 0.5}
    )
    env = _ray_env(shared_mount, (cfg.get("tracking") or {}).get("backends") or [])
    mounts = {"shared": shared_mount}
    volumes = [_pvc_volume(shared_claim)]
    config_volume = {"name": "config", "configMap": {"name": f"{name}-config"}}

    head = {
        "serviceType": "ClusterIP",
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod_template(
            image,
            "ray-head",
            _sized(4, 16),
            env,
            {**mounts, "config": CONFIG_MOUNT},
            [*volumes, config_volume],
            shm="4Gi",
        ),
    }
    head["template"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": 8080, "name": "metrics"},
    ]
    driver = _worker_group(
        "driver",
        1,
        1,
        _pod_template(
            image,
            "ray-worker",
            _sized(2, 8),
            env,
            {**mounts, "config": CONFIG_MOUNT},
            [*volumes, config_volume],
            shm="2Gi",
        ),
        resources={"driver": "1"},
        labels={"ray.io/market-type": "on-demand"},
    )
    _place(head["template"]["spec"], cloud, "on-demand")
    _place(driver["template"]["spec"], cloud, "on-demand")

    workers = _compute_groups(
        image,
        env,
        mounts,
        volumes,
        num_workers,
        use_gpu,
        per_worker,
        gpu_type=gpu_type,
        gpus_per_node=gpus_per_node,
        cloud=cloud,
        spot=spot,
    )
    cluster = {
        "rayVersion": ray_version,
        "authOptions": {"mode": "token", "secretName": AUTH_SECRET},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {
            "version": "v2",
            "idleTimeoutSeconds": 300,
            "resources": _sized(0.5, 1, request_cpu=0.5, request_gib=0.5),
            "securityContext": copy.deepcopy(_CONTAINER_SECURITY),
        },
        "headGroupSpec": head,
        "workerGroupSpecs": [driver, *workers],
    }
    # Unbuffered output so `ray job logs --follow` shows the driver's progress as it happens.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    spec: dict[str, Any] = {
        "entrypoint": f"python -m ray_app train {CONFIG_MOUNT}/config.yaml --address auto",
        "entrypointResources": json.dumps({"driver": 1}),
        "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
        "submissionMode": submission_mode,
        "activeDeadlineSeconds": active_deadline_seconds,
        # GPUs that never arrive should fail the job instead of holding the head up for a day.
        "preRunningDeadlineSeconds": 3600,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        # A RayJob retry rebuilds the whole cluster; Ray Train's FailureConfig retries in place.
        "backoffLimit": 0,
        "rayClusterSpec": cluster,
    }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": _labels()}
    model = (cfg.get("model") or {}).get("name_or_path")
    if model:
        metadata["annotations"] = {"ray-app/model": str(model)}
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": spec}


def _on_shared_storage(cfg: dict[str, Any], shared_mount: str) -> dict[str, Any]:
    """The config with run.storage_path/output_dir on shared storage (defaults filled in)."""
    out = copy.deepcopy(cfg)
    run = out.setdefault("run", {})
    name = str(run.get("name") or "ray-app-run")
    defaults = {"storage_path": "checkpoints", "output_dir": f"outputs/{name}"}
    for key, default in defaults.items():
        if not run.get(key):
            run[key] = f"{shared_mount}/{default}"
    for key in ("storage_path", "output_dir"):
        value = str(run[key])
        if "://" not in value and not (value + "/").startswith(shared_mount.rstrip("/") + "/"):
            raise UserError(
                f"run.{key} is {value!r}, a path that only one pod would see; on Kubernetes it "
                f"must be under the shared volume {shared_mount} (e.g. {shared_mount}/"
                f"{defaults[key]}) or a s3:// or gs:// URI"
            )
    return out


def _compute_groups(
    image: str,
    env: list[dict[str, Any]],
    mounts: dict[str, str],
    volumes: list[dict[str, Any]],
    num_workers: int,
    use_gpu: bool,
    per_worker: dict[str, Any],
    *,
    gpu_type: str | None,
    gpus_per_node: int | None,
    cloud: str | None,
    spot: bool,
) -> list[dict[str, Any]]:
    cpus_per_worker = float(per_worker.get("CPU", 1))
    if not use_gpu:
        # One Ray Train worker per pod, plus one CPU of headroom for Ray Data tasks.
        cpu = math.ceil(cpus_per_worker) + 1
        template = _pod_template(image, "ray-worker", _sized(cpu, 4 * cpu), env, mounts, volumes)
        return [_worker_group("cpu", 0, num_workers, template, labels={})]

    gpus_per_worker = int(per_worker.get("GPU", 1))
    if gpu_type and not gpus_per_node and gpu_type.upper() not in GPUS_PER_NODE:
        raise UserError(
            f"GPU type {gpu_type!r} is not in the table ({', '.join(GPUS_PER_NODE)}); "
            "also pass gpus_per_node (--gpus-per-node) with the GPUs of one node"
        )
    node_gpus = gpus_per_node or GPUS_PER_NODE.get((gpu_type or "").upper(), 8)
    pods, workers_per_pod = plan_pods(num_workers, gpus_per_worker, node_gpus)
    gpus = workers_per_pod * gpus_per_worker
    cpu = math.ceil(workers_per_pod * cpus_per_worker) + 2
    markets = ["spot", "on-demand"] if spot else ["on-demand"]
    groups = []
    for market in markets:
        template = _pod_template(
            image,
            "ray-worker",
            _sized(cpu, 16 * cpu, gpus=gpus),
            env,
            mounts,
            volumes,
            shm=f"{8 * gpus}Gi",
            drain=True,
        )
        template["spec"]["tolerations"] = [dict(_GPU_TOLERATION)]
        _place(template["spec"], cloud, market)
        labels = {"ray.io/market-type": market}
        if gpu_type:
            labels["ray.io/accelerator-type"] = gpu_type.upper()
        group = _worker_group(f"gpu-{market.replace('-', '')}", 0, pods, template, labels=labels)
        # Autoscaler v2 (Ray >= 2.56) fills the higher-priority spot group first.
        group["priority"] = 10 if market == "spot" else 0
        groups.append(group)
    return groups


def _worker_group(
    name: str,
    low: int,
    high: int,
    template: dict[str, Any],
    *,
    labels: dict[str, str],
    resources: dict[str, str] | None = None,
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": {},
        "template": template,
    }
    if resources:
        group["resources"] = resources
    if labels:
        group["labels"] = labels
    return group


def _pod_template(
    image: str,
    container_name: str,
    resources: dict[str, Any],
    env: list[dict[str, Any]],
    mounts: dict[str, str],
    volumes: list[dict[str, Any]],
    *,
    shm: str | None = None,
    drain: bool = False,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": container_name,
        "image": image,
        "securityContext": copy.deepcopy(_CONTAINER_SECURITY),
        "env": copy.deepcopy(env),
        "resources": resources,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]
        + [{"name": n, "mountPath": p} for n, p in mounts.items()],
    }
    shm_volume: dict[str, Any] = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
    if shm:
        shm_volume["emptyDir"]["sizeLimit"] = shm
    spec: dict[str, Any] = {
        "securityContext": copy.deepcopy(_POD_SECURITY),
        "containers": [container],
        "volumes": [shm_volume, *copy.deepcopy(volumes)],
    }
    if drain:
        spec["terminationGracePeriodSeconds"] = GRACE_SECONDS
        container["lifecycle"] = {
            "preStop": {"exec": {"command": ["/bin/bash", "-c", PRESTOP_SCRIPT]}}
        }
    return {"metadata": {"labels": _labels()}, "spec": spec}


def _sized(
    cpu: float,
    memory_gib: float,
    *,
    gpus: int = 0,
    request_cpu: float | None = None,
    request_gib: float | None = None,
) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": _cpu(cpu), "memory": _gib(memory_gib)}
    requests: dict[str, Any] = {
        "cpu": _cpu(cpu if request_cpu is None else request_cpu),
        "memory": _gib(memory_gib if request_gib is None else request_gib),
    }
    if gpus:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = gpus
    return {"requests": requests, "limits": limits}


def _cpu(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{int(value * 1000)}m"


def _gib(value: float) -> str:
    return f"{int(value)}Gi" if float(value).is_integer() else f"{int(value * 1024)}Mi"


def _place(pod_spec: dict[str, Any], cloud: str | None, market: str) -> None:
    """Add the cloud's node selection for `market` (spot or on-demand) to a pod spec."""
    for key, value in copy.deepcopy(PLACEMENT.get(cloud or "", {}).get(market, {})).items():
        if key == "tolerations":
            pod_spec.setdefault("tolerations", []).extend(value)
        else:
            pod_spec[key] = value


def _ray_env(shared_mount: str, backends: list[str]) -> list[dict[str, Any]]:
    secrets = {"HF_TOKEN": (HF_TOKEN_SECRET, "token")}
    for backend in backends:
        secrets.update(TRACKING_SECRETS.get(backend, {}))
    return [{"name": "HF_HOME", "value": f"{shared_mount}/hf-cache"}] + [
        {"name": name,
         "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for name, (secret, key) in secrets.items()
    ]


def _pvc_volume(claim: str) -> dict[str, Any]:
    return {"name": "shared", "persistentVolumeClaim": {"claimName": claim}}


def _labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "ray-app", "app.kubernetes.io/managed-by": "ray-app"}
