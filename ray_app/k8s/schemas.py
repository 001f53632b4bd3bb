"""The KubeRay CRD schemas (v1.7.0) shipped in ray_app/k8s/crds/, loaded once per process.

The files are unmodified copies of KubeRay's generated CRDs; crds/SOURCE.md records where they
come from. Each is about 1 MB, so parsing is cached.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

KUBERAY_VERSION = "1.7.0"
GROUP = "ray.io"
CRD_DIR = Path(__file__).with_name("crds")

_CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
KINDS = tuple(_CRD_FILES)

# The C loader parses the 1.4 MB RayJob CRD about ten times faster than the pure-Python one.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def crd_path(kind: str) -> Path:
    """Path of the CRD file for `kind` (RayCluster, RayJob or RayService)."""
    if kind not in _CRD_FILES:
        raise KeyError(f"no KubeRay CRD for kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return CRD_DIR / _CRD_FILES[kind]


@cache
def load_crd(kind: str) -> dict[str, Any]:
    """The whole CustomResourceDefinition document for `kind`."""
    with crd_path(kind).open(encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def served_versions(kind: str) -> list[str]:
    """API versions the CRD serves, e.g. ['v1', 'v1alpha1']."""
    return [v["name"] for v in load_crd(kind)["spec"]["versions"] if v.get("served")]


def openapi_schema(kind: str, version: str = "v1") -> dict[str, Any]:
    """The CRD's openAPIV3Schema for one served version (not a copy: do not mutate it)."""
    for entry in load_crd(kind)["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{kind} has no version {version!r}; served: {served_versions(kind)}")
