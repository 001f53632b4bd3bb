"""Secrets come from the environment (Kubernetes Secrets) and are never written anywhere:
not in outputs, checkpoints, tracker files, rendered manifests or console output."""

from __future__ import annotations

import json

import pytest
import yaml
from support import secret_leaks, secret_sentinels, tiny_config

from ray_app.cli import main
from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.k8s.render import render_manifests
from ray_app.secrets import redact
from ray_app.summary import write_summary
from ray_app.train.identity import identity
from ray_app.train.tracking import flat_params

# Unique values that must never show up in a file or on the console. (A whole run with
# them in its environment is in test_tracking.py, whose tracked run it shares.)
SENTINELS = secret_sentinels()
STORAGE_KEY, STORAGE_SECRET = "AKIASENTINELSTORAGE7", "StorageSecretSentinel%2Fabc"


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
    assert secret_leaks(tmp_path) == []
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
