"""Secrets come from the environment (Kubernetes Secrets) and are never written anywhere:
not in outputs, checkpoints, tracker files, rendered manifests or console output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import tiny_config

from ray_app.cli import main
from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.k8s.render import render_manifests
from ray_app.secrets import SECRET_ENV, redact
from ray_app.summary import write_summary
from ray_app.train.identity import identity
from ray_app.train.tracking import flat_params

# Unique values that must never show up in a file or on the console.
SENTINELS = {name: f"sentinel{i:02d}{name.lower().replace('_', '')}{'0' * 40}"[:40]
             for i, name in enumerate(SECRET_ENV)}
STORAGE_KEY, STORAGE_SECRET = "AKIASENTINELSTORAGE7", "StorageSecretSentinel%2Fabc"


def _leaks(folder: Path) -> list[str]:
    """`file: NAME` for every sentinel found in any file under `folder`."""
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {name}" for name, value in SENTINELS.items() if value.encode() in data]
    return found


def test_a_run_writes_no_secret_into_outputs_checkpoints_trackers_or_console(
        small_data, tmp_path):
    cfg = tiny_config(small_data, tmp_path, run={"name": "secret-free"},
                      tracking={"backends": ["tensorboard", "mlflow", "wandb"]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    # The run starts its own Ray cluster, so the workers see these too.
    env.update(SENTINELS, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    done = subprocess.run([sys.executable, "-m", "ray_app", "train", str(config),
                           "--num-cpus", "2"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["checkpoints"]
    assert list((tmp_path / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "out" / "mlflow.db").exists()
    assert list((tmp_path / "wandb").rglob("run-*.wandb"))
    console = [name for name, value in SENTINELS.items()
               if value in done.stdout or value in done.stderr]
    assert console == []
    for folder in ("out", "storage", "wandb"):
        assert _leaks(tmp_path / folder) == []


def test_rendered_manifests_hold_no_secret_but_reference_the_kubernetes_secrets(
        small_data, tmp_path, monkeypatch, capsys):
    for name, value in SENTINELS.items():
        monkeypatch.setenv(name, value)
    cfg = tiny_config(small_data, tmp_path, tracking={"backends": ["mlflow", "wandb"]},
                      run={"storage_path": "s3://bucket/runs", "output_dir": "/mnt/shared/out"})
    config, manifests = tmp_path / "c.yaml", tmp_path / "manifests.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["k8s", "render", str(config), "-o", str(manifests)]) == 0
    out = capsys.readouterr()
    assert not [n for n, v in SENTINELS.items() if v in out.out + out.err]
    assert _leaks(tmp_path) == []
    job = next(d for d in yaml.safe_load_all(manifests.read_text()) if d["kind"] == "RayJob")
    assert job["spec"]["rayClusterSpec"]["authOptions"]["secretName"] == "ray-auth-token"
    assert "TOKEN" not in job["spec"]["runtimeEnvYAML"]
    driver = next(g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if g["groupName"] == "driver")
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in driver["template"]["spec"]["containers"][0]["env"] if "valueFrom" in e}
    assert refs == {"HF_TOKEN": "hf-token", "WANDB_API_KEY": "wandb-api-key",
                    "MLFLOW_TRACKING_USERNAME": "mlflow-credentials",
                    "MLFLOW_TRACKING_PASSWORD": "mlflow-credentials",
                    "MLFLOW_TRACKING_TOKEN": "mlflow-credentials"}


def test_credentials_in_a_storage_uri_are_masked_wherever_the_config_is_written(tmp_path):
    uri = f"s3://{STORAGE_KEY}:{STORAGE_SECRET}@bucket/runs"
    cfg = validate_config({"data": {"train": ["x.jsonl"]}, "run": {"storage_path": uri}})
    write_summary(tmp_path / "run_summary.json", {
        "config": cfg.model_dump(mode="json"), "storage": f"{cfg.storage_uri()}/quickstart",
        "error": f"OSError: When uploading to {cfg.storage_uri()}/quickstart: AccessDenied"})
    written = (tmp_path / "run_summary.json").read_text()
    shown = json.dumps([written, flat_params(cfg), identity(cfg)])
    assert STORAGE_KEY not in shown and "StorageSecretSentinel" not in shown
    assert json.loads(written)["config"]["run"]["storage_path"] == "s3://***@bucket/runs"
    # A config that leaves this machine must not carry them at all: refused, not masked
    # (a masked URI would not work on the cluster).
    with pytest.raises(UserError, match="run.storage_path hold credentials") as info:
        render_manifests(cfg.model_dump(mode="json"), image="ray-app:0.1.0")
    assert STORAGE_KEY not in str(info.value)


def test_redact_masks_secret_env_values_but_not_short_ones(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")  # too short to tell apart from words
    assert redact({"e": ["401 for token hf_abcdefghijklmnop"], "p": "/tmp/test/x"}) == {
        "e": ["401 for token ***"], "p": "/tmp/test/x"}
    assert redact("https://user:pw@host/x and gs://bucket/a@v1") == \
        "https://***@host/x and gs://bucket/a@v1"
