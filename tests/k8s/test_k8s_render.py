"""render_rayjob / render_manifests: sizing, placement, storage, and always-valid output."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_app.errors import UserError
from ray_app.k8s.render import (
    CONFIG_MOUNT,
    PLACEMENT,
    PRESTOP_SCRIPT,
    job_name,
    plan_pods,
    render_manifests,
    render_rayjob,
)
from ray_app.k8s.validate import validate_manifest

REPO = Path(__file__).resolve().parents[2]
GPU_CONFIG = {
    "run": {"name": "llama-lora", "storage_path": "/mnt/shared/checkpoints"},
    "model": {"name_or_path": "meta-llama/Llama-3.2-1B-Instruct"},
    "scaling": {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}},
}
CPU_CONFIG = {"run": {"name": "cpu-smoke"}, "scaling": {"num_workers": 3, "use_gpu": False}}


def groups(job: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def gpus_of(group: dict) -> int:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


@pytest.mark.parametrize(
    ("workers", "gpus_per_worker", "node_gpus", "expected"),
    [
        (8, 1, 8, (1, 8)),
        (12, 1, 8, (2, 6)),
        (3, 1, 8, (1, 3)),
        (16, 2, 8, (4, 4)),
        (5, 1, 4, (2, 3)),
    ],
)
def test_plan_pods_spreads_workers_evenly_over_nodes(workers, gpus_per_worker, node_gpus, expected):
    assert plan_pods(workers, gpus_per_worker, node_gpus) == expected


def test_worker_needing_more_gpus_than_a_node_is_refused():
    with pytest.raises(UserError, match="a worker needs 16 GPUs"):
        plan_pods(2, 16, 8)


@pytest.mark.parametrize(
    ("cfg", "kwargs"),
    [
        (GPU_CONFIG, {"gpu_type": "H100"}),
        (GPU_CONFIG, {"gpu_type": "H100", "spot": True, "cloud": "gke"}),
        (GPU_CONFIG, {"gpu_type": "L4", "spot": True, "cloud": "eks"}),
        (GPU_CONFIG, {"gpus_per_node": 4, "cloud": "karpenter", "submission_mode": "SidecarMode"}),
        (GPU_CONFIG, {"submission_mode": "K8sJobMode", "namespace": "ml"}),
        (CPU_CONFIG, {}),
        ({"run": {"name": "uri", "storage_path": "s3://bucket/runs"}}, {}),
    ],
)
def test_rendered_manifests_pass_validation(cfg, kwargs):
    manifests = render_manifests(cfg, image="registry.example/ray-app:0.1.0", **kwargs)
    assert [m["kind"] for m in manifests] == ["ConfigMap", "RayJob"]
    for manifest in manifests:
        assert validate_manifest(manifest) == []


def test_gpu_pods_hold_exactly_the_requested_workers():
    cfg = copy.deepcopy(GPU_CONFIG)
    cfg["scaling"]["num_workers"] = 12
    job = render_rayjob(cfg, image="img", gpu_type="H100")
    group = groups(job)["gpu-ondemand"]
    assert (group["maxReplicas"], gpus_of(group)) == (2, 6)


def test_spot_group_is_preferred_over_on_demand_fallback():
    job = render_rayjob(GPU_CONFIG, image="img", spot=True, cloud="karpenter")
    spot, on_demand = groups(job)["gpu-spot"], groups(job)["gpu-ondemand"]
    assert spot["priority"] > on_demand["priority"]
    assert spot["template"]["spec"]["nodeSelector"] == {"karpenter.sh/capacity-type": "spot"}
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}


def test_driver_runs_on_the_driver_group_with_the_mounted_config():
    manifests = render_manifests(GPU_CONFIG, image="img")
    config_map, job = manifests
    assert job["spec"]["entrypoint"] == (
        f"python -m ray_app train {CONFIG_MOUNT}/config.yaml --address auto"
    )
    assert yaml.safe_load(job["spec"]["entrypointResources"]) == {"driver": 1}
    driver = groups(job)["driver"]
    assert driver["resources"] == {"driver": "1"}
    volumes = driver["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes


def test_local_storage_path_is_refused_with_the_fix():
    cfg = {"run": {"name": "x", "storage_path": "outputs/checkpoints"}}
    with pytest.raises(UserError, match="must be under the shared volume /mnt/shared"):
        render_rayjob(cfg, image="img")


def test_missing_storage_paths_default_to_the_shared_volume():
    config_map = render_manifests({"run": {"name": "demo"}}, image="img")[0]
    run = yaml.safe_load(config_map["data"]["config.yaml"])["run"]
    assert run["storage_path"] == "/mnt/shared/checkpoints"
    assert run["output_dir"] == "/mnt/shared/outputs/demo"


@pytest.mark.parametrize(
    ("run_name", "expected"),
    [
        ("Llama_3.2-LoRA", "llama-3-2-lora"),
        ("7b-run", "b-run"),
        ("x" * 60, "x" * 47),
        ("__", "ray-app-run"),
    ],
)
def test_run_name_becomes_a_valid_rayjob_name(run_name, expected):
    assert job_name(run_name) == expected


def test_unknown_gpu_type_needs_gpus_per_node():
    with pytest.raises(UserError, match="GPU type 'T4' is not in the table"):
        render_rayjob(GPU_CONFIG, image="img", gpu_type="T4")
    job = render_rayjob(GPU_CONFIG, image="img", gpu_type="T4", gpus_per_node=4)
    group = groups(job)["gpu-ondemand"]
    assert (group["maxReplicas"], gpus_of(group)) == (2, 4)
    assert group["labels"]["ray.io/accelerator-type"] == "T4"


def test_unknown_cloud_and_mode_are_refused():
    with pytest.raises(UserError, match="cloud 'azure' is unknown"):
        render_rayjob(GPU_CONFIG, image="img", cloud="azure")
    with pytest.raises(UserError, match="InteractiveMode' is not supported"):
        render_rayjob(GPU_CONFIG, image="img", submission_mode="InteractiveMode")


@pytest.mark.parametrize("cloud", sorted(PLACEMENT))
def test_cloud_placement_matches_the_chart_overlay(cloud):
    overlay = yaml.safe_load((REPO / "cluster" / f"values-{cloud}.yaml").read_text())
    chart_groups = overlay["workerGroups"]
    for market, role in (("spot", "gpuSpot"), ("on-demand", "gpuOnDemand")):
        placement = PLACEMENT[cloud][market]
        chart = chart_groups[role]
        for key, wanted in placement.get("nodeSelector", {}).items():
            assert chart["nodeSelector"][key] == wanted
        if "affinity" in placement:
            assert chart["affinity"] == placement["affinity"]
        for toleration in placement.get("tolerations", []):
            assert toleration in chart["tolerations"]


def test_prestop_hook_is_the_one_in_the_chart_and_the_rayjob_manifests():
    files = [
        REPO / "cluster" / "raycluster.yaml",
        *sorted((REPO / "jobs" / "rayjobs").glob("*.yaml")),
    ]
    scripts = set()
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec") or {}
            cluster = spec.get("rayClusterSpec", spec)
            for group in cluster.get("workerGroupSpecs") or []:
                container = group["template"]["spec"]["containers"][0]
                hook = container.get("lifecycle", {}).get("preStop")
                if hook:
                    scripts.add(hook["exec"]["command"][2])
    assert scripts == {PRESTOP_SCRIPT}


def test_prestop_hook_drains_the_node_and_returns_once_no_ray_work_is_left(tmp_path):
    log = tmp_path / "ray.log"
    (tmp_path / "ray").write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    (tmp_path / "ps").write_text("#!/bin/sh\necho 'ray::IDLE'\necho '/usr/bin/raylet'\n")
    for tool in ("ray", "ps"):
        (tmp_path / tool).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "RAY_ADDRESS": "head-svc:6379",
        "HOSTNAME": "gpu-spot-abc",
    }
    result = subprocess.run(
        ["/bin/bash", "-c", PRESTOP_SCRIPT],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert log.read_text().split() == [
        "drain-node", "--address", "head-svc:6379",
        "--reason", "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message", "pod", "gpu-spot-abc", "is", "terminating",
        "--deadline-remaining-seconds", "90",
    ]  # fmt: skip
