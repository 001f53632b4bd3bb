"""`ray-app submit` without a cluster: where a job's outputs go, and following its logs
through dropped streams (a fake Jobs client stands in for the dashboard)."""

from __future__ import annotations

import asyncio

import pytest
from rich.console import Console

from ray_app.errors import UserError
from ray_app.submit import follow_logs, is_on_this_machine, job_paths


def test_relative_outputs_go_under_the_given_storage(tmp_path):
    storage, output = job_paths("outputs/checkpoints", "outputs/quickstart", str(tmp_path))
    assert storage == str(tmp_path / "outputs" / "checkpoints")
    assert output == str(tmp_path / "outputs" / "quickstart")
    storage, output = job_paths("outputs/ckpt", "/mnt/shared/out", "s3://bucket/team")
    assert (storage, output) == ("s3://bucket/team/outputs/ckpt", "/mnt/shared/out")


def test_relative_outputs_with_no_persistent_location_are_refused():
    with pytest.raises(UserError) as refused:
        job_paths("outputs/checkpoints", "/abs/out", None)
    message = str(refused.value)
    assert "run.storage_path 'outputs/checkpoints' is relative" in message
    assert "working_dir" in message and "--storage" in message and "RAY_APP_STORAGE" in message
    with pytest.raises(UserError, match="object-storage URI"):
        job_paths("s3://b/ckpt", "out", "s3://b")


def test_absolute_paths_and_uris_are_kept():
    assert job_paths("s3://b/c", "/data/out", None) == ("s3://b/c", "/data/out")


def test_a_dashboard_on_this_machine_is_recognised():
    assert is_on_this_machine("http://127.0.0.1:8265") and is_on_this_machine("http://localhost:1")
    assert not is_on_this_machine("http://head.example.com:8265")


class FakeJobs:
    """Logs arrive in chunks; the stream drops twice mid-way, and the status call fails
    once (a restarting head) before the job ends."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.streams = 0
        self.statuses = iter(["RUNNING", RuntimeError("dashboard down"), "RUNNING", "SUCCEEDED"])

    async def tail_job_logs(self, job_id):
        self.streams += 1
        cut = {1: 3, 2: 7}.get(self.streams, len(self.lines))
        for line in self.lines[:cut]:  # every attach starts at the first line again
            yield line
        if cut < len(self.lines):
            raise RuntimeError("WebSocket connection closed unexpectedly")

    def get_job_status(self, job_id):
        status = next(self.statuses)
        if isinstance(status, Exception):
            raise status
        return f"JobStatus.{status}"


def test_a_dropped_log_stream_is_reattached_without_repeating_a_line(monkeypatch):
    monkeypatch.setattr(asyncio, "sleep", _no_wait)
    lines = [f"step {i}/10\n" for i in range(1, 11)]
    jobs = FakeJobs(lines)
    console = Console(record=True, width=100)
    assert asyncio.run(follow_logs(jobs, "job-1", console)) == "SUCCEEDED"
    text = console.export_text()
    assert [ln for ln in text.splitlines() if ln.startswith("step")] == [ln.strip() for ln in lines]
    assert text.count("re-attaching") == 2 and jobs.streams >= 3


async def _no_wait(_seconds):
    return None


def test_a_job_driver_does_not_repeat_the_jobs_own_env_vars(monkeypatch):
    """Inside a Ray job whose runtime env sets one of the variables the driver propagates
    (as `ray-app submit` and `ray job submit --runtime-env-json` do), Ray must be able to
    merge the job's runtime env with the driver's: it refuses a repeated key."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env  # what ray.init does

    from ray_app.ray_session import _propagated_env

    job_env = {"working_dir": "gcs://_ray_pkg_x.zip",
               "env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}}
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Outside a job nothing is left out, and the same keys would clash:
    assert _merge_runtime_env(job_env, {"env_vars": _propagated_env()}) is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    driver = {"env_vars": _propagated_env()}
    assert "RAY_TRAIN_ENABLE_STATE_TRACKING" not in driver["env_vars"]
    assert driver["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
    merged = _merge_runtime_env(job_env, driver)
    assert merged is not None
    assert merged["env_vars"]["RAY_TRAIN_ENABLE_STATE_TRACKING"] == "1"
    assert merged["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.2"
