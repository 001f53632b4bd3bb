"""Shared fixtures: one local Ray cluster per test session, small data, tiny configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import write_lines

from ray_app.quickstart import build_assets


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
