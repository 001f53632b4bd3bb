"""The shipped manifests, chart, dashboard, entrypoints and image agree and validate."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_app.k8s import schemas
from ray_app.k8s.render import RAY_VERSION
from ray_app.k8s.validate import validate_manifest

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "cluster" / "chart"
MANIFESTS = [
    REPO / "cluster" / "raycluster.yaml",
    *sorted((REPO / "jobs" / "rayjobs").glob("*.yaml")),
]
OVERLAYS = ["values-gke.yaml", "values-eks.yaml", "values-karpenter.yaml"]
METRICS = ["train_loss", "eval_loss", "tokens_per_s", "mfu", "gpu_mem_gib", "restarts"]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_manifest_validates(path):
    docs = load_all(path)
    assert docs
    for doc in docs:
        assert validate_manifest(doc) == []


def test_rayjob_manifests_cover_http_and_sidecar_submission():
    modes = {
        d["spec"].get("submissionMode")
        for p in MANIFESTS
        for d in load_all(p)
        if d["kind"] == "RayJob"
    }
    assert {"HTTPMode", "SidecarMode"} <= modes


def test_rayjob_entrypoints_run_ray_app_on_the_shared_config():
    for path in sorted((REPO / "jobs" / "rayjobs").glob("*.yaml")):
        (job,) = load_all(path)
        assert re.fullmatch(
            r"python -m ray_app (train|tune|data) /mnt/shared/configs/[\w.-]+\.yaml --address auto",
            job["spec"]["entrypoint"],
        ), path


def test_ray_and_kuberay_versions_agree_everywhere():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["rayVersion"] == RAY_VERSION
    assert f"rayproject/ray:{RAY_VERSION}-py311-gpu" in (REPO / "Dockerfile").read_text()
    for path in MANIFESTS:
        for doc in load_all(path):
            spec = doc.get("spec", {})
            cluster = spec.get("rayClusterSpec", spec if doc["kind"] == "RayCluster" else None)
            if cluster:
                assert cluster["rayVersion"] == RAY_VERSION, path
    operator = yaml.safe_load((REPO / "cluster" / "operator-values.yaml").read_text())
    assert operator["image"]["tag"] == f"v{schemas.KUBERAY_VERSION}"


def test_image_runs_as_the_non_root_user_the_pods_expect():
    dockerfile = (REPO / "Dockerfile").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]
    assert f"USER {values['runAsUser']}:{values['runAsGroup']}" in dockerfile
    assert '".[gpu,tracking]"' in dockerfile


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
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [
        "-m",
        "ray_app",
        command,
        "--address",
        "auto",
        "jobs/configs/x.yaml",
        "--set",
        "train.lr=1e-4",
    ]


def test_entrypoint_without_config_prints_usage():
    script = REPO / "jobs" / "entrypoints" / "train.sh"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage: bash jobs/entrypoints/train.sh CONFIG" in result.stderr


# --------------------------------------------------------------------------- helm


def test_plain_example_is_the_chart_rendered_with_defaults(helm):
    assert helm.template(CHART) == load_all(REPO / "cluster" / "raycluster.yaml")


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
def test_helm_lint_passes(helm, overlay):
    args = ["-f", str(REPO / "cluster" / overlay)] if overlay else []
    result = helm.run("lint", "--strict", str(CHART), *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "args",
    [
        *(["-f", str(REPO / "cluster" / o)] for o in OVERLAYS),
        ["--set", "gcsFaultTolerance.enabled=true"],
        ["--set", "autoscaler.enabled=false", "--set", "monitoring.podMonitor=true"],
        [
            "--set",
            "workerGroups.gpuSpot.enabled=false",
            "--set",
            "workerGroups.driver.enabled=false",
        ],
    ],
    ids=["gke", "eks", "karpenter", "gcs-ft", "no-autoscaler", "no-spot"],
)
def test_helm_template_output_validates(helm, args):
    docs = helm.template(CHART, *args)
    assert "RayCluster" in {d["kind"] for d in docs}
    for doc in docs:
        assert validate_manifest(doc) == []


def test_chart_can_install_only_the_shared_volume(helm):
    docs = helm.template(CHART, "--set", "rayCluster.enabled=false")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("PersistentVolumeClaim", "ray-shared")
    ]


def test_spot_overlay_puts_gpu_spot_workers_on_spot_nodes_and_head_elsewhere(helm):
    docs = helm.template(CHART, "-f", str(REPO / "cluster" / "values-eks.yaml"))
    cluster = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    spot = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-spot")
    assert spot["template"]["spec"]["nodeSelector"]["eks.amazonaws.com/capacityType"] == "SPOT"
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"eks.amazonaws.com/capacityType": "ON_DEMAND"}
