"""Exact recovery: after a worker-group failure the run trains on every sample once, in
the order an uninterrupted run uses; SIGTERM checkpoints at the next step; a corrupted
checkpoint is skipped; a reused run name with other settings is refused."""

from __future__ import annotations

import pytest
from rich.console import Console
from support import tiny_config

from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.train.faults import FAIL_AT_STEP_ENV, SIGTERM_AT_STEP_ENV
from ray_app.train.run import run_training
from ray_app.train.trace import committed_steps

pytestmark = pytest.mark.ray
STEPS = 6


def _train(cfg_dict) -> dict:
    return run_training(validate_config(cfg_dict), Console(width=120))


def _config(data, tmp, name, **run):
    # batch 4 x 2 workers: the 6 steps use 48 of the ~70 packed sequences of one epoch
    return tiny_config(data, tmp, train={"max_steps": STEPS, "batch_size_per_worker": 4,
                                         "checkpoint_every": 2},
                       run={"name": name, "record_samples": True, "max_failures": 1, **run})


@pytest.fixture(scope="module")
def straight(ray_cluster, small_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    summary = _train(_config(small_data, tmp, "straight", output_dir=str(tmp / "out")))
    assert summary["status"] == "succeeded", summary.get("error")
    return summary, committed_steps(tmp / "storage" / "straight" / "sample_trace")


def test_worker_failure_resumes_exactly_where_the_uninterrupted_run_would_be(
        straight, small_data, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # one step after the checkpoint at step 4
    summary = _train(_config(small_data, tmp_path, "crashy"))
    assert summary["status"] == "succeeded", summary.get("error")
    train = summary["train"]
    assert (train["steps"], train["restarts"], train["resumed_from_step"]) == (STEPS, 1, 4)
    [restart] = train["restart_history"]
    assert "injected failure at step 5" in restart["cause"]
    assert restart["resumed_from_step"] == 4 and restart["recovery_s"] > 0
    assert restart["steps_lost"] == 0  # step 5 failed before it was reported
    steps = committed_steps(tmp_path / "storage" / "crashy" / "sample_trace")
    expected_summary, expected_steps = straight
    assert steps == expected_steps and sorted(steps) == list(range(1, STEPS + 1))
    trained = [i for ids in steps.values() for i in ids]
    assert len(trained) == len(set(trained)) == STEPS * 4 * 2  # none repeated, none skipped
    assert summary["eval"]["loss_final"] == pytest.approx(expected_summary["eval"]["loss_final"],
                                                          rel=0.02)


def test_restart_history_counts_lost_steps_and_restarts_before_any_checkpoint(ray_cluster):
    """The hub's record of restarts, from the events the workers and the failure callback
    send: a failure after step 7 with the last checkpoint at 4 loses 3 steps; one before
    the first checkpoint starts over from step 0 and still counts as a restart."""
    import ray

    from ray_app.train.progress import ProgressHub

    hub = ProgressHub.remote("history")
    events = [{"step": 0}, {"step": 4}, {"step": 7}]
    for event in events:
        ray.get(hub.update.remote(event))
    ray.get(hub.failure.remote("worker died"))
    ray.get(hub.update.remote({"step": 4, "resumed": True, "world_size": 2}))
    ray.get(hub.update.remote({"step": 5}))
    ray.get(hub.failure.remote("node lost"))
    ray.get(hub.update.remote({"step": 0, "world_size": 1}))  # no checkpoint: a fresh attempt
    first, second = ray.get(hub.restarts.remote())
    assert (first["cause"], first["resumed_from_step"], first["steps_lost"]) == ("worker died", 4, 3)
    assert (second["cause"], second["resumed_from_step"], second["steps_lost"]) == ("node lost", 0, 5)
    ray.kill(hub)


def test_sigterm_checkpoints_at_the_next_step_and_the_run_goes_on(
        ray_cluster, small_data, tmp_path, monkeypatch, straight):
    monkeypatch.setenv(SIGTERM_AT_STEP_ENV, "3")  # checkpoints are due at 2, 4, 6 only
    summary = _train(_config(small_data, tmp_path, "evicted"))
    assert summary["status"] == "succeeded", summary.get("error")
    train = summary["train"]
    assert train["restarts"] == 1 and train["resumed_from_step"] == 3  # nothing lost
    assert "SIGTERM" in train["restart_history"][0]["cause"]
    steps = committed_steps(tmp_path / "storage" / "evicted" / "sample_trace")
    assert steps == straight[1]


def test_driver_rerun_skips_a_corrupted_checkpoint_and_refuses_other_settings(
        ray_cluster, small_data, tmp_path, monkeypatch):
    cfg = _config(small_data, tmp_path, "rerun", max_failures=0)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")
    crashed = _train(cfg)
    assert crashed["status"] == "failed" and "injected failure at step 5" in crashed["error"]
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    run_dir = tmp_path / "storage" / "rerun"
    adapter = run_dir / "step_0000004" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])  # a truncated upload

    other = _config(small_data, tmp_path, "rerun", max_failures=0)
    other["train"]["lr"] = 1e-3
    with pytest.raises(UserError, match=r"already exists.*train\.lr: 0\.003 -> 0\.001"):
        _train(other)

    resumed = _train(cfg)
    assert resumed["status"] == "succeeded", resumed.get("error")
    assert resumed["train"]["resumed_from_step"] == 2 and resumed["train"]["steps"] == STEPS
    [restart] = resumed["train"]["restart_history"]
    assert restart["cause"].startswith("driver restarted")
    assert any("step_0000004" in w and "does not match its manifest" in w
               for w in restart["warnings"])
