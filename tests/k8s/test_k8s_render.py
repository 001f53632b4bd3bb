"""Rendering a config as a RayJob: storage placement, sizing, the chart's output, and the
checked-in jobs/rayjobs/*.yaml being exactly what their header command renders."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_app.cli import main
from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.k8s.helm import CHART, chart_values
from ray_app.k8s.render import render_manifests
from ray_app.k8s.storage import place
from ray_app.k8s.validate import validate_manifest
from ray_app.k8s.values import job_name, job_values, plan_pods

REPO = Path(__file__).resolve().parents[2]
DATA = {"train": ["/mnt/shared/datasets/x/*.jsonl"]}
GPU = {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}}
RAYJOBS = sorted((REPO / "jobs" / "rayjobs").glob("*.yaml"))


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def config(**sections) -> dict:
    return {"data": DATA, "run": {"name": "demo"}, **sections}


def groups(job: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def the(kind: str, docs: list[dict]) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def gpus_of(group: dict) -> int:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


# --------------------------------------------------------------------------- storage placement


@pytest.mark.parametrize(
    ("run", "uri", "expected"),
    [
        ({}, "", ("/mnt/shared/outputs/checkpoints", "/mnt/shared/outputs/demo")),
        ({"storage_path": "ckpt", "output_dir": "out/x"}, "",
         ("/mnt/shared/ckpt", "/mnt/shared/out/x")),
        ({}, "s3://bucket/ray-app",
         ("s3://bucket/ray-app/outputs/checkpoints", "/mnt/shared/outputs/demo")),
        ({"storage_path": "gs://b/runs", "output_dir": "/mnt/shared/o"}, "",
         ("gs://b/runs", "/mnt/shared/o")),
    ],
    ids=["defaults", "relative", "relative-on-uri", "absolute-and-uri-kept"],
)
def test_relative_storage_paths_are_placed_on_the_shared_storage(run, uri, expected):
    cfg = validate_config(config(run={"name": "demo", **run}))
    placed = place(cfg, mount="/mnt/shared", uri=uri)
    assert (placed.storage_path, placed.output_dir) == expected


@pytest.mark.parametrize(
    ("run", "message"),
    [
        ({"storage_path": "/tmp/ckpt"}, ("run.storage_path is '/tmp/ckpt', which is not on the "
         "shared volume /mnt/shared")),
        ({"output_dir": "../escape"}, "run.output_dir is '../escape', which is not on the shared"),
        ({"output_dir": "s3://bucket/out"}, ("run.output_dir is 's3://bucket/out', but the "
         "adapter and run_summary.json are written as files")),
    ],
)
def test_storage_off_the_shared_volume_is_refused_with_what_to_set(run, message):
    cfg = validate_config(config(run={"name": "demo", **run}))
    with pytest.raises(UserError, match="set it under|set run.output_dir under") as info:
        place(cfg, mount="/mnt/shared")
    assert message in str(info.value)


# --------------------------------------------------------------------------- sizing


@pytest.mark.parametrize(
    ("workers", "gpus_per_worker", "node_gpus", "expected"),
    [(8, 1, 8, (1, 8)), (12, 1, 8, (2, 6)), (3, 1, 8, (1, 3)), (16, 2, 8, (4, 4)), (5, 1, 4, (2, 3))],
)
def test_plan_pods_spreads_workers_evenly_over_nodes(workers, gpus_per_worker, node_gpus, expected):
    assert plan_pods(workers, gpus_per_worker, node_gpus) == expected


def test_worker_needing_more_gpus_than_a_node_is_refused():
    with pytest.raises(UserError, match="a worker needs 16 GPUs"):
        plan_pods(2, 16, 8)


@pytest.mark.parametrize(
    ("run_name", "command", "expected"),
    [("Llama_3.2-LoRA", "train", "llama-3-2-lora"), ("7b-run", "train", "b-run"),
     ("x" * 60, "train", "x" * 47), ("x" * 60, "tune", "x" * 42 + "-tune"),
     ("llama-lora", "data", "llama-lora-data")],
)
def test_run_name_becomes_a_valid_rayjob_name(run_name, command, expected):
    assert job_name(run_name, command) == expected


def values_for(cfg: dict, **options) -> dict:
    values, _ = job_values(validate_config(cfg), chart=chart_values(CHART, []), **options)
    return values


def test_twelve_gpu_workers_run_as_two_pods_of_six_gpus_spot_first():
    values = values_for(config(scaling={**GPU, "num_workers": 12}), gpu_type="H100", spot=True)
    groups = values["workerGroups"]
    for role in ("gpuSpot", "gpuOnDemand"):
        assert (groups[role]["maxReplicas"], groups[role]["gpus"]) == (2, 6)
    assert groups["gpuSpot"]["rayLabels"] == {"ray.io/accelerator-type": "H100"}


def test_tune_sizes_the_gpu_groups_for_the_trials_at_once_and_the_driver_for_their_drivers():
    cfg = config(scaling=GPU, tune={"space": {"train.lr": {"choice": [1e-4, 2e-4]}},
                                    "max_concurrent_trials": 3, "workers_per_trial": 4,
                                    "driver_resources": {"driver": 0.5}})
    groups = values_for(cfg, command="tune")["workerGroups"]
    assert (groups["gpuOnDemand"]["maxReplicas"], groups["gpuOnDemand"]["gpus"]) == (3, 4)
    assert groups["gpuSpot"] == {"enabled": False}
    assert groups["driver"]["rayResources"] == {"driver": "3"}  # 1 + ceil(3 x 0.5)


def test_cpu_config_gets_a_cpu_group_and_no_gpus():
    groups = values_for(config(scaling={"num_workers": 3}))["workerGroups"]
    assert groups["cpu"]["enabled"] and groups["cpu"]["maxReplicas"] == 3
    assert not groups["gpuOnDemand"]["enabled"] and not groups["gpuSpot"]["enabled"]


def test_unknown_gpu_type_needs_gpus_per_node():
    with pytest.raises(UserError, match="GPU type 'T4' is not in the table"):
        values_for(config(scaling=GPU), gpu_type="T4")
    group = values_for(config(scaling=GPU), gpu_type="T4", gpus_per_node=4)["workerGroups"]
    assert (group["gpuOnDemand"]["maxReplicas"], group["gpuOnDemand"]["gpus"]) == (2, 4)


def test_image_without_a_tag_is_refused():
    with pytest.raises(UserError, match="needs a tag"):
        values_for(config(), image="registry.example/ray-app")


# --------------------------------------------------------------------------- the chart's output


@pytest.mark.parametrize(
    "options",
    [
        {"spot": True, "gpu_type": "H100", "image": "registry.example:5000/ray-app:1.2"},
        {"submission_mode": "SidecarMode"},
        {"submission_mode": "K8sJobMode", "value_files": [REPO / "cluster" / "values-eks.yaml"]},
        {"command": "data", "cluster": "ray-finetune"},
    ],
    ids=["spot", "sidecar", "k8sjob-eks", "existing-cluster"],
)
def test_rendered_manifests_validate_and_never_carry_a_relative_storage_path(helm, options):
    cfg = config(scaling=GPU, run={"name": "demo", "storage_path": "ckpt"})
    docs = render_manifests(cfg, **options)
    assert {d["kind"] for d in docs} >= {"RayJob"}
    for doc in docs:
        assert validate_manifest(doc) == []
    job = the("RayJob", docs)
    if options.get("cluster"):
        assert "--set=run.storage_path=/mnt/shared/ckpt" in job["spec"]["entrypoint"]
    else:
        placed = yaml.safe_load(the("ConfigMap", docs)["data"]["config.yaml"])["run"]
        assert placed["storage_path"] == "/mnt/shared/ckpt"
        assert placed["output_dir"] == "/mnt/shared/outputs/demo"


def test_config_travels_in_a_configmap_mounted_where_the_entrypoint_reads_it(helm):
    docs = render_manifests(config(scaling=GPU, model={"name_or_path": "m/x"}))
    config_map, job = the("ConfigMap", docs), the("RayJob", docs)
    assert job["spec"]["entrypoint"] == (
        "python -m ray_app train /etc/ray-app/config.yaml --address auto")
    assert job["metadata"]["annotations"] == {"ray-app/model": "m/x"}
    assert yaml.safe_load(job["spec"]["entrypointResources"]) == {"driver": 1}
    driver = groups(job)["driver"]["template"]["spec"]
    assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in \
        driver["volumes"]
    assert validate_config(yaml.safe_load(config_map["data"]["config.yaml"])).run.name == "demo"


def test_trackers_get_their_secrets_as_optional_secret_refs(helm):
    job = the("RayJob", render_manifests(config(tracking={"backends": ["wandb"]})))
    env = groups(job)["driver"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "wandb-api-key", "key": "api_key", "optional": True}}} in env


def test_storage_uri_of_the_chart_becomes_the_checkpoint_location(helm, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("storage: {uri: 's3://bucket/ray-app'}\n")
    docs = render_manifests(config(), value_files=[values])
    placed = yaml.safe_load(the("ConfigMap", docs)["data"]["config.yaml"])["run"]
    assert placed["storage_path"] == "s3://bucket/ray-app/outputs/checkpoints"
    env = the("RayJob", docs)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"]
    assert {"name": "RAY_APP_STORAGE", "value": "s3://bucket/ray-app"} in env


# --------------------------------------------------------------------------- checked-in outputs


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_checked_in_rayjob_is_exactly_what_its_header_command_renders(helm, path, tmp_path,
                                                                      monkeypatch, capsys):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Generated by: ray-app k8s render "), first
    argv = shlex.split(first.removeprefix("# Generated by: "))[1:]
    # Run the command as written, from a folder that has the repository's configs.
    (tmp_path / "jobs" / "rayjobs").mkdir(parents=True)
    (tmp_path / "jobs" / "configs").symlink_to(REPO / "jobs" / "configs")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, capsys.readouterr().out
    regenerated = (tmp_path / "jobs" / "rayjobs" / path.name).read_text()
    assert regenerated == path.read_text(), (
        f"{path.relative_to(REPO)} is out of date; regenerate it with: {first[16:]}")


def test_checked_in_rayjobs_cover_train_tune_data_and_both_submission_modes():
    jobs = [the("RayJob", load_all(p)) for p in RAYJOBS]
    assert {j["spec"]["entrypoint"].split()[3] for j in jobs} == {"train", "tune", "data"}
    assert {"HTTPMode", "SidecarMode"} <= {j["spec"]["submissionMode"] for j in jobs}


def test_prestop_hook_drains_the_node_and_returns_once_no_ray_work_is_left(tmp_path):
    job = the("RayJob", load_all(RAYJOBS[1]))
    script = groups(job)["gpu-spot"]["template"]["spec"]["containers"][0]["lifecycle"][
        "preStop"]["exec"]["command"][2]
    log = tmp_path / "ray.log"
    (tmp_path / "ray").write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    (tmp_path / "ps").write_text("#!/bin/sh\necho 'ray::IDLE'\necho '/usr/bin/raylet'\n")
    for tool in ("ray", "ps"):
        (tmp_path / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}",
           "RAY_ADDRESS": "head-svc:6379", "HOSTNAME": "gpu-spot-abc"}
    result = subprocess.run(["/bin/bash", "-c", script], check=False, env=env,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert log.read_text().split() == [
        "drain-node", "--address", "head-svc:6379",
        "--reason", "DRAIN_NODE_REASON_PREEMPTION",
        "--reason-message", "pod", "gpu-spot-abc", "is", "terminating",
        "--deadline-remaining-seconds", "90",
    ]  # fmt: skip
