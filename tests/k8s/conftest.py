"""Fixtures for the KubeRay tests: a helm runner and valid base manifests to break."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

from ray_app.k8s.render import render_rayjob

REPO = Path(__file__).resolve().parents[2]

# helm.py is loaded by path so the tests work under any pytest import mode.
_spec = importlib.util.spec_from_file_location("k8s_test_helm", Path(__file__).with_name("helm.py"))
helm_support = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helm_support)

_GPU_CONFIG = {
    "run": {"name": "llama-lora", "storage_path": "/mnt/shared/checkpoints"},
    "scaling": {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}},
}


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory):
    binary, reason = helm_support.find_helm()
    if binary is None:
        pytest.skip(reason)
    return helm_support.Helm(binary, tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def _rayjob() -> dict:
    return render_rayjob(_GPU_CONFIG, image="ray-app:0.1.0", gpu_type="H100", spot=True)


@pytest.fixture
def rayjob(_rayjob: dict) -> dict:
    """A valid RayJob (HTTPMode, own cluster, spot + on-demand GPU groups) to break in tests."""
    return copy.deepcopy(_rayjob)


@pytest.fixture(scope="session")
def _raycluster() -> dict:
    docs = yaml.safe_load_all((REPO / "cluster" / "raycluster.yaml").read_text())
    return next(d for d in docs if d and d["kind"] == "RayCluster")


@pytest.fixture
def raycluster(_raycluster: dict) -> dict:
    """The chart's default RayCluster (cluster/raycluster.yaml) to break in tests."""
    return copy.deepcopy(_raycluster)
