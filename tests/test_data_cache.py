"""The dataset cache and storage writes survive kills and concurrency: a build killed at
any point leaves nothing a later run reads, two builds of the same data agree on one
published cache, and a file rewritten by `storage.write_text` is always one whole
version."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from support import tiny_config
from support_hostile import run_cli

from ray_app.config import validate_config
from ray_app.data import storage
from ray_app.data.pipeline import BUILD_PREFIX, MARKER, prepare, remove_stale_builds


def _config(small_data: Path, tmp: Path) -> Path:
    cfg = tiny_config(small_data, tmp)
    cfg["data"]["train"].append(str(tmp / "bad.jsonl"))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n{oops\n')
    path = tmp / "data.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _published(store: Path) -> tuple[Path, dict]:
    (marker,) = store.glob(f"datasets/*/{MARKER}")
    published = json.loads(marker.read_text())
    report = published["report"]
    report.pop("stage_seconds")  # wall times: the only part two builds may differ in
    return marker.parent / published["build"], report


def _builds(store: Path) -> list[Path]:
    return sorted(store.glob(f"datasets/*/{BUILD_PREFIX}*"))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to the process and everything it started (its session: Ray's GCS, raylet
    and workers), as when a node dies."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for entry in Path("/proc").iterdir():  # workers put themselves in process groups of their own
        try:
            session = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, ValueError, IndexError):
            continue
        if session == proc.pid:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _assert_readable(build: Path, report: dict) -> None:
    index = json.loads((build / "train_index.json").read_text())
    assert sum(c["rows"] for c in index) == report["train_sequences"] > 0
    assert pq.read_table(build / "train").num_rows == report["train_sequences"]
    assert pq.read_table(build / "records").num_rows == report["records_read"]


@pytest.mark.ray
def test_a_build_killed_at_any_point_leaves_nothing_that_a_rerun_reads(ray_cluster, small_data,
                                                                       tmp_path):
    config = _config(small_data, tmp_path)
    clean = validate_config(yaml.safe_load(config.read_text()))
    clean = clean.model_copy(update={"run": clean.run.model_copy(
        update={"storage_path": str(tmp_path / "clean_storage")})})
    prepare(clean, clean.storage_uri(), tmp_path / "clean_rejects")
    _, want = _published(tmp_path / "clean_storage")

    store = tmp_path / "storage"
    rng = random.Random()
    for i, delay in enumerate((0.0, rng.uniform(0.5, 3.0))):  # as it starts, somewhere in it
        log = tmp_path / f"killed_{i}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ray_app", "data", str(config),
                                     "--num-cpus", "1"], start_new_session=True,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while len(_builds(store)) <= i:
                assert proc.poll() is None and time.monotonic() < deadline, (
                    f"build {i} never started: {log.read_text(errors='replace')[-4000:]}")
                time.sleep(0.05)
            time.sleep(delay)
        finally:
            _kill_session(proc)
    leftovers = _builds(store)
    assert len(leftovers) == 2

    done = run_cli("data", str(config), "--num-cpus", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    build, got = _published(store)
    assert got == want
    assert (tmp_path / "out/rejects/rejects.jsonl").read_text() == (
        tmp_path / "clean_rejects/rejects.jsonl").read_text()
    _assert_readable(build, got)
    if build not in leftovers:  # no killed build got as far as publishing
        assert set(_builds(store)) == {*leftovers, build}  # young leftovers are kept, unread


def test_two_builds_of_the_same_data_at_once_agree_on_one_complete_cache(small_data, tmp_path):
    config = _config(small_data, tmp_path)
    env = {**os.environ, "COLUMNS": "250"}  # one line per row, whatever the paths
    procs = [subprocess.Popen([sys.executable, "-m", "ray_app", "data", str(config), "--num-cpus",
                               "1", "--output", str(tmp_path / name)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for name in ("a", "b")]
    outs = [p.communicate(timeout=500) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-3000:] for o in outs]
    tables = [out.replace(str(tmp_path / name), "OUT").replace(" (tokenized cache reused)", "")
              for (out, _), name in zip(outs, ("a", "b"))]
    assert tables[0] == tables[1]
    assert (tmp_path / "a/rejects/rejects.jsonl").read_text() == (
        tmp_path / "b/rejects/rejects.jsonl").read_text()
    build, report = _published(tmp_path / "storage")
    assert _builds(tmp_path / "storage") == [build]  # a later build removed its own copy
    _assert_readable(build, report)


@pytest.mark.ray
def test_a_build_that_finishes_second_uses_the_first_and_removes_its_own(
        ray_cluster, small_data, tmp_path, monkeypatch):
    from ray_app.data import pipeline

    cfg = validate_config(tiny_config(small_data, tmp_path))
    first = prepare(cfg, cfg.storage_uri(), tmp_path / "first")
    marker = Path(first.path).parent / MARKER
    published = marker.read_bytes()
    marker.unlink()  # the second build starts before the first is published...
    build = pipeline._build

    def build_while_the_first_publishes(*args):
        report = build(*args)
        marker.write_bytes(published)  # ...which happens while it runs
        return report

    monkeypatch.setattr(pipeline, "_build", build_while_the_first_publishes)
    second = prepare(cfg, cfg.storage_uri(), tmp_path / "second")
    assert (second.path, second.report) == (first.path, first.report)
    assert _builds(tmp_path / "storage") == [Path(first.path)]
    assert (tmp_path / "second/rejects.jsonl").read_text() == (
        tmp_path / "first/rejects.jsonl").read_text()


def test_only_unpublished_builds_older_than_a_day_are_removed(tmp_path):
    def name(seconds_ago: float, tag: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now - seconds_ago))
        return f"{BUILD_PREFIX}{stamp}-{tag}"

    now = time.time()
    names = {"published": name(3 * 86400, "p"), "stale": name(2 * 86400, "s"),
             "running": name(3600, "r")}
    for folder in names.values():
        (tmp_path / folder / "records").mkdir(parents=True)
    (tmp_path / "build-notatime").mkdir()
    remove_stale_builds(str(tmp_path), keep=names["published"], now=now)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["published"], names["running"], "build-notatime"])


WRITER = """
import json, sys
from ray_app.data import storage
i = 0
while True:
    pad = "x" * (200_000 * (i % 5 + 1))
    storage.write_text(sys.argv[1], json.dumps({"version": i, "pad": pad, "size": len(pad)}))
    i += 1
"""


def test_write_text_leaves_one_whole_version_whenever_the_writer_is_killed(tmp_path):
    target = tmp_path / "state.json"
    rng = random.Random()
    versions = set()

    def whole() -> dict:
        state = json.loads(target.read_text())  # never a part of a version
        assert len(state["pad"]) == state["size"]
        return state

    for _ in range(6):
        before = whole()["version"] if target.exists() else None
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        try:
            deadline = time.monotonic() + 60
            while not target.exists() or whole()["version"] == before:  # it is writing
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
            stop = time.monotonic() + rng.uniform(0.0, 0.5)
            while time.monotonic() < stop:  # readers meanwhile see whole versions too
                versions.add(whole()["version"])
        finally:
            proc.kill()
            proc.wait()
        versions.add(whole()["version"])
    assert len(versions) > 6  # the reads and kills did land between many writes


def test_create_once_lets_exactly_one_of_many_concurrent_writers_win(tmp_path):
    target = str(tmp_path / "marker.json")
    results: list[bool] = []
    start = threading.Barrier(8)

    def write(i: int) -> None:
        start.wait()
        results.append(storage.create_once(target, json.dumps({"writer": i}).encode()))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    winner = json.loads(Path(target).read_text())["writer"]
    assert 0 <= winner < 8
    assert [p.name for p in tmp_path.iterdir()] == ["marker.json"]  # no temporary file left
