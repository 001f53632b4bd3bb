"""Rules a KubeRay manifest must follow beyond its CRD schema, as plain functions.

Each rule takes a whole manifest (RayCluster, RayJob or RayService, ray.io/v1) and yields
problems, each naming the field, the value and the fix.

KUBERAY_RULES are what KubeRay v1.7.0's controller refuses although the CRD schema (checked in
validate.py, CEL rules included) lets it through; a RayJob breaking one is accepted by
`kubectl apply` and ends in `ValidationFailed`. Each cites the line it mirrors in
ray-operator/controllers/ray/utils/validation.go at tag v1.7.0 ("validation.go:N").

PROJECT_RULES are this project's rules for fine-tuning clusters: the head runs no work,
resources on every container, pods that cannot reach into their node, secrets only through
`secretKeyRef`, the dashboard protected, the same shared volume on every pod, a drain hook on
GPU workers, and jobs that cannot hold GPUs forever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import yaml

# constant.go:375-381 (v1.7.0): KubeRay appends 6 characters to RayJob/RayService names to
# name their RayCluster, and derives pod and service names from that.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
MIN_GPU_GRACE_SECONDS = 60

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SECRET_LIKE = re.compile(
    r"TOKEN|PASSWORD|PASSWD|SECRET|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.IGNORECASE
)
_NOT_SECRET_SUFFIXES = ("_PATH", "_FILE", "_DIR", "_MODE")
_GPU_KEY = re.compile(r"(gpu$)|(^nvidia\.com/mig-\d+g\.\d+gb$)")

Rule = Callable[[dict], Iterable[str]]


# --------------------------------------------------------------------------- walking a manifest


@dataclass
class _Group:
    path: str  # e.g. "spec.rayClusterSpec.workerGroupSpecs[1]"
    name: str  # "head" or the worker groupName
    spec: dict

    @property
    def is_head(self) -> bool:
        return self.name == "head"

    @property
    def pod(self) -> dict:
        return (self.spec.get("template") or {}).get("spec") or {}

    @property
    def ray_container(self) -> dict:
        # KubeRay treats the first container as the Ray container (constant.go:51).
        return (self.pod.get("containers") or [{}])[0]

    @property
    def params(self) -> dict:
        return self.spec.get("rayStartParams") or {}


def _clusters(doc: dict) -> Iterator[tuple[str, dict]]:
    spec = doc.get("spec") or {}
    field = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    if field[doc["kind"]] is None:
        yield "spec", spec
    elif isinstance(spec.get(field[doc["kind"]]), dict):
        yield f"spec.{field[doc['kind']]}", spec[field[doc["kind"]]]


def _groups(path: str, cluster: dict) -> Iterator[_Group]:
    if isinstance(cluster.get("headGroupSpec"), dict):
        yield _Group(f"{path}.headGroupSpec", "head", cluster["headGroupSpec"])
    for i, worker in enumerate(cluster.get("workerGroupSpecs") or []):
        yield _Group(f"{path}.workerGroupSpecs[{i}]", str(worker.get("groupName")), worker)


def _all_groups(doc: dict) -> Iterator[_Group]:
    for path, cluster in _clusters(doc):
        yield from _groups(path, cluster)


def _head(path: str, cluster: dict) -> _Group:
    return _Group(f"{path}.headGroupSpec", "head", cluster["headGroupSpec"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or [] if "name" in e}


def _ray_version(cluster: dict) -> tuple[int, ...] | None:
    match = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(cluster.get("rayVersion") or ""))
    return tuple(int(x or 0) for x in match.groups()) if match else None


def _gpu_count(container: dict) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return sum(float(v) for k, v in limits.items() if _GPU_KEY.search(str(k)))


def _pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """Every pod spec in the manifest: Ray groups and the K8sJobMode submitter template."""
    for group in _all_groups(doc):
        yield f"{group.path}.template.spec", group.pod
    if doc["kind"] == "RayJob" and (doc.get("spec") or {}).get("submitterPodTemplate"):
        yield "spec.submitterPodTemplate.spec", doc["spec"]["submitterPodTemplate"].get("spec", {})


def _containers(pod: dict) -> Iterator[tuple[str, dict]]:
    for field in ("initContainers", "containers"):
        for i, container in enumerate(pod.get(field) or []):
            yield f"{field}[{i}]", container


# --------------------------------------------------------------------------- KubeRay's rules


def _rule_name(doc: dict) -> Iterator[str]:
    # validation.go:32-40 (RayCluster), 533-541 (RayJob), 632-638 (RayService).
    name = str((doc.get("metadata") or {}).get("name") or "")
    limit = MAX_NAME_LENGTH[doc["kind"]]
    if len(name) > limit:
        yield (f"metadata.name is {len(name)} characters; KubeRay allows at most {limit} for a "
               f"{doc['kind']} (it derives pod and service names from it). Shorten the name")
    if not _DNS1035.match(name):
        yield (f"metadata.name {name!r} must be a DNS-1035 label: lowercase letters, digits and "
               "'-', starting with a letter and ending with a letter or digit")


def _rule_groups(doc: dict) -> Iterator[str]:
    for group in _all_groups(doc):
        where = f"{group.path} ({group.name})"
        if not group.pod.get("containers"):  # validation.go:104-106, 119-121
            yield f"{group.path}.template.spec.containers: needs a container; the first runs Ray"
        low, high = group.spec.get("minReplicas"), group.spec.get("maxReplicas")
        if (low or 0) < 0 or (high or 0) < 0:  # validation.go:128-133
            yield f"{where}: minReplicas and maxReplicas must be >= 0"
        if isinstance(low, int) and isinstance(high, int) and low > high:  # validation.go:134-137
            yield f"{where}: minReplicas {low} > maxReplicas {high}"
        in_params = [p for p in ("num-cpus", "num-gpus", "memory", "resources")
                     if group.params.get(p)]
        if in_params and group.spec.get("resources"):  # validation.go:59-69
            yield (f"{where}: Ray resources are set both in rayStartParams "
                   f"({', '.join(in_params)}) and in the group's resources field; KubeRay "
                   "rejects this. Keep only the resources field")
        if "labels" in group.params:  # validation.go:73-75
            yield (f"{group.path}.rayStartParams.labels is not supported by KubeRay; use the "
                   "group's top-level labels field")
        for key, value in (group.spec.get("labels") or {}).items():  # validation.go:77-93
            prefix, _, name = str(key).rpartition("/")
            if len(name) > 63 or not _LABEL_NAME.match(name) or len(prefix) > 253:
                yield f"{group.path}.labels: invalid label key {key!r}"
            if len(str(value)) > 63 or not _LABEL_VALUE.match(str(value)):
                yield f"{group.path}.labels: invalid value {value!r} for label {key!r}"


def _rule_gcs_fault_tolerance(doc: dict) -> Iterator[str]:
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    for path, cluster in _clusters(doc):
        head = _head(path, cluster)
        env = _env(head.ray_container)
        if cluster.get("gcsFaultToleranceOptions") is None:
            # validation.go:158-164
            if "RAY_REDIS_ADDRESS" in env and not annotations.get("ray.io/ft-enabled"):
                yield (f"{head.path}: env RAY_REDIS_ADDRESS turns on GCS fault tolerance "
                       "implicitly; configure it with gcsFaultToleranceOptions instead")
            continue
        if annotations.get("ray.io/ft-enabled"):  # validation.go:153-156
            yield ("the ray.io/ft-enabled annotation and gcsFaultToleranceOptions are both set; "
                   "use only gcsFaultToleranceOptions")
        if head.params.get("redis-password"):  # validation.go:168-171
            yield (f"{head.path}.rayStartParams.redis-password: not allowed with "
                   "gcsFaultToleranceOptions; use gcsFaultToleranceOptions.redisPassword")
        for var, field in (("REDIS_PASSWORD", "redisPassword"),
                           ("RAY_REDIS_ADDRESS", "redisAddress")):  # validation.go:173-181
            if var in env:
                yield (f"{head.path}: env {var} is not allowed with gcsFaultToleranceOptions; "
                       f"use gcsFaultToleranceOptions.{field}")


def _rule_autoscaler(doc: dict) -> Iterator[str]:
    for path, cluster in _clusters(doc):
        head = _head(path, cluster)
        env_v2 = _env(head.ray_container).get("RAY_enable_autoscaler_v2", {}).get("value")
        version = (cluster.get("autoscalerOptions") or {}).get("version")
        autoscaling = cluster.get("enableInTreeAutoscaling")
        if not autoscaling and env_v2 in ("1", "true"):  # validation.go:206-212
            yield f"{path}: RAY_enable_autoscaler_v2={env_v2} needs enableInTreeAutoscaling: true"
        if autoscaling and env_v2 is not None and version:  # validation.go:222-224
            yield (f"{path}: both autoscalerOptions.version and head env RAY_enable_autoscaler_v2 "
                   "are set; keep only autoscalerOptions.version")
        for group in _groups(path, cluster):
            policy = group.pod.get("restartPolicy")
            if autoscaling and version == "v2" and policy not in (None, "", "Never"):
                yield (f"{group.path}.template.spec.restartPolicy: must be Never or unset with "
                       f"autoscaler v2, got {policy!r}")  # validation.go:226-235
            if autoscaling and group.spec.get("suspend"):  # validation.go:214-220
                yield f"{group.path}: a group cannot be suspended while autoscaling is on"
            for field in ("idleTimeoutSeconds", "priority"):  # validation.go:1016-1026, 1132-1141
                if group.spec.get(field) and version != "v2" and env_v2 not in ("1", "true"):
                    yield f"{group.path}.{field} needs autoscalerOptions.version: v2"
            if group.spec.get("priority") and (_ray_version(cluster) or (0,)) < (2, 56):
                yield f"{group.path}.priority needs rayVersion >= 2.56.0"  # validation.go:1119-1130


def _rule_token_auth_version(doc: dict) -> Iterator[str]:
    for path, cluster in _clusters(doc):  # validation.go:284-298
        if (cluster.get("authOptions") or {}).get("mode") == "token" and \
                (_ray_version(cluster) or (0,)) < (2, 52):
            yield (f"{path}.rayVersion: authOptions.mode token needs Ray >= 2.52.0, got "
                   f"{cluster.get('rayVersion')!r}")


def _rule_rayjob(doc: dict) -> Iterator[str]:
    if doc["kind"] != "RayJob":
        return
    spec = doc.get("spec") or {}
    selector, mode = spec.get("clusterSelector") or {}, spec.get("submissionMode", "K8sJobMode")
    shutdown, ttl = spec.get("shutdownAfterJobFinishes"), spec.get("ttlSecondsAfterFinished") or 0
    if ("rayClusterSpec" in spec) == bool(selector):  # validation.go:564-566
        yield ("spec: set exactly one of rayClusterSpec (a new cluster for this job) or "
               "clusterSelector: {ray.io/cluster: <name>} (an existing RayCluster)")
    if selector:  # validation.go:567-578
        if not selector.get("ray.io/cluster"):
            yield "spec.clusterSelector: needs a non-empty ray.io/cluster: <raycluster name>"
        if mode == "SidecarMode":
            yield "spec.clusterSelector cannot be used with submissionMode SidecarMode"
        if spec.get("suspend"):
            yield "spec.suspend cannot be used with clusterSelector"
        if (spec.get("backoffLimit") or 0) > 0:
            yield "spec.backoffLimit > 0 cannot be used with clusterSelector"
    if spec.get("suspend") and not shutdown:  # validation.go:547-549
        yield "spec.suspend: true needs shutdownAfterJobFinishes: true"
    if ttl < 0:  # validation.go:551-553
        yield "spec.ttlSecondsAfterFinished must be >= 0"
    if ttl > 0 and not shutdown:  # validation.go:753-755
        yield (f"spec.ttlSecondsAfterFinished={ttl} needs shutdownAfterJobFinishes: true; "
               "KubeRay rejects it otherwise")
    if spec.get("activeDeadlineSeconds", 1) <= 0:  # validation.go:619-621
        yield f"spec.activeDeadlineSeconds must be > 0 when set, got {spec['activeDeadlineSeconds']}"
    if spec.get("backoffLimit", 0) < 0:  # validation.go:625-627
        yield f"spec.backoffLimit must be >= 0, got {spec['backoffLimit']}"
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:  # validation.go:587
        yield "spec.backoffLimit > 0 is not allowed in InteractiveMode"
    if mode == "SidecarMode":  # validation.go:591-603
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                yield f"spec.{field} is not supported in SidecarMode"
        head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}
        policy = ((head.get("template") or {}).get("spec") or {}).get("restartPolicy")
        if policy not in (None, "", "Never"):
            yield f"SidecarMode needs the head pod restartPolicy Never or unset, got {policy!r}"
    try:  # validation.go:616-618: only that it parses
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as err:
        yield f"spec.runtimeEnvYAML is not valid YAML: {str(err).splitlines()[0]}"


def _rule_rayjob_deletion_strategy(doc: dict) -> Iterator[str]:
    spec = doc.get("spec") or {}
    strategy = spec.get("deletionStrategy")
    if doc["kind"] != "RayJob" or not isinstance(strategy, dict):
        return
    rules = strategy.get("deletionRules") or []
    legacy = [strategy[k] for k in ("onSuccess", "onFailure") if strategy.get(k)]
    policies = {r.get("policy") for r in rules + legacy}
    if rules and spec.get("shutdownAfterJobFinishes"):  # validation.go:771-773
        yield ("spec.deletionStrategy.deletionRules and shutdownAfterJobFinishes: true are "
               "mutually exclusive; express the cleanup as a DeleteCluster rule instead")
    if "DeleteWorkers" in policies and (spec.get("rayClusterSpec") or {}).get(
            "enableInTreeAutoscaling"):  # validation.go:819-823, 956-959
        yield "spec.deletionStrategy: DeleteWorkers cannot be used with enableInTreeAutoscaling"
    if spec.get("clusterSelector") and {"DeleteCluster", "DeleteWorkers"} & policies:
        yield ("spec.deletionStrategy: DeleteCluster/DeleteWorkers cannot be used with "
               "clusterSelector")  # validation.go:815-818, 947-954
    if legacy and spec.get("shutdownAfterJobFinishes") and "DeleteNone" in policies:
        yield "spec.deletionStrategy: DeleteNone contradicts shutdownAfterJobFinishes: true"  # :961


KUBERAY_RULES: tuple[Rule, ...] = (
    _rule_name,
    _rule_groups,
    _rule_gcs_fault_tolerance,
    _rule_autoscaler,
    _rule_token_auth_version,
    _rule_rayjob,
    _rule_rayjob_deletion_strategy,
)


# --------------------------------------------------------------------------- this project's rules


def _rule_job_fields(doc: dict) -> Iterator[str]:
    spec = doc.get("spec") or {}
    if doc["kind"] != "RayJob":
        return
    # KubeRay takes any string here and then never submits the job (rayjob_controller.go
    # compares it with the four modes only).
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        yield f"spec.submissionMode {mode!r} is not one of {', '.join(SUBMISSION_MODES)}"
    raw = spec.get("entrypointResources")
    try:
        parsed = json.loads(raw) if raw is not None else {}
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not all(isinstance(v, (int, float))
                                               for v in parsed.values()):
        yield "spec.entrypointResources must be a JSON object of numbers, e.g. '{\"driver\": 1}'"
    if "rayClusterSpec" in spec:
        if "activeDeadlineSeconds" not in spec:
            yield ("spec.activeDeadlineSeconds is not set; a stuck run would hold its GPUs "
                   "forever. Set a wall-clock limit, e.g. 86400")
        if not spec.get("shutdownAfterJobFinishes") and not spec.get("deletionStrategy"):
            yield ("spec.shutdownAfterJobFinishes is not true; the job's cluster (and its GPUs) "
                   "would stay up after the job ends")


def _rule_worker_groups(doc: dict) -> Iterator[str]:
    for path, cluster in _clusters(doc):
        head = _head(path, cluster)
        if head.params.get("num-cpus") != "0":
            yield (f'{head.path}.rayStartParams.num-cpus should be "0" so that training and data '
                   "tasks never run on the head (losing the head loses the cluster)")
        if _gpu_count(head.ray_container):
            yield f"{head.path}: the head requests GPUs; put GPUs in worker groups only"
        seen: set[str] = set()
        for group in _groups(path, cluster):
            if not group.is_head and group.name in seen:
                # KubeRay tells groups apart by name (the ray.io/group pod label).
                yield f"{group.path}: groupName {group.name!r} is used twice; names must be unique"
            seen.add(group.name)
            if group.is_head or not _gpu_count(group.ray_container):
                continue
            grace = group.pod.get("terminationGracePeriodSeconds", 30)
            if grace < MIN_GPU_GRACE_SECONDS:
                yield (f"{group.path} ({group.name}): terminationGracePeriodSeconds {grace} is too "
                       f"short to checkpoint after a spot reclaim; use >= {MIN_GPU_GRACE_SECONDS}")
            if not (group.ray_container.get("lifecycle") or {}).get("preStop"):
                yield (f"{group.path} ({group.name}): the Ray container has no lifecycle.preStop "
                       "hook; add one that runs `ray drain-node` so that a pod deletion becomes a "
                       "preemption notice")


def _rule_container_resources(doc: dict) -> Iterator[str]:
    for pod_path, pod in _pod_specs(doc):
        for cpath, container in _containers(pod):
            resources = container.get("resources") or {}
            requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
            for part, given in (("requests", requests), ("limits", limits)):
                missing = [r for r in ("cpu", "memory") if r not in given]
                if missing:
                    yield (f"{pod_path}.{cpath} ({container.get('name')}): set resources.{part} "
                           f"for {' and '.join(missing)} (the scheduler and Ray both size from "
                           "them)")
            for key in requests:
                # Kubernetes refuses an extended resource whose request differs from its limit.
                if _GPU_KEY.search(str(key)) and requests[key] != limits.get(key):
                    yield (f"{pod_path}.{cpath}: {key} request {requests[key]!r} must equal its "
                           f"limit {limits.get(key)!r}")


_NODE_ACCESS = "Ray runs job code in every pod; with this, that code could take over the node"


def _rule_pod_security(doc: dict) -> Iterator[str]:
    """No pod may reach into its node: the reasons a Pod Security Standard "restricted" gives."""
    contexts = [(f"{path}.autoscalerOptions.securityContext",
                 (cluster.get("autoscalerOptions") or {}).get("securityContext") or {})
                for path, cluster in _clusters(doc)]
    for pod_path, pod in _pod_specs(doc):
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(field):
                yield (f"{pod_path}.{field}: true shares the node's "
                       f"{field[4:].lower()} namespace with the pod; {_NODE_ACCESS}. Remove it")
        for i, volume in enumerate(pod.get("volumes") or []):
            if "hostPath" in volume:
                yield (f"{pod_path}.volumes[{i}] ({volume.get('name')}): hostPath "
                       f"{(volume['hostPath'] or {}).get('path')!r} mounts a folder of the node; "
                       f"{_NODE_ACCESS}. Use the shared PVC or an emptyDir")
        pod_context = pod.get("securityContext") or {}
        for cpath, container in _containers(pod):
            context = container.get("securityContext") or {}
            contexts.append((f"{pod_path}.{cpath}.securityContext", context))
            if context.get("runAsUser") == 0 or not (
                    context.get("runAsNonRoot") or pod_context.get("runAsNonRoot")):
                yield (f"{pod_path}.{cpath} ({container.get('name')}): set "
                       "securityContext.runAsNonRoot: true on the pod or the container, and no "
                       "runAsUser 0 (the Ray images run as uid 1000)")
    for where, context in contexts:
        if context.get("privileged"):
            yield f"{where}.privileged: true gives the container the node's devices; {_NODE_ACCESS}"
        if context.get("allowPrivilegeEscalation"):
            yield (f"{where}.allowPrivilegeEscalation: true lets a process gain more privileges "
                   "than its parent (setuid binaries); set it to false")
        added = (context.get("capabilities") or {}).get("add")
        if added:
            yield (f"{where}.capabilities.add: {added} grants Linux capabilities beyond the "
                   "default set; Ray needs none. Remove them and keep drop: [ALL]")


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_LIKE.search(name)) and not name.upper().endswith(_NOT_SECRET_SUFFIXES)


def _rule_no_secret_literals(doc: dict) -> Iterator[str]:
    fix = "take it from a Kubernetes Secret with valueFrom.secretKeyRef"
    for pod_path, pod in _pod_specs(doc):
        for cpath, container in _containers(pod):
            for name, entry in _env(container).items():
                if _is_secret_name(name) and entry.get("value"):
                    yield f"{pod_path}.{cpath}: env {name} holds a literal value; {fix}"
    for path, cluster in _clusters(doc):
        options = cluster.get("gcsFaultToleranceOptions") or {}
        if (options.get("redisPassword") or {}).get("value"):
            yield f"{path}.gcsFaultToleranceOptions.redisPassword.value is a literal secret; {fix}"
        autoscaler = {"env": (cluster.get("autoscalerOptions") or {}).get("env")}
        for name, entry in _env(autoscaler).items():
            if _is_secret_name(name) and entry.get("value"):
                yield f"{path}.autoscalerOptions.env {name} holds a literal value; {fix}"
    if doc["kind"] == "RayJob":
        try:
            runtime_env = yaml.safe_load((doc.get("spec") or {}).get("runtimeEnvYAML") or "")
        except yaml.YAMLError:
            return  # _rule_rayjob reports it
        for name in (runtime_env or {}).get("env_vars") or {}:
            if _is_secret_name(str(name)):
                yield (f"spec.runtimeEnvYAML env_vars.{name} would put a secret into the job's "
                       f"runtime env (visible in the dashboard); {fix} on the pods instead")


def _rule_dashboard_protected(doc: dict) -> Iterator[str]:
    for path, cluster in _clusters(doc):
        head = cluster.get("headGroupSpec") or {}
        service_type = head.get("serviceType") or "ClusterIP"
        if service_type != "ClusterIP":
            yield (f"{path}.headGroupSpec.serviceType {service_type} exposes the dashboard (which "
                   "runs code) outside the cluster; keep ClusterIP and use kubectl port-forward")
        if head.get("enableIngress"):
            yield f"{path}.headGroupSpec.enableIngress exposes the dashboard; use port-forward"
        if (cluster.get("authOptions") or {}).get("mode") != "token":
            yield (f"{path}.authOptions: set mode: token (with secretName: <Secret with key "
                   "auth_token>); without it anyone who reaches the dashboard can run code")


def _rule_shared_storage_everywhere(doc: dict) -> Iterator[str]:
    for path, cluster in _clusters(doc):
        mounts = {g.path: _pvc_mounts(g) for g in _groups(path, cluster)}
        wanted = set().union(*mounts.values())
        for group in _groups(path, cluster):
            for claim, mount_path in sorted(wanted - mounts[group.path]):
                yield (f"{group.path} ({group.name}): does not mount PVC {claim!r} at "
                       f"{mount_path}; checkpoints and datasets written there by other pods "
                       "would be invisible here. Mount the same claim at the same path on the "
                       "head and every worker group")


def _pvc_mounts(group: _Group) -> set[tuple[str, str]]:
    claims = {v.get("name"): v["persistentVolumeClaim"].get("claimName")
              for v in group.pod.get("volumes") or [] if v.get("persistentVolumeClaim")}
    return {(claims[m["name"]], m.get("mountPath"))
            for m in group.ray_container.get("volumeMounts") or [] if m.get("name") in claims}


PROJECT_RULES: tuple[Rule, ...] = (
    _rule_job_fields,
    _rule_worker_groups,
    _rule_container_resources,
    _rule_pod_security,
    _rule_no_secret_literals,
    _rule_dashboard_protected,
    _rule_shared_storage_everywhere,
)
