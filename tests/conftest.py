"""Shared fixtures: one local Ray cluster per test session, small data, tiny configs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from support import write_lines

from ray_app.quickstart import build_assets

# Ray Train's controller polls its workers every 2 s by default, and sees a run end or a
# worker fail only at a poll: every run of the suite waited ~1 s on average for it at its
# end and at each restart. Set before any cluster starts, so the session cluster and the
# drivers that tests start in subprocesses (their own local clusters) all poll every 0.2 s.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


# The longest modules first: CI runs the suite on two pytest-xdist workers (`-n 2 --dist
# loadfile`, whole modules per worker, in this order), and a long module started last
# (the multi-node cluster module takes a third of the run) would leave one worker alone
# for its whole length at the end; the short ones fill the gaps.
LONGEST_FIRST = ("test_cluster.py", "test_strategies.py", "test_preference_methods.py",
                 "test_recovery.py", "test_tune.py", "test_dpo.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: keeps the order within a module and among the rest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from ray_app.ray_session import connect

    connect(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """Three clean shards (alpaca, messages, text) of the quickstart task."""
    folder = tmp_path_factory.mktemp("data")
    rng = random.Random(1)
    write_lines(folder / "a.jsonl", [json.dumps(r) for r in build_assets.alpaca_records(rng, 160)])
    write_lines(folder / "m.jsonl.gz", [json.dumps(r) for r in build_assets.chat_records(rng, 160)],
                compress=True)
    write_lines(folder / "t.jsonl", [json.dumps(r) for r in build_assets.text_records(rng, 60)])
    return folder
