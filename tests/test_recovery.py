"""Exact recovery: after a worker-group failure the run trains on every sample once, in
the order an uninterrupted run uses, with the same optimizer state; SIGTERM checkpoints at
the next step; a killed driver and a corrupted newest checkpoint still end with the adapter,
and the run's name with other settings is refused; checkpoints beyond keep_checkpoints are
deleted and no local copy of any is left behind; a planted pickle is refused unrun."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from rich.console import Console
from support import (
    checkpoint_folders,
    kill_trees,
    newest_checkpoint,
    optimizer_tensors,
    tiny_config,
)

from ray_app.config import validate_config
from ray_app.errors import UserError
from ray_app.train import checkpoint as ckpt
from ray_app.train.faults import FAIL_AT_STEP_ENV, SIGTERM_AT_STEP_ENV, STEP_DELAY_ENV
from ray_app.train.run import run_training
from ray_app.train.trace import committed_steps

pytestmark = pytest.mark.ray
STEPS = 6


def _train(cfg_dict) -> dict:
    return run_training(validate_config(cfg_dict), Console(width=120))


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One run storage for every run of this module, so that they all train on one build
    of the dataset (built once, by the first run). Runs are compared sample id by sample
    id, and a sample id names a sequence of one build; it also saves a build per run."""
    return tmp_path_factory.mktemp("storage")


def _config(data, tmp, name, storage, **run):
    # batch 4 x 2 workers: the 6 steps use 48 of the ~70 packed sequences of one epoch
    return tiny_config(data, tmp, train={"max_steps": STEPS, "batch_size_per_worker": 4,
                                         "checkpoint_every": 2},
                       run={"name": name, "record_samples": True, "max_failures": 1,
                            "storage_path": str(storage), **run})


@pytest.fixture(scope="module")
def straight(ray_cluster, small_data, tmp_path_factory, storage):
    tmp = tmp_path_factory.mktemp("straight")
    summary = _train(_config(small_data, tmp, "straight", storage, output_dir=str(tmp / "out")))
    assert summary["status"] == "succeeded", summary.get("error")
    run = storage / "straight"
    return summary, committed_steps(run / "sample_trace"), optimizer_tensors(newest_checkpoint(run))


def test_worker_failure_resumes_exactly_where_the_uninterrupted_run_would_be(
        straight, small_data, tmp_path, monkeypatch, storage):
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # one step after the checkpoint at step 4
    summary = _train(_config(small_data, tmp_path, "crashy", storage))
    assert summary["status"] == "succeeded", summary.get("error")
    train = summary["train"]
    assert (train["steps"], train["restarts"], train["resumed_from_step"]) == (STEPS, 1, 4)
    [restart] = train["restart_history"]
    assert "injected failure at step 5" in restart["cause"]
    assert restart["resumed_from_step"] == 4 and restart["recovery_s"] > 0
    assert restart["steps_lost"] == 0  # step 5 failed before it was reported
    # Where the recovery's time went: set-up and restore are parts of the restarted worker's
    # time to its first step, itself part of the time from the failure (0.1 s: rounding).
    assert restart["set_up_s"] > 0 and restart["restore_s"] >= 0
    assert restart["set_up_s"] + restart["restore_s"] <= restart["first_step_s"] + 0.1
    assert restart["first_step_s"] <= restart["next_step_s"]
    steps = committed_steps(storage / "crashy" / "sample_trace")
    expected_summary, expected_steps, expected_optimizer = straight
    assert steps == expected_steps and sorted(steps) == list(range(1, STEPS + 1))
    trained = [i for ids in steps.values() for i in ids]
    assert len(trained) == len(set(trained)) == STEPS * 4 * 2  # none repeated, none skipped
    optimizer = optimizer_tensors(newest_checkpoint(storage / "crashy"))
    assert optimizer.keys() == expected_optimizer.keys() and optimizer
    for name, tensor in optimizer.items():  # Adam moments and step counts at step 6
        assert tensor.allclose(expected_optimizer[name], rtol=1e-5, atol=1e-8), name
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
    ray.get(hub.update.remote({"step": 3}))
    # No failure: Ray Train grew the group (elastic) and restarted it from step 2.
    ray.get(hub.update.remote({"step": 2, "resumed": True, "world_size": 2}))
    first, second, third = ray.get(hub.restarts.remote())
    assert (first["cause"], first["resumed_from_step"], first["steps_lost"]) == ("worker died", 4, 3)
    assert (second["cause"], second["resumed_from_step"], second["steps_lost"]) == ("node lost", 0, 5)
    assert third["cause"].startswith("elastic resize") and third["world_size"] == 2
    assert (third["resumed_from_step"], third["steps_lost"]) == (2, 1)
    ray.kill(hub)


def test_sigterm_checkpoints_at_the_next_step_and_the_run_goes_on(
        ray_cluster, small_data, tmp_path, monkeypatch, straight, storage):
    monkeypatch.setenv(SIGTERM_AT_STEP_ENV, "3")  # checkpoints are due at 2, 4, 6 only
    summary = _train(_config(small_data, tmp_path, "evicted", storage))
    assert summary["status"] == "succeeded", summary.get("error")
    train = summary["train"]
    assert train["restarts"] == 1 and train["resumed_from_step"] == 3  # nothing lost
    assert "SIGTERM" in train["restart_history"][0]["cause"]
    steps = committed_steps(storage / "evicted" / "sample_trace")
    assert steps == straight[1]


@pytest.mark.timeout(600)
def test_a_killed_driver_and_a_corrupted_newest_checkpoint_still_end_with_the_adapter(
        ray_cluster, small_data, tmp_path, storage):
    """The driver (and the local cluster it started) is SIGKILLed after the step-4
    checkpoint; that checkpoint is then overwritten with garbage. The rerun skips it,
    resumes from step 2, and with keep_checkpoints=2 Ray Train's eviction of the bad folder
    must not touch the new ones: the run ends succeeded with the adapter exported."""
    cfg = _config(small_data, tmp_path, "killed", storage, max_failures=0)
    cfg["train"]["keep_checkpoints"] = 2
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = storage / "killed"
    driver = subprocess.Popen(
        [sys.executable, "-m", "ray_app", "train", str(config), "--num-cpus", "2"],
        env={**os.environ, STEP_DELAY_ENV: "1.5"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        # Killed once Ray Train has registered the step-4 checkpoint (its snapshot names it),
        # so that the rerun starts from that one and finds it corrupted.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 400
        while not (snapshot.exists() and '"step_0000004-' in snapshot.read_text()):
            assert driver.poll() is None, "the driver ended before its step-4 checkpoint"
            assert time.monotonic() < deadline, "no step-4 checkpoint in time"
            time.sleep(0.2)
    finally:
        kill_trees([driver.pid])
    newest = newest_checkpoint(run_dir)
    assert newest.name.startswith("step_0000004-")
    (newest / "adapter_model.safetensors").write_bytes(os.urandom(4096))

    other = {**cfg, "train": {**cfg["train"], "lr": 1e-3}}  # the name, other settings
    with pytest.raises(UserError, match=r"already exists.*train\.lr: 0\.003 -> 0\.001"):
        _train(other)

    summary = _train(cfg)
    assert summary["status"] == "succeeded", summary.get("error")
    train = summary["train"]
    assert train["steps"] == STEPS and train["resumed_from_step"] == 2
    [restart] = train["restart_history"]
    assert restart["cause"].startswith("driver restarted")
    assert any(newest.name in w and "does not match its manifest" in w
               for w in restart["warnings"])
    final = Path(summary["adapter_path"])
    assert (final / "adapter_model.safetensors").stat().st_size > 0
    left = {f.name[:12] for f in checkpoint_folders(run_dir)}
    assert left == {"step_0000004", "step_0000006"} and not newest.exists()


STAGERS: set[str] = set()  # pids of the workers that staged a checkpoint of the run below


@pytest.fixture(scope="module")
def many_checkpoints(ray_cluster, small_data, tmp_path_factory, storage):
    """20 steps with a checkpoint at every step and keep_checkpoints=2, while a thread
    records the most checkpoint staging folders of this session's Ray workers (processes
    under this one; another test session may checkpoint on this machine too) present at
    once, and the workers that staged any."""
    tmp = tmp_path_factory.mktemp("many")
    cfg = tiny_config(small_data, tmp, train={"max_steps": 20, "checkpoint_every": 1,
                                              "keep_checkpoints": 2, "batch_size_per_worker": 2},
                      run={"name": "many", "max_failures": 0, "storage_path": str(storage)})
    most, done = [0], threading.Event()

    def watch() -> None:
        me = psutil.Process()
        while not done.is_set():
            if ckpt.STAGING_ROOT.is_dir():
                ours = {str(p.pid) for p in me.children(recursive=True)}
                staged = [f for f in ckpt.STAGING_ROOT.iterdir()
                          if f.name.split("-", 1)[0] in ours]
                STAGERS.update(f.name.split("-", 1)[0] for f in staged)
                most[0] = max(most[0], len(staged))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = _train(cfg)
    finally:
        done.set()
        watcher.join()
    assert summary["status"] == "succeeded", summary.get("error")
    return storage / "many", most[0]


def test_twenty_checkpoints_leave_the_newest_two_in_storage_and_none_on_local_disk(
        many_checkpoints):
    run_dir, most_staged = many_checkpoints
    assert sorted(f.name[:12] for f in checkpoint_folders(run_dir)) == [
        "step_0000019", "step_0000020"]
    assert 1 <= most_staged <= 2  # one rank's part at a time per worker, never accumulating
    left = list(ckpt.STAGING_ROOT.iterdir()) if ckpt.STAGING_ROOT.is_dir() else []
    assert not [f for f in left if f.name.split("-", 1)[0] in STAGERS]


class _Payload:
    """What an attacker with write access to the bucket would plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("victim", ["rng_rank0000.pt", "optimizer.pt"])
def test_a_planted_pickle_in_a_checkpoint_is_refused_and_never_run(
        many_checkpoints, tmp_path, victim):
    run_dir, _ = many_checkpoints
    folder = tmp_path / "planted"
    shutil.copytree(newest_checkpoint(run_dir), folder)
    assert ckpt.problem_with(folder) is None
    marker = tmp_path / "pwned"
    (folder / victim).write_bytes(pickle.dumps({"state": _Payload(marker)}))
    # The attacker rewrites the manifest too, so that only the content can give it away.
    manifest = folder / "manifest_rank0000.json"
    entries = json.loads(manifest.read_text())
    entries[victim] = list(ckpt._digest(folder / victim))
    manifest.write_text(json.dumps(entries))
    problem = ckpt.problem_with(folder)
    assert problem and victim in problem and "refused" in problem
    assert not marker.exists()
