"""The Python API (`import ray_app`): the same validation as the CLI, a RunResult whose
metrics rows are the run's own, JobHandle over the Jobs SDK, and console output that reads
well in Jupyter. Cluster-bound cases (Ray client, submit): tests/test_cluster.py."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console
from support import ONE_WORKER, tiny_config

import ray_app
from ray_app.errors import UserError
from ray_app.submit import JobHandle


def test_import_ray_app_stays_cheap_and_lists_the_api():
    code = ("import sys, ray_app; assert 'ray' not in sys.modules and 'torch' not in sys.modules;"
            " print(sorted(ray_app.__all__))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    for name in ("load_config", "train", "submit", "evaluate", "merge", "estimate", "tune",
                 "prepare_data", "RunResult", "JobHandle"):
        assert name in done.stdout


def test_api_functions_named_like_subpackages_leave_the_subpackages_importable():
    """`ray_app.train`, `.tune`, `.estimate` and `.submit` are API functions and also the
    names of modules: both uses work, in whichever order they are imported."""
    code = ("import inspect, ray_app.train.loop as loop, ray_app\n"
            "from unittest import mock\n"
            "assert ray_app.train.loop is loop and callable(ray_app.train)\n"
            "assert 'address' in inspect.signature(ray_app.train).parameters\n"
            "with mock.patch('ray_app.tune.study.run_study'): pass\n"
            "import ray_app.estimate as memory, ray_app.submit as jobs\n"
            "assert callable(ray_app.submit) and jobs.JobHandle is ray_app.JobHandle\n"
            "assert memory.estimate is not ray_app.estimate\n"
            "print(type(ray_app.estimate(None, gpus=1)).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "EstimateResult"


def test_load_config_takes_a_dict_or_a_path_with_overrides_and_validates_like_the_cli(tmp_path):
    cfg = ray_app.load_config({"data": {"train": ["x.jsonl"]}}, ["train.lr=1e-4"])
    assert cfg.train.lr == 1e-4 and cfg.data.train == ["x.jsonl"]
    assert ray_app.load_config(cfg, ["train.max_steps=3"]).train.max_steps == 3
    assert ray_app.load_config(None).run.name == "quickstart"
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: [x.jsonl]}\n")
    assert ray_app.load_config(path, ["lora.r=4"]).lora.r == 4
    with pytest.raises(UserError, match="did you mean 'lr'"):
        ray_app.load_config({"data": {"train": ["x"]}, "train": {"lrr": 1}})
    with pytest.raises(UserError, match="train.method"):
        ray_app.load_config({"data": {"train": ["x"]}, "train": {"method": "nope"}})


def test_estimate_returns_the_table_the_cli_prints_and_its_json():
    result = ray_app.estimate(None, overrides=["lora.r=4"], gpus=1, gpu_memory_gib=24)
    assert result.fits and result.to_json()["plan"]["gpus"] == 1
    console = Console(record=True, file=io.StringIO(), width=120)
    result.render(console)
    assert "training peak" in console.export_text()
    with pytest.raises(UserError, match="--gpus must be at least 1"):
        ray_app.estimate(None, gpus=0)


def test_the_api_points_to_submit_where_a_ray_client_session_cannot_serve():
    with pytest.raises(UserError, match=r"ray_app.submit\(config, 'http://h:8265'"):
        ray_app.train(None, "http://h:8265")
    cfg = ray_app.load_config({"data": {"train": ["x.jsonl"]},
                               "tune": {"space": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}})
    with pytest.raises(UserError, match="command='tune'"):
        ray_app.tune(cfg, "ray://127.0.0.1:9")
    with pytest.raises(UserError, match="dashboard URL"):
        ray_app.submit(None, "ray://127.0.0.1:9")


class FakeJobs:
    def __init__(self, statuses: list[str]):
        self.statuses = iter(statuses)
        self.stopped = False

    def get_job_status(self, job_id):
        return f"JobStatus.{next(self.statuses)}"

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n"

    async def tail_job_logs(self, job_id):
        for line in ("line 1\n", "line 2\n"):
            yield line

    def stop_job(self, job_id):
        self.stopped = True
        return True


def test_a_job_handle_reports_status_logs_and_the_run_summary(tmp_path):
    (tmp_path / "run_summary.json").write_text(json.dumps({"status": "succeeded"}))
    jobs = FakeJobs(["PENDING", "RUNNING", "SUCCEEDED", "SUCCEEDED", "SUCCEEDED"])
    job = JobHandle("raysubmit_1", "http://h:8265", str(tmp_path), "/s", "run", jobs)
    assert job.status() == "PENDING"
    assert job.wait(timeout=5, poll_s=0) == "SUCCEEDED"
    console = Console(record=True, file=io.StringIO(), width=80)
    assert job.logs(follow=True, console=console) == "line 1\nline 2\n"
    assert console.export_text().splitlines() == ["line 1", "line 2"]
    assert job.result() == {"status": "succeeded"} and job.stop() and jobs.stopped
    assert job.dashboard_url == "http://h:8265/#/jobs/raysubmit_1"
    with pytest.raises(TimeoutError):
        JobHandle("j", "http://h:8265", str(tmp_path), "/s", "run",
                  FakeJobs(["RUNNING"] * 10)).wait(timeout=0, poll_s=0)
    missing = JobHandle("j", "http://h:8265", str(tmp_path / "no"), "/s", "run",
                        FakeJobs(["FAILED"]))
    with pytest.raises(UserError, match="No run summary .* job j is FAILED"):
        missing.result()


def test_progress_in_jupyter_without_ipywidgets_is_plain_lines_not_escape_codes(
        monkeypatch, capsys):
    from ray_app import display
    from ray_app.train.progress import ProgressDisplay

    monkeypatch.setattr(display, "installed", lambda name: False)  # no ipywidgets
    out = io.StringIO()
    console = Console(force_jupyter=True, record=True, file=out, width=120)
    progress = ProgressDisplay(None, 4, console)
    assert not progress.live
    progress._show({"step": 1, "loss": 2.5, "tokens_per_s": 1000.0})
    with display.status(console, "Reading the data..."):
        pass
    text = console.export_text()
    assert "step 1/4  loss 2.5000" in text and "Reading the data..." in text
    assert "\x1b[" not in out.getvalue() + capsys.readouterr().out


def test_progress_in_jupyter_with_ipywidgets_is_live(monkeypatch):
    from ray_app import display

    monkeypatch.setattr(display, "installed", lambda name: name == "ipywidgets")
    assert display.live(Console(force_jupyter=True, file=io.StringIO()))
    assert not display.live(Console(force_terminal=False, file=io.StringIO()))  # job logs


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_train_returns_a_run_result_whose_metrics_rows_match_run_summary_json(
        ray_cluster, small_data, tmp_path):
    cfg = tiny_config(small_data, tmp_path, run={"name": "api"}, scaling=ONE_WORKER,
                      train={"max_steps": 4, "eval_every": 2})
    console = Console(record=True, file=io.StringIO(), width=120)
    result = ray_app.train(cfg, console=console)
    assert result.status == "succeeded", result.summary.get("error")
    on_disk = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert result.summary_path == str(tmp_path / "out" / "run_summary.json")
    assert {k: v for k, v in on_disk.items() if k != "versions"} == json.loads(
        json.dumps(result.summary, default=str))
    assert result.adapter_path == on_disk["adapter_path"] and result.restarts == 0
    steps = [row["step"] for row in result.metrics]
    assert steps == sorted(steps) and steps[-1] == on_disk["train"]["steps"] == 4
    last = result.metrics[-1]
    assert last["tokens_seen"] == on_disk["train"]["tokens_seen"]
    evals = [row["eval_loss"] for row in result.metrics if row.get("eval_loss") is not None]
    assert evals[-1] == pytest.approx(on_disk["eval"]["loss_final"])
    frame = result.metrics_frame()
    assert len(frame) == len(result.metrics) and {"step", "loss", "time"} <= set(frame.columns)
    assert "Run api: succeeded" in repr(result) and "<pre" in result._repr_html_()
