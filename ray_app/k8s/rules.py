"""The rules a KubeRay manifest must follow beyond its CRD schema, as plain functions.

Each rule takes a whole manifest (RayCluster, RayJob or RayService, ray.io/v1) and yields
human-readable problems, each naming the field and the fix.

KUBERAY_RULES mirror KubeRay v1.7's controller validation (`ValidateRayClusterSpec`,
`ValidateRayJobSpec`): the API server accepts a manifest that breaks them and the operator
refuses it later (a RayJob ends in `ValidationFailed`).

PROJECT_RULES are this project's rules for fine-tuning clusters: replica bounds, resources on
every container, non-root pods, secrets only through `secretKeyRef`, the same shared volume on
every pod, a drain hook on GPU workers, token authentication, the dashboard reachable only
inside the cluster, and a deadline on every job that brings up its own GPUs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import yaml

# KubeRay appends 6 characters to RayJob/RayService names to name their RayCluster, and a
# RayCluster name must leave room for the pod and service names derived from it.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
TOKEN_AUTH_MIN_RAY = (2, 52, 0)
AUTOSCALER_V2_DEFAULT_FROM_RAY = (2, 47, 0)
MIN_GPU_GRACE_SECONDS = 60

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUANTITY = re.compile(
    r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(\d+(\.\d*)?|\.\d+)))?$"
)
_SECRET_LIKE = re.compile(
    r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE
)
_NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_DIR", "_MODE")
_GPU_KEY = re.compile(r"(gpu$)|(^nvidia\.com/mig-\d+g\.\d+gb$)")
_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


# --------------------------------------------------------------------------- walking a manifest


@dataclass
class _Group:
    path: str  # e.g. "spec.rayClusterSpec.workerGroupSpecs[1]"
    name: str  # "head" or the worker groupName
    is_head: bool
    spec: dict

    @property
    def pod(self) -> dict:
        return (self.spec.get("template") or {}).get("spec") or {}

    @property
    def containers(self) -> list[dict]:
        return [c for c in self.pod.get("containers") or [] if isinstance(c, dict)]

    @property
    def ray_container(self) -> dict:
        # KubeRay treats the first container as the Ray container.
        return self.containers[0] if self.containers else {}

    @property
    def params(self) -> dict:
        return self.spec.get("rayStartParams") or {}


def _cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    field = key[doc["kind"]]
    if field is None:
        yield "spec", spec
    elif isinstance(spec.get(field), dict):
        yield f"spec.{field}", spec[field]


def _groups(path: str, cluster: dict) -> Iterator[_Group]:
    head = cluster.get("headGroupSpec")
    if isinstance(head, dict):
        yield _Group(f"{path}.headGroupSpec", "head", True, head)
    for i, worker in enumerate(cluster.get("workerGroupSpecs") or []):
        if isinstance(worker, dict):
            name = str(worker.get("groupName", f"#{i}"))
            yield _Group(f"{path}.workerGroupSpecs[{i}]", name, False, worker)


def _all_groups(doc: dict) -> Iterator[tuple[str, dict, _Group]]:
    for path, cluster in _cluster_specs(doc):
        for group in _groups(path, cluster):
            yield path, cluster, group


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or [] if isinstance(e, dict) and "name" in e}


def _env_value(container: dict, name: str) -> str | None:
    entry = _env(container).get(name)
    return None if entry is None else str(entry.get("value", ""))


def _ray_version(cluster: dict) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(cluster.get("rayVersion") or ""))
    return tuple(int(x or 0) for x in match.groups()) if match else None


def _autoscaling(cluster: dict) -> bool:
    return bool(cluster.get("enableInTreeAutoscaling"))


def _autoscaler_v2(cluster: dict, head: _Group | None) -> bool:
    version = (cluster.get("autoscalerOptions") or {}).get("version")
    if version:
        return version == "v2"
    if head and _env_value(head.ray_container, "RAY_enable_autoscaler_v2") in ("1", "true"):
        return True
    ray_version = _ray_version(cluster)
    return ray_version is not None and ray_version >= AUTOSCALER_V2_DEFAULT_FROM_RAY


def _gpu_count(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    total = 0.0
    for key, value in limits.items():
        if _GPU_KEY.search(str(key)):
            try:
                total += float(value)
            except (TypeError, ValueError):
                total += 1.0
    return total


def _head(cluster_path: str, cluster: dict) -> _Group | None:
    return next((g for g in _groups(cluster_path, cluster) if g.is_head), None)


def _pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec in the manifest: Ray groups and the K8sJobMode submitter template."""
    for _, _, group in _all_groups(doc):
        yield f"{group.path}.template.spec", group.pod
    if doc["kind"] == "RayJob":
        submitter = (doc.get("spec") or {}).get("submitterPodTemplate")
        if isinstance(submitter, dict):
            yield "spec.submitterPodTemplate.spec", submitter.get("spec") or {}


def _containers_of(pod: dict) -> Iterator[tuple[str, dict]]:
    for field in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(field) or []):
            if isinstance(container, dict):
                yield f"{field}[{i}]", container


# --------------------------------------------------------------------------- KubeRay's rules


def _rule_name(doc: dict) -> Iterator[str]:
    name = str((doc.get("metadata") or {}).get("name") or "")
    limit = MAX_NAME_LENGTH[doc["kind"]]
    if not name:
        yield "metadata.name is required"
        return
    if len(name) > limit:
        yield (
            f"metadata.name is {len(name)} characters; KubeRay allows at most {limit} for a "
            f"{doc['kind']} (it derives pod and service names from it). Shorten the name"
        )
    if not _DNS1035.match(name):
        yield (
            f"metadata.name {name!r} must be a DNS-1035 label: lowercase letters, digits and "
            "'-', starting with a letter and ending with a letter or digit"
        )


def _rule_containers_present(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        if not group.containers:
            yield (
                f"{group.path}.template.spec.containers: needs at least one container; the first "
                "one runs Ray"
            )


def _rule_group_resources_not_twice(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        set_in_params = [p for p in _RESOURCE_PARAMS if group.params.get(p)]
        if set_in_params and group.spec.get("resources"):
            yield (
                f"{group.path} ({group.name}): Ray resources are set both in rayStartParams "
                f"({', '.join(set_in_params)}) and in the group's resources field; KubeRay "
                "rejects this. Keep only the resources field"
            )


def _rule_group_labels(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        if "labels" in group.params:
            yield (
                f"{group.path}.rayStartParams.labels is not supported by KubeRay; use the "
                "group's top-level labels field"
            )
        for key, value in (group.spec.get("labels") or {}).items():
            prefix, _, name = str(key).rpartition("/")
            if len(name) > 63 or not _LABEL_NAME.match(name) or (prefix and len(prefix) > 253):
                yield f"{group.path}.labels: invalid label key {key!r}"
            if len(str(value)) > 63 or not _LABEL_VALUE.match(str(value)):
                yield f"{group.path}.labels: invalid value {value!r} for label {key!r}"


def _rule_gcs_fault_tolerance(doc: dict) -> Iterator[str]:
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    for path, cluster in _cluster_specs(doc):
        head = _head(path, cluster)
        if head is None:
            continue
        options = cluster.get("gcsFaultToleranceOptions")
        env = _env(head.ray_container)
        if options is not None:
            if annotations.get("ray.io/ft-enabled"):
                yield (
                    "the ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set; "
                    "use only gcsFaultToleranceOptions"
                )
            if head.params.get("redis-password"):
                yield (
                    f"{head.path}.rayStartParams.redis-password: not allowed with "
                    "gcsFaultToleranceOptions; use gcsFaultToleranceOptions.redisPassword"
                )
            for var, field in (
                ("REDIS_PASSWORD", "redisPassword"),
                ("RAY_REDIS_ADDRESS", "redisAddress"),
            ):
                if var in env:
                    yield (
                        f"{head.path}: env {var} is not allowed with gcsFaultToleranceOptions; "
                        f"use gcsFaultToleranceOptions.{field}"
                    )
            if annotations.get("ray.io/external-storage-namespace"):
                yield (
                    "the ray.io/external-storage-namespace annotation is not allowed with "
                    "gcsFaultToleranceOptions; use gcsFaultToleranceOptions.externalStorageNamespace"
                )
        elif "RAY_REDIS_ADDRESS" in env and not annotations.get("ray.io/ft-enabled"):
            yield (
                f"{head.path}: env RAY_REDIS_ADDRESS turns on GCS fault tolerance implicitly; "
                "configure it with gcsFaultToleranceOptions instead"
            )
        if head.params.get("redis-username") or "REDIS_USERNAME" in env:
            yield (
                f"{head.path}: set the Redis user name with gcsFaultToleranceOptions.redisUsername, "
                "not rayStartParams or env"
            )


def _rule_autoscaler(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        head = _head(path, cluster)
        env_v2 = _env_value(head.ray_container, "RAY_enable_autoscaler_v2") if head else None
        if not _autoscaling(cluster):
            if env_v2 in ("1", "true"):
                yield (
                    f"{path}: RAY_enable_autoscaler_v2={env_v2} needs enableInTreeAutoscaling: true"
                )
            continue
        if env_v2 is not None and (cluster.get("autoscalerOptions") or {}).get("version"):
            yield (
                f"{path}: both autoscalerOptions.version and head env RAY_enable_autoscaler_v2 "
                "are set; keep only autoscalerOptions.version"
            )
        for group in _groups(path, cluster):
            if not group.is_head and group.spec.get("suspend"):
                yield f"{group.path}: a worker group cannot be suspended while autoscaling is on"
            policy = group.pod.get("restartPolicy")
            if _autoscaler_v2(cluster, head) and policy not in (None, "", "Never"):
                yield (
                    f"{group.path}.template.spec.restartPolicy: must be Never or unset with "
                    f"autoscaler v2, got {policy!r}"
                )


def _rule_token_auth_version(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            continue
        version = _ray_version(cluster)
        wanted = ".".join(map(str, TOKEN_AUTH_MIN_RAY))
        if version is None:
            yield f"{path}.rayVersion: authOptions.mode token needs rayVersion set (>= {wanted})"
        elif version < TOKEN_AUTH_MIN_RAY:
            yield (
                f"{path}.rayVersion: authOptions.mode token needs Ray >= {wanted}, got "
                f"{cluster.get('rayVersion')}"
            )


def _rule_rayjob_cluster_source(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    spec = doc.get("spec") or {}
    has_spec, selector = "rayClusterSpec" in spec, spec.get("clusterSelector") or {}
    if has_spec == bool(selector):
        yield (
            "spec: set exactly one of rayClusterSpec (a new cluster for this job) or "
            "clusterSelector: {ray.io/cluster: <name>} (an existing RayCluster)"
        )
    if selector:
        if not selector.get("ray.io/cluster"):
            yield "spec.clusterSelector: needs a non-empty ray.io/cluster: <raycluster name>"
        if spec.get("submissionMode") == "SidecarMode":
            yield "spec.clusterSelector cannot be used with submissionMode SidecarMode"
        if spec.get("suspend"):
            yield "spec.suspend cannot be used with clusterSelector"
        if (spec.get("backoffLimit") or 0) > 0:
            yield "spec.backoffLimit > 0 cannot be used with clusterSelector (a retry needs a new cluster)"


def _rule_rayjob_lifecycle(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    spec = doc.get("spec") or {}
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished") or 0
    if spec.get("suspend") and not shutdown:
        yield "spec.suspend: true needs shutdownAfterJobFinishes: true"
    if ttl < 0:
        yield "spec.ttlSecondsAfterFinished must be >= 0"
    if ttl > 0 and not shutdown:
        yield (
            f"spec.ttlSecondsAfterFinished={ttl} has no effect and is rejected by KubeRay "
            "without shutdownAfterJobFinishes: true"
        )
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            yield f"spec.{field} must be > 0 when set, got {spec[field]}"
    if spec.get("backoffLimit", 0) < 0:
        yield f"spec.backoffLimit must be >= 0, got {spec['backoffLimit']}"


def _rule_rayjob_deletion_strategy(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    spec = doc.get("spec") or {}
    strategy = spec.get("deletionStrategy")
    if not isinstance(strategy, dict):
        return
    rules = strategy.get("deletionRules") or []
    legacy = [strategy.get(k) for k in ("onSuccess", "onFailure") if strategy.get(k)]
    policies = [r.get("policy") for r in rules] + [p.get("policy") for p in legacy]
    if rules and spec.get("shutdownAfterJobFinishes"):
        yield (
            "spec.deletionStrategy.deletionRules and shutdownAfterJobFinishes: true are mutually "
            "exclusive; express the cleanup as a DeleteCluster rule instead"
        )
    autoscaling = _autoscaling(spec.get("rayClusterSpec") or {})
    if "DeleteWorkers" in policies and autoscaling:
        yield "spec.deletionStrategy: DeleteWorkers cannot be used with enableInTreeAutoscaling"
    if spec.get("clusterSelector") and {"DeleteCluster", "DeleteWorkers"} & set(policies):
        yield "spec.deletionStrategy: DeleteCluster/DeleteWorkers cannot be used with clusterSelector"
    if legacy and spec.get("shutdownAfterJobFinishes") and "DeleteNone" in policies:
        yield "spec.deletionStrategy: DeleteNone contradicts shutdownAfterJobFinishes: true"


def _rule_rayjob_submission_mode(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    spec = doc.get("spec") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        yield f"spec.submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}"
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        yield "spec.backoffLimit > 0 is not allowed in InteractiveMode"
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                yield f"spec.{field} is not supported in SidecarMode"
        head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
        policy = ((head.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if policy not in (None, "", "Never"):
            yield f"SidecarMode needs the head pod restartPolicy Never or unset, got {policy!r}"


def _rule_runtime_env_yaml(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    text = (doc.get("spec") or {}).get("runtimeEnvYAML")
    if text is None:
        return
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as err:
        yield f"spec.runtimeEnvYAML is not valid YAML: {str(err).splitlines()[0]}"
        return
    if parsed is not None and not isinstance(parsed, dict):
        yield "spec.runtimeEnvYAML must be a YAML mapping (pip, env_vars, working_dir, ...)"


KUBERAY_RULES: tuple[Callable[[dict], Iterable[str]], ...] = (
    _rule_name,
    _rule_containers_present,
    _rule_group_resources_not_twice,
    _rule_group_labels,
    _rule_gcs_fault_tolerance,
    _rule_autoscaler,
    _rule_token_auth_version,
    _rule_rayjob_cluster_source,
    _rule_rayjob_lifecycle,
    _rule_rayjob_deletion_strategy,
    _rule_rayjob_submission_mode,
    _rule_runtime_env_yaml,
)


# --------------------------------------------------------------------------- this project's rules


def _rule_replica_bounds(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        if group.is_head:
            continue
        low, high = group.spec.get("minReplicas"), group.spec.get("maxReplicas")
        replicas = group.spec.get("replicas")
        if (isinstance(low, int) and low < 0) or (isinstance(high, int) and high < 0):
            yield f"{group.path} ({group.name}): minReplicas and maxReplicas must be >= 0"
        if isinstance(low, int) and isinstance(high, int) and low > high:
            yield f"{group.path} ({group.name}): minReplicas {low} > maxReplicas {high}"
        elif (
            isinstance(replicas, int)
            and isinstance(low, int)
            and isinstance(high, int)
            and not low <= replicas <= high
        ):
            yield (
                f"{group.path} ({group.name}): replicas {replicas} is outside "
                f"[minReplicas {low}, maxReplicas {high}]"
            )


def _rule_group_names(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        seen: set[str] = set()
        for group in _groups(path, cluster):
            if group.is_head:
                continue
            name = group.spec.get("groupName")
            if not isinstance(name, str):
                continue
            if name in seen:
                yield f"{group.path}: groupName {name!r} is used twice; group names must be unique"
            if name == "headgroup" or len(name) > 63 or not _DNS1123_LABEL.match(name):
                yield (
                    f"{group.path}: groupName {name!r} must be a DNS-1123 label (lowercase "
                    "letters, digits, '-') and not 'headgroup'"
                )
            seen.add(name)


def _rule_ray_resource_formats(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        raw = group.params.get("resources")
        if isinstance(raw, str):
            try:
                parsed = json.loads(raw.strip("'\"` "))
            except json.JSONDecodeError:
                parsed = None
            if not isinstance(parsed, dict):
                yield (
                    f"{group.path}.rayStartParams.resources must be a JSON object, e.g. "
                    '\'{"driver": 4}\'; better, use the group\'s resources field: {driver: "4"}'
                )
        for key, value in (group.spec.get("resources") or {}).items():
            if not _QUANTITY.match(str(value)):
                yield f'{group.path}.resources.{key}: {value!r} is not a quantity such as "4"'
    if doc["kind"] == "RayJob":
        raw = (doc.get("spec") or {}).get("entrypointResources")
        if raw is not None:
            try:
                parsed = json.loads(raw)
            except (json.JSONDecodeError, TypeError):
                parsed = None
            if not isinstance(parsed, dict) or not all(
                isinstance(v, (int, float)) for v in parsed.values()
            ):
                yield "spec.entrypointResources must be a JSON object of numbers, e.g. '{\"driver\": 1}'"


def _rule_head_runs_no_work(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        head = _head(path, cluster)
        if head is None:
            continue
        if head.params.get("num-cpus") != "0":
            yield (
                f'{head.path}.rayStartParams.num-cpus should be "0" so that training and data '
                "tasks never run on the head (losing the head loses the cluster)"
            )
        if _gpu_count(head.ray_container):
            yield f"{head.path}: the head requests GPUs; put GPUs in worker groups only"


def _rule_container_resources(doc: dict) -> Iterator[str]:
    for pod_path, pod in _pod_specs(doc):
        for cpath, container in _containers_of(pod):
            resources = container.get("resources") or {}
            for part in ("requests", "limits"):
                missing = [r for r in ("cpu", "memory") if r not in (resources.get(part) or {})]
                if missing:
                    yield (
                        f"{pod_path}.{cpath} ({container.get('name')}): set resources.{part} for "
                        f"{' and '.join(missing)} (the scheduler and Ray both size from them)"
                    )


def _rule_gpu_request_equals_limit(doc: dict) -> Iterator[str]:
    for pod_path, pod in _pod_specs(doc):
        for cpath, container in _containers_of(pod):
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for key in set(requests) | set(limits):
                if (
                    _GPU_KEY.search(str(key))
                    and key in requests
                    and requests[key] != limits.get(key)
                ):
                    yield (
                        f"{pod_path}.{cpath}: {key} request {requests[key]!r} must equal its limit "
                        f"{limits.get(key)!r}; Kubernetes refuses pods otherwise"
                    )


def _rule_non_root(doc: dict) -> Iterator[str]:
    for pod_path, pod in _pod_specs(doc):
        pod_non_root = (pod.get("securityContext") or {}).get("runAsNonRoot") is True
        for cpath, container in _containers_of(pod):
            context = container.get("securityContext") or {}
            if context.get("privileged") or context.get("runAsUser") == 0:
                yield f"{pod_path}.{cpath}: must not run privileged or as root (runAsUser 0)"
            elif not (pod_non_root or context.get("runAsNonRoot") is True):
                yield (
                    f"{pod_path}.{cpath}: set securityContext.runAsNonRoot: true on the pod or "
                    "the container (the Ray images run as uid 1000)"
                )


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_LIKE.search(name)) and not name.upper().endswith(_NOT_SECRET_SUFFIXES)


def _rule_no_secret_literals(doc: dict) -> Iterator[str]:
    fix = "take it from a Kubernetes Secret with valueFrom.secretKeyRef"
    for pod_path, pod in _pod_specs(doc):
        for cpath, container in _containers_of(pod):
            for name, entry in _env(container).items():
                if _is_secret_name(name) and entry.get("value"):
                    yield f"{pod_path}.{cpath}: env {name} holds a literal value; {fix}"
    for path, cluster in _cluster_specs(doc):
        options = cluster.get("gcsFaultToleranceOptions") or {}
        if (options.get("redisPassword") or {}).get("value"):
            yield f"{path}.gcsFaultToleranceOptions.redisPassword.value is a literal secret; {fix}"
        for name, entry in _env(
            {"env": (cluster.get("autoscalerOptions") or {}).get("env")}
        ).items():
            if _is_secret_name(name) and entry.get("value"):
                yield f"{path}.autoscalerOptions.env {name} holds a literal value; {fix}"
    if doc["kind"] == "RayJob":
        try:
            runtime_env = yaml.safe_load((doc.get("spec") or {}).get("runtimeEnvYAML") or "")
        except yaml.YAMLError:
            return  # _rule_runtime_env_yaml reports it
        for name in (runtime_env or {}).get("env_vars") or {}:
            if _is_secret_name(str(name)):
                yield (
                    f"spec.runtimeEnvYAML env_vars.{name} would put a secret into the job's "
                    f"runtime env (visible in the dashboard); {fix} on the pods instead"
                )


def _rule_internal_only(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        head = cluster.get("headGroupSpec") or {}
        service_type = head.get("serviceType") or "ClusterIP"
        if service_type != "ClusterIP":
            yield (
                f"{path}.headGroupSpec.serviceType {service_type} exposes the dashboard (which can "
                "run code) outside the cluster; keep ClusterIP and use kubectl port-forward"
            )
        if head.get("enableIngress"):
            yield f"{path}.headGroupSpec.enableIngress exposes the dashboard; use kubectl port-forward"


def _rule_token_auth_on(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            yield (
                f"{path}.authOptions: set mode: token (with secretName: <Secret with key "
                "auth_token>); without it anyone who reaches the dashboard can run code"
            )


def _pvc_mounts(group: _Group) -> set[tuple[str, str]]:
    claims = {
        v.get("name"): (v.get("persistentVolumeClaim") or {}).get("claimName")
        for v in group.pod.get("volumes") or []
        if isinstance(v, dict) and v.get("persistentVolumeClaim")
    }
    return {
        (claims[m.get("name")], m.get("mountPath"))
        for m in group.ray_container.get("volumeMounts") or []
        if m.get("name") in claims
    }


def _rule_shared_storage_everywhere(doc: dict) -> Iterator[str]:
    for path, cluster in _cluster_specs(doc):
        groups = list(_groups(path, cluster))
        mounts = {g.path: _pvc_mounts(g) for g in groups}
        wanted = set().union(*mounts.values()) if mounts else set()
        for group in groups:
            for claim, mount_path in sorted(wanted - mounts[group.path]):
                yield (
                    f"{group.path} ({group.name}): does not mount PVC {claim!r} at {mount_path}; "
                    "checkpoints and datasets written there by other pods would be invisible "
                    "here. Mount the same claim at the same path on the head and every worker group"
                )


def _rule_gpu_workers_drain(doc: dict) -> Iterator[str]:
    for _, _, group in _all_groups(doc):
        if group.is_head or not _gpu_count(group.ray_container):
            continue
        grace = group.pod.get("terminationGracePeriodSeconds", 30)
        if grace < MIN_GPU_GRACE_SECONDS:
            yield (
                f"{group.path} ({group.name}): terminationGracePeriodSeconds {grace} is too short "
                f"to checkpoint after a spot reclaim; use >= {MIN_GPU_GRACE_SECONDS} (e.g. 120)"
            )
        if not (group.ray_container.get("lifecycle") or {}).get("preStop"):
            yield (
                f"{group.path} ({group.name}): the Ray container has no lifecycle.preStop hook; "
                "add one that runs `ray drain-node` so a pod deletion becomes a preemption notice"
            )


def _rule_rayjob_deadline(doc: dict) -> Iterator[str]:
    spec = doc.get("spec") or {}
    if doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        if "activeDeadlineSeconds" not in spec:
            yield (
                "spec.activeDeadlineSeconds is not set; a stuck run would hold its GPUs forever. "
                "Set a wall-clock limit, e.g. 86400"
            )
        if not spec.get("shutdownAfterJobFinishes") and not spec.get("deletionStrategy"):
            yield (
                "spec.shutdownAfterJobFinishes is not true; the job's cluster (and its GPUs) "
                "would stay up after the job ends"
            )


PROJECT_RULES: tuple[Callable[[dict], Iterable[str]], ...] = (
    _rule_replica_bounds,
    _rule_group_names,
    _rule_ray_resource_formats,
    _rule_head_runs_no_work,
    _rule_container_resources,
    _rule_gpu_request_equals_limit,
    _rule_non_root,
    _rule_no_secret_literals,
    _rule_internal_only,
    _rule_token_auth_on,
    _rule_shared_storage_everywhere,
    _rule_gpu_workers_drain,
    _rule_rayjob_deadline,
)
