"""One live run per name: the lease in `<storage>/<run>/lease.json`.

Processes race for it for real (several at once, many rounds); a holder that stopped
heartbeating or died is taken over with a warning; two `ray-app train` of one run at once
train once, and the other exits 2 saying who holds the run."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import ONE_WORKER, tiny_config

from ray_app.errors import UserError
from ray_app.train import lease
from ray_app.train.lease import RunLease, lease_uri, live_holder


def _contend(storage: str, name: str, start, results, release) -> None:
    start.wait()
    try:
        with RunLease(storage, name, "train"):
            results.put(("won", os.getpid()))
            release.wait(60)  # held until every contender has tried
    except UserError as err:
        results.put(("refused", str(err)))


def _start(storage: Path, command: str) -> None:
    with RunLease(str(storage), "run", command):
        pass


@pytest.mark.timeout(120)
def test_of_processes_starting_one_run_at_once_exactly_one_holds_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        start, release, results = ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(tmp_path), f"r{round_}", start, results,
                                                    release)) for _ in range(4)]
        for p in procs:
            p.start()
        start.set()
        outcomes = [results.get(timeout=60) for _ in procs]
        release.set()
        for p in procs:
            p.join(30)
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, outcomes
        for kind, message in outcomes:
            if kind == "refused":
                assert f"Run 'r{round_}' is already running" in message
                assert "last heartbeat" in message and "another run.name" in message
        # Released at the end: the next start of the name is free.
        assert not Path(lease_uri(str(tmp_path), f"r{round_}")).exists()


def test_a_live_holder_is_named_in_the_refusal(tmp_path):
    with RunLease(str(tmp_path), "run", "train"):
        with pytest.raises(UserError) as refused:
            _start(tmp_path, "tune")
        held = live_holder(str(tmp_path), "run")
        assert held is not None and held.pid == os.getpid()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "ray-app train" in message and "since" in message
    assert live_holder(str(tmp_path), "run") is None


def test_a_holder_that_stopped_heartbeating_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    holder = {"id": "x" * 32, "command": "train", "host": "another-host", "pid": 1,
              "pid_started": 0.0, "started": time.time() - 600, "heartbeat": time.time() - 5}
    path = Path(lease_uri(str(tmp_path), "run"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(holder))
    with pytest.raises(UserError, match="another-host"):  # fresh heartbeat: alive
        _start(tmp_path, "train")
    monkeypatch.setattr(lease, "STALE_S", 2.0)
    time.sleep(3)
    with RunLease(str(tmp_path), "run", "train") as taken:
        assert taken.warning and "from a holder that is gone" in taken.warning
        assert "another-host" in taken.warning
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"id": "y" * 32, "command": "train", "host": os.uname().nodename, "pid": dead.pid,
              "pid_started": 1.0, "started": time.time(), "heartbeat": time.time()}
    path = Path(lease_uri(str(tmp_path), "run"))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(holder))
    with RunLease(str(tmp_path), "run", "train") as taken:
        assert taken.warning and f"pid {dead.pid}" in taken.warning


def test_an_unreadable_lease_file_is_taken_over(tmp_path):
    path = Path(lease_uri(str(tmp_path), "run"))
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"id": "trunc')
    with RunLease(str(tmp_path), "run", "train") as taken:
        assert "unreadable lease file" in taken.warning


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(lease, "STALE_S", 1.0)
    with RunLease(str(tmp_path), "run", "train"):
        first = json.loads(Path(lease_uri(str(tmp_path), "run")).read_text())["heartbeat"]
        time.sleep(2.0)  # longer than STALE_S: only the heartbeat keeps it alive
        now = json.loads(Path(lease_uri(str(tmp_path), "run")).read_text())["heartbeat"]
        assert now > first and live_holder(str(tmp_path), "run") is not None


@pytest.mark.timeout(420)
def test_two_ray_app_trains_of_one_run_at_once_train_once(small_data, tmp_path):
    cfg = tiny_config(small_data, tmp_path, train={"max_steps": 3}, scaling=ONE_WORKER,
                      run={"name": "twice", "output_dir": str(tmp_path / "out")})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "RAY_APP_STEP_DELAY_S": "2"}  # long enough for both to meet
    cmd = [sys.executable, "-m", "ray_app", "train", str(config), "--num-cpus", "2"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "Run 'twice' is already running" in loser and "Traceback" not in loser
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["train"]["steps"] == 3
    assert summary["train"]["restarts"] == 0
