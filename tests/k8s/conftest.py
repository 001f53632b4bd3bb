"""Fixtures for the KubeRay tests: helm, and the shipped manifests as valid bases to break."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_app.errors import UserError
from ray_app.k8s.helm import CHART, find_helm

REPO = Path(__file__).resolve().parents[2]


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


class Helm:
    """Runs helm with its cache/config/data folders in a private temp dir."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {**os.environ, **{f"HELM_{k}_HOME": str(home / k.lower())
                                     for k in ("CACHE", "CONFIG", "DATA")}}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], check=False, env=self.env,
                              capture_output=True, text=True, timeout=60)

    def template(self, *args: str, release: str = "ray-finetune") -> list[dict]:
        """The documents `helm template` renders from cluster/chart; fails the test on an error."""
        result = self.run("template", release, str(CHART), *args)
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    try:
        binary = find_helm()
    except UserError as err:
        pytest.skip(str(err))
    return Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def _rayjob() -> dict:
    return next(d for d in load_all(REPO / "jobs" / "rayjobs" / "train.yaml")
                if d["kind"] == "RayJob")


@pytest.fixture
def rayjob(_rayjob: dict) -> dict:
    """jobs/rayjobs/train.yaml's RayJob (HTTPMode, own cluster, spot + on-demand GPU groups),
    as rendered from the chart, to break in tests."""
    return copy.deepcopy(_rayjob)


@pytest.fixture(scope="session")
def _raycluster() -> dict:
    return next(d for d in load_all(REPO / "cluster" / "raycluster.yaml")
                if d["kind"] == "RayCluster")


@pytest.fixture
def raycluster(_raycluster: dict) -> dict:
    """The chart's default RayCluster (cluster/raycluster.yaml) to break in tests."""
    return copy.deepcopy(_raycluster)
