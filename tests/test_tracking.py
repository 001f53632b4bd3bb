"""Experiment tracking: one real run logs the same losses and steps to TensorBoard, MLflow
and W&B (offline) that the console and run_summary.json show; trackers are checked up
front and a failing one never ends the run. The same run, with every secret environment
variable set to a sentinel, writes none of them anywhere (test_secrets.py has the rest)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from rich.console import Console
from support import (
    ONE_WORKER,
    read_tensorboard,
    read_wandb_history,
    secret_leaks,
    secret_sentinels,
    tiny_config,
)

from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.extras import check_packages
from ray_app.train import tracking

ALL = ["tensorboard", "mlflow", "wandb"]


@pytest.fixture(scope="module")
def tracked(small_data, tmp_path_factory):
    """`ray-app train` of a run logged to every backend, as a user runs it, with every
    secret environment variable set (the run starts its own Ray cluster, so the workers
    see them too)."""
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = tiny_config(small_data, tmp, run={"name": "tracked"}, scaling=ONE_WORKER,
                      tracking={"backends": ALL, "project": "tests"})
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(secret_sentinels(), WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb"),
               COLUMNS="200")
    (tmp / "wandb").mkdir()
    done = subprocess.run([sys.executable, "-m", "ray_app", "train", str(config),
                           "--num-cpus", "2"], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp / "out" / "run_summary.json").read_text())
    assert summary["status"] == "succeeded", summary.get("error")
    return {"tmp": tmp, "stdout": done.stdout, "stderr": done.stderr, "summary": summary}


@pytest.mark.timeout(600)
def test_a_run_logs_the_console_losses_to_tensorboard_mlflow_and_wandb(tracked):
    from mlflow import MlflowClient

    tmp, summary = tracked["tmp"], tracked["summary"]
    # Not a terminal: one line per report, "step 3/4  loss 1.2345 ...".
    console = {int(s): float(v) for s, v in re.findall(r"step (\d+)/4  loss (\d+\.\d+)",
                                                        tracked["stdout"])}
    assert set(console) == {1, 2, 3, 4}, tracked["stdout"]
    final_eval = summary["eval"]["loss_final"]

    def same(logged: dict[int, float]) -> None:
        assert {s: round(v, 4) for s, v in logged.items() if s in console} == console
        assert set(logged) >= set(console)

    board = read_tensorboard(tmp / "out" / "tensorboard" / "tracked")
    same(dict(board["loss"]))
    assert board["eval_loss"][-1] == (4, pytest.approx(final_eval, rel=1e-6))
    assert board["final/eval_loss_final"] == [(4, pytest.approx(final_eval, rel=1e-6))]

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/out/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.003" and run.data.tags["status"] == "succeeded"
    same({m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")})
    assert run.data.metrics["eval_loss"] == run.data.metrics["final_eval_loss_final"] == final_eval

    (run_file,) = (tmp / "wandb").glob("wandb/offline-run-*/run-*.wandb")
    rows = read_wandb_history(run_file)
    same({r["step"]: r["loss"] for r in rows if "loss" in r})
    assert [r["eval_loss"] for r in rows if "eval_loss" in r][-1] == final_eval


def test_a_run_writes_no_secret_into_outputs_checkpoints_trackers_or_console(tracked):
    tmp = tracked["tmp"]
    assert tracked["summary"]["checkpoints"]
    assert list((tmp / "out" / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp / "out" / "mlflow.db").exists()
    assert list((tmp / "wandb").rglob("run-*.wandb"))
    console = [name for name, value in secret_sentinels().items()
               if value in tracked["stdout"] or value in tracked["stderr"]]
    assert console == []
    for folder in ("out", "storage", "wandb"):
        assert secret_leaks(tmp / folder) == []


def test_credentials_in_the_mlflow_uri_are_refused_without_echoing_them():
    with pytest.raises(UserError) as info:
        validate_config({"data": {"train": ["x"]},
                         "tracking": {"mlflow_tracking_uri": "https://bob:hunter2@mlflow.example"}})
    message = str(info.value)
    assert "tracking.mlflow_tracking_uri" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert "hunter2" not in message


def test_an_unknown_backend_is_refused_with_the_allowed_ones():
    with pytest.raises(UserError, match="tracking.backends.0.*'tensorboard', 'mlflow' or 'wandb'"):
        validate_config({"data": {"train": ["x"]}, "tracking": {"backends": ["neptune"]}})


def test_a_missing_tracker_package_names_the_extra_before_any_ray_work(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = validate_config({"data": {"train": ["x"]}, "tracking": {"backends": ALL}})
    with pytest.raises(UserError, match=r"needs wandb.*pip install 'ray-app\[tracking\]'"):
        check_packages(cfg)


def test_a_failing_backend_is_reported_once_and_dropped(tmp_path):
    cfg = validate_config({"data": {"train": ["x"]}, "run": {"output_dir": str(tmp_path)},
                           "tracking": {"backends": ["tensorboard"]}})
    out = io.StringIO()
    with tracking.Tracker(cfg, Console(file=out, width=200)) as tracker:
        tracker.backends["tensorboard"].writer.close()
        tracker.backends["tensorboard"].log = lambda *a: 1 / 0
        tracker.log({"step": 1, "loss": 2.0})
        tracker.log({"step": 2, "loss": 1.0})
        assert tracker.backends == {}
    assert out.getvalue().count("tracking backend tensorboard failed") == 1


def test_tune_uses_rays_logger_callbacks_for_the_chosen_backends(tmp_path):
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    cfg = validate_config({"data": {"train": ["x"]}, "run": {"output_dir": str(tmp_path)},
                           "tracking": {"backends": ALL, "project": "study"}})
    board, mlflow, wandb = tracking.tune_callbacks(cfg)
    assert isinstance(board, TBXLoggerCallback) and isinstance(wandb, WandbLoggerCallback)
    assert isinstance(mlflow, MLflowLoggerCallback) and mlflow.experiment_name == "study"
    assert tracking.tune_callbacks(validate_config({"data": {"train": ["x"]}})) == []
