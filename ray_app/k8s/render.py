"""A fine-tune config as KubeRay manifests, rendered by the chart cluster/chart.

The chart is the one source of the manifests: the config is validated first (an unknown key
fails as in `ray-app train`), its storage placed on the cluster's shared storage (storage.py),
the chart values derived from it (values.py), and `helm template` (helm.py) renders a
ConfigMap holding the config, the RayJob with its own RayCluster, and their NetworkPolicy.

Example:
    out = render(load_config("jobs/configs/example.yaml"), spot=True, gpu_type="H100")
    print(out.placement.describe("llama-lora")); print(out.text)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_app.config import Config, validate_config
from ray_app.k8s.helm import CHART, chart_values, check_chart, template
from ray_app.k8s.storage import Placement
from ray_app.k8s.values import job_name, job_values


@dataclass(frozen=True)
class Rendered:
    """What `helm template` printed for one job, and where the job's outputs land."""

    name: str
    text: str
    placement: Placement
    config_path: str | None  # the config on the shared volume, for a job on an existing cluster

    def documents(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.text) if d]


def render(
    cfg: Config | Mapping[str, Any],
    *,
    command: str = "train",
    chart: Path = CHART,
    value_files: Sequence[Path] = (),
    **options: Any,
) -> Rendered:
    """The manifests of a RayJob running `ray-app COMMAND` on `cfg`.

    `value_files` are the chart's values files (e.g. cluster/values-gke.yaml), applied before
    the values from the config; `options` are those of `values.job_values` (image, gpu_type,
    gpus_per_node, spot, submission_mode, cluster).
    """
    if not isinstance(cfg, Config):
        cfg = validate_config(dict(cfg))
    chart = check_chart(chart)
    value_files = list(value_files)
    values, placement = job_values(
        cfg, chart=chart_values(chart, value_files), command=command, **options)
    name = job_name(cfg.run.name, command)
    text = template(chart, values, release=name, value_files=value_files)
    return Rendered(name, text, placement, values["job"].get("configPath"))


def render_manifests(cfg: Config | Mapping[str, Any], **options: Any) -> list[dict[str, Any]]:
    """The rendered manifests as dicts; arguments as for `render`."""
    return render(cfg, **options).documents()
