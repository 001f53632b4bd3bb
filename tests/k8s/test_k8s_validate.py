"""validate_manifest: each rule catches the broken manifest it is written for, and none fires
on what the chart renders."""

from __future__ import annotations

import pytest
import yaml

from ray_app.k8s import schemas
from ray_app.k8s.validate import CEL_RULES, validate_manifest


def cluster(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]


def head(job: dict) -> dict:
    return cluster(job)["headGroupSpec"]


def gpu_group(job: dict) -> dict:
    return cluster(job)["workerGroupSpecs"][1]  # gpu-ondemand


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def assert_reported(doc: dict, fragment: str, **kwargs) -> None:
    found = validate_manifest(doc, **kwargs)
    assert any(fragment in p for p in found), f"{fragment!r} not in {found}"


def test_valid_bases_have_no_problems(rayjob, raycluster):
    assert validate_manifest(rayjob) == []
    assert validate_manifest(raycluster) == []


# --------------------------------------------------------------------------- schema layer


def test_unknown_field_is_reported_by_name(rayjob):
    gpu_group(rayjob)["minReplica"] = 1
    assert_reported(rayjob, "unknown field(s) 'minReplica'")


def test_missing_required_field_is_reported(rayjob):
    del gpu_group(rayjob)["groupName"]
    assert_reported(rayjob, "workerGroupSpecs[1]: missing required field 'groupName'")


def test_ray_start_param_given_as_number_gets_a_quoting_hint(rayjob):
    head(rayjob)["rayStartParams"]["num-cpus"] = 0
    assert_reported(
        rayjob, 'rayStartParams.num-cpus: must be a string; quote the value in YAML: "0"'
    )


def test_string_where_integer_belongs_is_reported(rayjob):
    gpu_group(rayjob)["numOfHosts"] = "two"
    assert_reported(rayjob, "numOfHosts: 'two' is not of type 'integer'")


def test_float_cpu_quantity_is_reported(rayjob):
    ray_container(head(rayjob))["resources"]["limits"]["cpu"] = 1.5
    assert_reported(rayjob, "limits.cpu: 1.5 must be an integer or a quantity string")


def test_int32_overflow_is_reported(rayjob):
    gpu_group(rayjob)["maxReplicas"] = 2**31
    assert_reported(rayjob, "maxReplicas: 2147483648 is not a 'int32'")


def test_duplicate_container_names_are_reported(rayjob):
    containers = head(rayjob)["template"]["spec"]["containers"]
    containers.append(dict(containers[0]))
    assert_reported(rayjob, "entries must be unique by name")


def test_pre_running_deadline_below_one_is_left_to_the_schema(rayjob):
    rayjob["spec"]["preRunningDeadlineSeconds"] = 0
    assert_reported(rayjob, "spec.preRunningDeadlineSeconds: 0 is less than the minimum of 1")


def test_managed_by_outside_the_allowed_values_is_reported(rayjob):
    rayjob["spec"]["managedBy"] = "someone-else"
    assert_reported(rayjob, "managedBy field value must be either")


def test_deletion_condition_with_both_statuses_is_reported(rayjob):
    rayjob["spec"]["deletionStrategy"] = {
        "deletionRules": [
            {
                "policy": "DeleteCluster",
                "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"},
            }
        ]
    }
    assert_reported(rayjob, "cannot be used together within the same deletion condition")


def test_every_cel_rule_in_the_shipped_crds_is_implemented():
    rules: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            rules.update(r["rule"] for r in node.get("x-kubernetes-validations", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for kind in schemas.KINDS:
        walk(schemas.openapi_schema(kind))
    assert rules <= set(CEL_RULES), rules - set(CEL_RULES)


def test_crds_are_the_kuberay_1_7_copies():
    source = (schemas.CRD_DIR / "SOURCE.md").read_text()
    assert f"v{schemas.KUBERAY_VERSION}" in source
    for kind in schemas.KINDS:
        assert "v1" in schemas.served_versions(kind)


def test_v1alpha1_is_reported_as_deprecated(raycluster):
    raycluster["apiVersion"] = "ray.io/v1alpha1"
    assert_reported(raycluster, "use ray.io/v1")


def test_document_that_is_not_a_mapping_is_reported():
    assert validate_manifest(["not", "a", "manifest"]) == [
        "a manifest must be a YAML mapping, got list"
    ]


# --------------------------------------------------------------------------- KubeRay's rules


def test_rayjob_name_longer_than_47_characters_is_reported(rayjob):
    rayjob["metadata"]["name"] = "a" * 48
    assert_reported(rayjob, "KubeRay allows at most 47 for a RayJob")


def test_raycluster_name_must_be_a_dns1035_label(raycluster):
    raycluster["metadata"]["name"] = "1-Cluster"
    assert_reported(raycluster, "must be a DNS-1035 label")


def test_group_without_containers_is_reported(rayjob):
    gpu_group(rayjob)["template"]["spec"]["containers"] = []
    assert_reported(rayjob, "needs a container")


def test_min_replicas_above_max_replicas_is_reported(rayjob):
    gpu_group(rayjob)["minReplicas"] = 3
    assert_reported(rayjob, "minReplicas 3 > maxReplicas 1")


def test_negative_max_replicas_is_reported(rayjob):
    gpu_group(rayjob)["maxReplicas"] = -1
    assert_reported(rayjob, "minReplicas and maxReplicas must be >= 0")


def test_resources_in_ray_start_params_and_group_field_are_reported(raycluster):
    driver = raycluster["spec"]["workerGroupSpecs"][0]
    driver["rayStartParams"]["num-cpus"] = "4"
    assert_reported(
        raycluster, "set both in rayStartParams (num-cpus) and in the group's resources"
    )


def test_labels_in_ray_start_params_are_reported(raycluster):
    raycluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["labels"] = "a=b"
    assert_reported(raycluster, "rayStartParams.labels is not supported")


def test_invalid_ray_label_value_is_reported(raycluster):
    raycluster["spec"]["workerGroupSpecs"][0]["labels"]["ray.io/market-type"] = "on demand"
    assert_reported(raycluster, "invalid value 'on demand'")


def test_redis_password_param_with_gcs_fault_tolerance_is_reported(raycluster):
    raycluster["spec"]["gcsFaultToleranceOptions"] = {"redisAddress": "redis:6379"}
    raycluster["spec"]["headGroupSpec"]["rayStartParams"]["redis-password"] = "$PW"
    assert_reported(raycluster, "redis-password: not allowed with gcsFaultToleranceOptions")


def test_redis_address_env_without_gcs_fault_tolerance_is_reported(raycluster):
    env = ray_container(raycluster["spec"]["headGroupSpec"])["env"]
    env.append({"name": "RAY_REDIS_ADDRESS", "value": "redis:6379"})
    assert_reported(raycluster, "RAY_REDIS_ADDRESS turns on GCS fault tolerance implicitly")


def test_restart_policy_always_with_autoscaler_v2_is_reported(rayjob):
    gpu_group(rayjob)["template"]["spec"]["restartPolicy"] = "Always"
    assert_reported(rayjob, "restartPolicy: must be Never or unset with autoscaler v2")


def test_autoscaler_v2_env_without_autoscaling_is_reported(raycluster):
    raycluster["spec"]["enableInTreeAutoscaling"] = False
    del raycluster["spec"]["autoscalerOptions"]
    env = ray_container(raycluster["spec"]["headGroupSpec"])["env"]
    env.append({"name": "RAY_enable_autoscaler_v2", "value": "true"})
    assert_reported(raycluster, "needs enableInTreeAutoscaling: true")


def test_group_priority_without_autoscaler_v2_is_reported(raycluster):
    raycluster["spec"]["autoscalerOptions"]["version"] = "v1"
    assert_reported(raycluster, "workerGroupSpecs[2].priority needs autoscalerOptions.version: v2")


def test_token_auth_with_ray_older_than_2_52_is_reported(rayjob):
    cluster(rayjob)["rayVersion"] = "2.51.0"
    assert_reported(rayjob, "authOptions.mode token needs Ray >= 2.52.0")


def test_rayjob_without_cluster_spec_or_selector_is_reported(rayjob):
    del rayjob["spec"]["rayClusterSpec"]
    assert_reported(rayjob, "set exactly one of rayClusterSpec")


def test_rayjob_with_both_cluster_spec_and_selector_is_reported(rayjob):
    rayjob["spec"]["clusterSelector"] = {"ray.io/cluster": "ray-finetune"}
    assert_reported(rayjob, "set exactly one of rayClusterSpec")


def test_cluster_selector_with_sidecar_mode_is_reported(rayjob):
    del rayjob["spec"]["rayClusterSpec"]
    rayjob["spec"]["clusterSelector"] = {"ray.io/cluster": "ray-finetune"}
    rayjob["spec"]["submissionMode"] = "SidecarMode"
    assert_reported(rayjob, "clusterSelector cannot be used with submissionMode SidecarMode")


def test_ttl_without_shutdown_after_job_finishes_is_reported(rayjob):
    rayjob["spec"]["shutdownAfterJobFinishes"] = False
    assert_reported(rayjob, "ttlSecondsAfterFinished=600 needs shutdownAfterJobFinishes: true")


def test_suspend_without_shutdown_after_job_finishes_is_reported(rayjob):
    rayjob["spec"].update(suspend=True, shutdownAfterJobFinishes=False, ttlSecondsAfterFinished=0)
    assert_reported(rayjob, "suspend: true needs shutdownAfterJobFinishes: true")


def test_non_positive_active_deadline_is_reported(rayjob):
    rayjob["spec"]["activeDeadlineSeconds"] = 0
    assert_reported(rayjob, "activeDeadlineSeconds must be > 0")


def test_deletion_rules_with_shutdown_after_job_finishes_are_reported(rayjob):
    rayjob["spec"]["deletionStrategy"] = {
        "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]
    }
    assert_reported(
        rayjob, "deletionRules and shutdownAfterJobFinishes: true are mutually exclusive"
    )


def test_delete_workers_with_autoscaling_is_reported(rayjob):
    rayjob["spec"]["shutdownAfterJobFinishes"] = False
    rayjob["spec"]["ttlSecondsAfterFinished"] = 0
    rayjob["spec"]["deletionStrategy"] = {
        "deletionRules": [{"policy": "DeleteWorkers", "condition": {"jobStatus": "SUCCEEDED"}}]
    }
    assert_reported(rayjob, "DeleteWorkers cannot be used with enableInTreeAutoscaling")


def test_backoff_limit_in_interactive_mode_is_reported(rayjob):
    rayjob["spec"].update(submissionMode="InteractiveMode", backoffLimit=1)
    assert_reported(rayjob, "backoffLimit > 0 is not allowed in InteractiveMode")


def test_submitter_config_in_sidecar_mode_is_reported(rayjob):
    rayjob["spec"]["submissionMode"] = "SidecarMode"
    rayjob["spec"]["submitterConfig"] = {"backoffLimit": 1}
    assert_reported(rayjob, "submitterConfig is not supported in SidecarMode")


def test_runtime_env_yaml_that_does_not_parse_is_reported(rayjob):
    rayjob["spec"]["runtimeEnvYAML"] = "env_vars: {A: [1, 2"
    assert_reported(rayjob, "runtimeEnvYAML is not valid YAML")


# --------------------------------------------------------------------------- this project's rules


def test_unknown_submission_mode_is_reported(rayjob):
    rayjob["spec"]["submissionMode"] = "HttpMode"
    assert_reported(rayjob, "submissionMode 'HttpMode' is not one of")


def test_entrypoint_resources_must_be_a_json_object(rayjob):
    rayjob["spec"]["entrypointResources"] = "driver=1"
    assert_reported(rayjob, "entrypointResources must be a JSON object of numbers")


def test_duplicate_worker_group_names_are_reported(rayjob):
    gpu_group(rayjob)["groupName"] = "driver"
    assert_reported(rayjob, "groupName 'driver' is used twice")


def test_head_that_accepts_work_is_reported(rayjob):
    del head(rayjob)["rayStartParams"]["num-cpus"]
    assert_reported(rayjob, 'num-cpus should be "0"')


def test_head_with_gpus_is_reported(rayjob):
    resources = ray_container(head(rayjob))["resources"]
    resources["limits"]["nvidia.com/gpu"] = resources["requests"]["nvidia.com/gpu"] = 1
    assert_reported(rayjob, "the head requests GPUs")


def test_container_without_limits_is_reported(rayjob):
    del ray_container(gpu_group(rayjob))["resources"]["limits"]
    assert_reported(rayjob, "set resources.limits for cpu and memory")


def test_gpu_request_different_from_limit_is_reported(rayjob):
    ray_container(gpu_group(rayjob))["resources"]["requests"]["nvidia.com/gpu"] = 4
    assert_reported(rayjob, "nvidia.com/gpu request 4 must equal its limit 8")


def test_pod_without_run_as_non_root_is_reported(rayjob):
    del gpu_group(rayjob)["template"]["spec"]["securityContext"]["runAsNonRoot"]
    assert_reported(rayjob, "set securityContext.runAsNonRoot: true")


# Each way a pod can reach into its node, as (where in the GPU pod, what to set, what the
# message must say: the manifest path, the value and why it matters).
GPU_POD = "spec.rayClusterSpec.workerGroupSpecs[1].template.spec"
NODE_ACCESS = [
    (("hostNetwork",), True, f"{GPU_POD}.hostNetwork: true shares the node's network namespace"),
    (("hostPID",), True, f"{GPU_POD}.hostPID: true shares the node's pid namespace"),
    (("hostIPC",), True, f"{GPU_POD}.hostIPC: true shares the node's ipc namespace"),
    (("volumes", "+"), {"name": "docker", "hostPath": {"path": "/var/run/docker.sock"}},
     (f"{GPU_POD}.volumes[3] (docker): hostPath '/var/run/docker.sock' mounts a folder of the "
     "node")),
    (("containers", 0, "securityContext", "privileged"), True,
     (f"{GPU_POD}.containers[0].securityContext.privileged: true gives the container the node's "
     "devices")),
    (("containers", 0, "securityContext", "allowPrivilegeEscalation"), True,
     (f"{GPU_POD}.containers[0].securityContext.allowPrivilegeEscalation: true lets a process "
     "gain more privileges")),
    (("containers", 0, "securityContext", "capabilities", "add"), ["SYS_ADMIN"],
     (f"{GPU_POD}.containers[0].securityContext.capabilities.add: ['SYS_ADMIN'] grants Linux "
     "capabilities")),
]


@pytest.mark.parametrize(("path", "value", "message"), NODE_ACCESS,
                         ids=[".".join(map(str, p)) for p, _, _ in NODE_ACCESS])
def test_pod_that_reaches_into_its_node_is_reported_with_path_value_and_fix(
        rayjob, path, value, message):
    node = gpu_group(rayjob)["template"]["spec"]
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    if path[-1] == "+":
        node.append(value)
    else:
        node[path[-1]] = value
    found = [p for p in validate_manifest(rayjob) if message in p]
    assert len(found) == 1, validate_manifest(rayjob)


def test_privileged_autoscaler_sidecar_is_reported(raycluster):
    raycluster["spec"]["autoscalerOptions"]["securityContext"]["privileged"] = True
    assert_reported(raycluster, "spec.autoscalerOptions.securityContext.privileged: true")


def test_node_access_rules_do_not_fire_on_what_the_chart_renders(rayjob, raycluster):
    problems = validate_manifest(rayjob) + validate_manifest(raycluster)
    assert not [p for p in problems if "node" in p or "privilege" in p or "capabilit" in p]


def test_literal_token_in_env_is_reported(rayjob):
    ray_container(head(rayjob))["env"].append({"name": "WANDB_API_KEY", "value": "abc123"})
    assert_reported(rayjob, "env WANDB_API_KEY holds a literal value")


def test_token_path_in_env_is_not_a_secret(rayjob):
    ray_container(head(rayjob))["env"].append({"name": "HF_TOKEN_PATH", "value": "/var/hf"})
    assert validate_manifest(rayjob) == []


def test_secret_in_runtime_env_vars_is_reported(rayjob):
    rayjob["spec"]["runtimeEnvYAML"] = yaml.safe_dump({"env_vars": {"HF_TOKEN": "hf_x"}})
    assert_reported(rayjob, "env_vars.HF_TOKEN would put a secret into the job's runtime env")


def test_literal_redis_password_is_reported(raycluster):
    raycluster["spec"]["gcsFaultToleranceOptions"] = {
        "redisAddress": "redis:6379",
        "redisPassword": {"value": "hunter2"},
    }
    assert_reported(raycluster, "redisPassword.value is a literal secret")


def test_head_service_exposed_outside_the_cluster_is_reported(raycluster):
    raycluster["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"
    assert_reported(raycluster, "serviceType LoadBalancer exposes the dashboard")


def test_cluster_without_token_auth_is_reported(raycluster):
    del raycluster["spec"]["authOptions"]
    assert_reported(raycluster, "authOptions: set mode: token")


def test_pvc_mounted_on_some_pods_only_is_reported(rayjob):
    mounts = ray_container(gpu_group(rayjob))["volumeMounts"]
    mounts[:] = [m for m in mounts if m["name"] != "shared"]
    assert_reported(rayjob, "(gpu-ondemand): does not mount PVC 'ray-shared' at /mnt/shared")


def test_gpu_worker_without_prestop_hook_is_reported(rayjob):
    del ray_container(gpu_group(rayjob))["lifecycle"]
    assert_reported(rayjob, "the Ray container has no lifecycle.preStop hook")


def test_gpu_worker_with_default_grace_period_is_reported(rayjob):
    del gpu_group(rayjob)["template"]["spec"]["terminationGracePeriodSeconds"]
    assert_reported(rayjob, "terminationGracePeriodSeconds 30 is too short")


def test_rayjob_without_active_deadline_is_reported(rayjob):
    del rayjob["spec"]["activeDeadlineSeconds"]
    assert_reported(rayjob, "spec.activeDeadlineSeconds is not set")


def test_committed_secret_with_data_is_reported():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "t"}, "data": {"a": "b"}}
    assert_reported(secret, "a Secret with data belongs in the cluster")


def test_kuberay_only_mode_skips_project_rules(rayjob):
    del rayjob["spec"]["activeDeadlineSeconds"]
    gpu_group(rayjob)["template"]["spec"]["hostNetwork"] = True
    assert validate_manifest(rayjob, project_rules=False) == []


@pytest.mark.parametrize(
    "path",
    [
        ("spec", "rayClusterSpec", "headGroupSpec", "template"),
        ("spec", "rayClusterSpec", "workerGroupSpecs"),
        ("spec", "rayClusterSpec", "headGroupSpec", "rayStartParams"),
        ("spec", "rayClusterSpec", "autoscalerOptions"),
    ],
)
def test_malformed_sections_give_messages_not_crashes(rayjob, path):
    node = rayjob
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = ["not", "a", "mapping"]
    found = validate_manifest(rayjob)
    assert found and all(p.startswith("RayJob llama-lora: ") for p in found)
