"""The chart, the manifests rendered from it, the dashboard, entrypoints and image agree and
validate: KubeRay CRDs for ray.io kinds, the Kubernetes schemas for the built-in kinds."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_app.k8s import schemas
from ray_app.k8s.validate import validate_manifest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "cluster" / "chart"
MANIFESTS = [
    REPO / "cluster" / "raycluster.yaml",
    *sorted((REPO / "jobs" / "rayjobs").glob("*.yaml")),
]
OVERLAYS = ["values-gke.yaml", "values-eks.yaml", "values-karpenter.yaml"]
METRICS = ["train_loss", "eval_loss", "tokens_per_s", "mfu", "gpu_mem_gib", "restarts"]
RAY_VERSION = yaml.safe_load((CHART / "values.yaml").read_text())["rayVersion"]
RAYJOB = ["--set", "kind=RayJob", "--set", "job.configPath=/mnt/shared/configs/c.yaml"]
# Value sets the chart must render into valid manifests.
VALUE_SETS = {
    **{o.split("-")[1][:-5]: ["-f", str(REPO / "cluster" / o)] for o in OVERLAYS},
    "gcs-ft": ["--set", "gcsFaultTolerance.enabled=true"],
    "no-autoscaler": ["--set", "autoscaler.enabled=false", "--set", "monitoring.podMonitor=true"],
    "autoscaler-v1": ["--set", "autoscaler.version=v1"],
    "no-spot": ["--set", "workerGroups.gpuSpot.enabled=false",
                "--set", "workerGroups.driver.enabled=false"],
    "no-network-policy": ["--set", "networkPolicy.enabled=false"],
    "rayjob": RAYJOB,
    "rayjob-k8sjob-config": ["--set", "kind=RayJob", "--set", "job.submissionMode=K8sJobMode",
                             "--set-string", "job.config=run: {name: x}"],
    "rayjob-existing-cluster": [*RAYJOB, "--set", "job.cluster=ray-finetune"],
}
RAY_POD_ENV = {"RAY_APP_STORAGE", "RAY_TRAIN_ENABLE_STATE_TRACKING"}


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_clusters(docs: list[dict]) -> list[dict]:
    return [d["spec"]["rayClusterSpec"] if d["kind"] == "RayJob" else d["spec"]
            for d in docs if d["kind"] in ("RayCluster", "RayJob") and
            (d["kind"] == "RayCluster" or "rayClusterSpec" in d["spec"])]


def pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def the(kind: str, docs: list[dict]) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def builtin(doc: dict) -> bool:
    """A kind of Kubernetes itself (core, policy, networking.k8s.io, ...), not a CRD's."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def assert_kubernetes_schema(doc: dict) -> None:
    """A built-in kind against the Kubernetes 1.32 OpenAPI schema, unknown fields refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, "1.32", strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_manifest_validates(path):
    docs = load_all(path)
    assert docs
    for doc in docs:
        assert validate_manifest(doc) == []
        if builtin(doc):
            assert_kubernetes_schema(doc)


def test_ray_and_kuberay_versions_agree_everywhere():
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in (REPO / "Dockerfile").read_text()
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == RAY_VERSION
    for path in MANIFESTS:
        for cluster in ray_clusters(load_all(path)):
            assert cluster["rayVersion"] == RAY_VERSION, path
    operator = yaml.safe_load((REPO / "cluster" / "operator-values.yaml").read_text())
    assert operator["image"]["tag"] == f"v{schemas.KUBERAY_VERSION}"


def test_image_runs_as_the_non_root_user_the_pods_expect():
    dockerfile = (REPO / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert f"USER {values['runAsUser']}:{values['runAsGroup']}" in dockerfile
    assert '".[gpu,tracking,eval,plot]"' in dockerfile


@pytest.mark.parametrize("name", ["operator-values.yaml", *OVERLAYS])
def test_values_files_are_yaml_mappings(name):
    assert isinstance(yaml.safe_load((REPO / "cluster" / name).read_text()), dict)


def test_grafana_dashboard_charts_every_ray_app_metric():
    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in METRICS:
        # Ray prefixes application metrics with "ray_" in Prometheus.
        assert f"ray_ray_app_{metric}" in exprs, metric


@pytest.mark.parametrize("command", ["train", "tune", "data"])
def test_entrypoint_execs_ray_app_with_address_auto(command, tmp_path):
    fake_python = tmp_path / "python"
    fake_python.write_text('#!/bin/sh\necho "$@"\n')
    fake_python.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    script = REPO / "jobs" / "entrypoints" / f"{command}.sh"
    result = subprocess.run(
        ["bash", str(script), "jobs/configs/x.yaml", "--set", "train.lr=1e-4"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert result.stdout.split() == [
        "-m", "ray_app", command, "--address", "auto", "jobs/configs/x.yaml",
        "--set", "train.lr=1e-4",
    ]  # fmt: skip


def test_entrypoint_without_config_prints_usage():
    script = REPO / "jobs" / "entrypoints" / "train.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage: bash jobs/entrypoints/train.sh CONFIG" in result.stderr


# --------------------------------------------------------------------------- helm


def test_plain_example_is_the_chart_rendered_with_defaults(helm):
    assert helm.template() == load_all(REPO / "cluster" / "raycluster.yaml")


@pytest.mark.parametrize("args", [*VALUE_SETS.values(), []], ids=[*VALUE_SETS, "defaults"])
def test_helm_lint_passes(helm, args):
    result = helm.run("lint", "--strict", str(CHART), *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("args", VALUE_SETS.values(), ids=VALUE_SETS)
def test_helm_template_output_validates(helm, args):
    docs = helm.template(*args)
    assert {"RayCluster", "RayJob"} & {d["kind"] for d in docs}
    for doc in docs:
        assert validate_manifest(doc) == []
        if builtin(doc):
            assert_kubernetes_schema(doc)


def test_rayjob_without_a_config_is_refused_by_the_chart(helm):
    result = helm.run("template", "x", str(CHART), "--set", "kind=RayJob")
    assert result.returncode != 0 and "set job.config or job.configPath" in result.stderr


def test_chart_can_install_only_the_shared_volume(helm):
    docs = helm.template("--set", "rayCluster.enabled=false")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("PersistentVolumeClaim", "ray-shared")
    ]


def test_rayjob_shares_the_cluster_spec_and_leaves_the_volume_alone(helm):
    cluster = the("RayCluster", helm.template())["spec"]
    job = the("RayJob", helm.template(*RAYJOB))
    assert job["spec"]["rayClusterSpec"] == cluster
    assert "PersistentVolumeClaim" not in {d["kind"] for d in helm.template(*RAYJOB)}


def test_spot_overlay_puts_gpu_spot_workers_on_spot_nodes_and_head_elsewhere(helm):
    docs = helm.template("-f", str(REPO / "cluster" / "values-eks.yaml"))
    cluster = the("RayCluster", docs)["spec"]
    spot = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-spot")
    assert spot["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"eks.amazonaws.com/capacityType": "ON_DEMAND"}


# --------------------------------------------------------------------------- hardening


def network_policy(helm, *args: str, release: str = "ray-finetune") -> dict:
    policy = the("NetworkPolicy", helm.template(*args, release=release))
    assert_kubernetes_schema(policy)
    return policy


def rule_for(policy: dict, port: int | None) -> dict:
    """The ingress rule that names `port`, or (None) the one without ports: every port."""
    (rule,) = [r for r in policy["spec"]["ingress"]
               if (port is None and "ports" not in r)
               or port in [p["port"] for p in r.get("ports", [])]]
    return rule


RELEASE_PODS = {"matchLabels": {"app.kubernetes.io/name": "ray-finetune",
                                "app.kubernetes.io/instance": "ray-finetune"}}
OPERATOR = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}


def test_network_policy_admits_ray_ports_only_from_the_release_pods(helm):
    policy = network_policy(helm)
    assert policy["spec"]["podSelector"] == RELEASE_PODS
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    # Every port (6379 included) from the release's own pods, and nothing else without ports.
    assert rule_for(policy, None) == {"from": [{"podSelector": RELEASE_PODS}]}
    reachable = {p["port"] for r in policy["spec"]["ingress"] for p in r.get("ports", [])}
    assert reachable == {8265, 10001}


def test_network_policy_admits_the_dashboard_and_client_from_the_listed_peers(helm, tmp_path):
    notebooks = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml"}},
                 "podSelector": {"matchLabels": {"app": "jupyter"}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "mon"}}}
    values = tmp_path / "np.yaml"
    values.write_text(yaml.safe_dump({"networkPolicy": {
        "dashboardFrom": [notebooks], "metricsFrom": [prometheus]}}))
    policy = network_policy(helm, "-f", str(values))
    dashboard = rule_for(policy, 8265)
    assert [p["port"] for p in dashboard["ports"]] == [8265, 10001]
    assert dashboard["from"] == [OPERATOR, notebooks]
    assert rule_for(policy, 8080)["from"] == [prometheus]
    assert rule_for(policy, None) == {"from": [{"podSelector": RELEASE_PODS}]}


def test_network_policy_never_renders_a_rule_that_admits_everyone(helm):
    policy = network_policy(helm, "--set", "networkPolicy.operatorNamespace=")
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": RELEASE_PODS}]}]


def test_network_policy_of_a_k8sjob_mode_rayjob_admits_its_submitter(helm):
    policy = network_policy(helm, *RAYJOB, "--set", "job.submissionMode=K8sJobMode",
                            release="llama-lora")
    assert {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": "llama-lora"}}} in \
        rule_for(policy, 8265)["from"]


def test_network_policy_can_be_turned_off(helm):
    assert "NetworkPolicy" not in {d["kind"] for d in helm.template(*VALUE_SETS[
        "no-network-policy"])}


@pytest.mark.parametrize("args", [[], RAYJOB], ids=["raycluster", "rayjob"])
def test_ray_pods_mount_no_service_account_token_but_the_autoscaler_gets_one(helm, args):
    (cluster,) = ray_clusters(helm.template(*args))
    for pod in pod_specs(cluster):
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            assert "/var/run/secrets/kubernetes.io/serviceaccount" not in {
                m["mountPath"] for m in container.get("volumeMounts", [])}
    token = {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
             "readOnly": True}
    assert cluster["autoscalerOptions"]["volumeMounts"] == [token]
    volumes = {v["name"]: v for v in pod_specs(cluster)[0]["volumes"]}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert [next(iter(s)) for s in sources] == ["serviceAccountToken", "configMap", "downwardAPI"]


def test_without_autoscaler_no_pod_gets_a_token(helm):
    (cluster,) = ray_clusters(helm.template(*VALUE_SETS["no-autoscaler"]))
    assert "autoscalerOptions" not in cluster
    assert all("kube-api-access" not in {v["name"] for v in pod["volumes"]}
               for pod in pod_specs(cluster))


@pytest.mark.parametrize(("args", "storage"), [
    ([], "/mnt/shared"), (["--set", "storage.uri=s3://bucket/ray-app"], "s3://bucket/ray-app")])
def test_every_ray_container_knows_the_shared_storage_and_tracks_train_state(helm, args, storage):
    (cluster,) = ray_clusters(helm.template(*args))
    for pod in pod_specs(cluster):
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert {k: env.get(k) for k in RAY_POD_ENV} == {
            "RAY_APP_STORAGE": storage, "RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}
