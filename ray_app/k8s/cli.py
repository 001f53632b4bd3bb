"""`ray-app k8s render CONFIG` and `ray-app k8s validate FILE...`.

The main CLI wires these in with `ray_app.k8s.cli.register(subparsers)`; each subcommand sets
`func(args, console) -> int`: 0 ok, 1 invalid manifests; input the user must fix raises
UserError, which the main CLI prints and turns into exit code 2. This module imports without
jsonschema (the `k8s` extra), so that the commands can say how to install it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ray_app.errors import UserError


def _option(*flags: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    return flags, kwargs


# The options of `render`, kept in one table so that the header of a rendered file can repeat
# the exact command that made it.
_RENDER_OPTIONS = [
    _option("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
            help="override a config key, as for `ray-app train`"),
    _option("--command", choices=["train", "tune", "data"], default="train",
            help="what the job runs (default train)"),
    _option("-f", "--values", action="append", default=[], metavar="FILE",
            help="a values file of the chart, e.g. cluster/values-gke.yaml (node placement per "
            "cloud); several allowed"),
    _option("--image", help="Ray image with ray_app, REGISTRY/ray-app:TAG (default: the "
            "chart's image)"),
    _option("--gpu-type", help="GPU model: sets GPUs per node and the Ray node label "
            "ray.io/accelerator-type (H100, H200, B200, A100, L40S, L4, A10G)"),
    _option("--gpus-per-node", type=int, help="GPUs of one node (overrides --gpu-type's)"),
    _option("--spot", action="store_true", help="prefer spot GPU nodes, fall back to on-demand"),
    _option("--submission-mode", choices=["HTTPMode", "SidecarMode", "K8sJobMode"],
            default="HTTPMode", help="how KubeRay submits the job (default HTTPMode)"),
    _option("--cluster", metavar="NAME", help="run on this existing RayCluster instead of a "
            "new one; the job then reads the config from the shared volume"),
    _option("--chart", metavar="DIR", help="the chart folder (default: cluster/chart of this "
            "checkout)"),
    _option("-o", "--output", metavar="FILE", help="write to FILE instead of stdout"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `k8s` command (with `render` and `validate`) to an argparse subparsers object."""
    k8s = subparsers.add_parser(
        "k8s",
        help="render and validate KubeRay manifests (pip install 'ray-app[k8s]')",
        description="Render a fine-tune config as a KubeRay RayJob, or validate manifests.",
    )
    commands = k8s.add_subparsers(dest="k8s_command", metavar="{render,validate}", required=True)

    render = commands.add_parser(
        "render",
        help="RayJob (+ ConfigMap, NetworkPolicy) for a config, through the chart",
        description="Validate CONFIG, place its outputs on the cluster's shared storage, and "
        "render the chart cluster/chart as a RayJob that runs it on a RayCluster of its own. "
        "Apply the result with `kubectl apply -n NAMESPACE -f`.",
    )
    render.add_argument("config", help="fine-tune config YAML")
    for flags, kwargs in _RENDER_OPTIONS:
        render.add_argument(*flags, **kwargs)
    render.set_defaults(func=_render)

    validate = commands.add_parser(
        "validate",
        help="check manifests against KubeRay v1.7 and this project's rules",
        description="Check YAML manifests (several documents per file allowed; '-' reads "
        "stdin, e.g. `helm template ... | ray-app k8s validate -`).",
    )
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument(
        "--kuberay-only", action="store_true", help="skip this project's own rules"
    )
    validate.set_defaults(func=_validate)


def _validator() -> Callable[..., list[str]]:
    from ray_app.extras import check_installed

    check_installed("jsonschema", "ray-app k8s (checks manifests against the KubeRay CRD "
                    "schemas)")
    from ray_app.k8s.validate import validate_manifest

    return validate_manifest


def _render(args: argparse.Namespace, console: Any = None) -> int:
    validate_manifest = _validator()
    from ray_app.config import load_config
    from ray_app.k8s.helm import CHART
    from ray_app.k8s.render import render

    if args.cluster and (args.spot or args.gpu_type or args.gpus_per_node):
        raise UserError("--spot, --gpu-type and --gpus-per-node size a new cluster; with "
                        "--cluster the job runs on an existing one. Leave them out.")
    cfg = load_config(args.config, args.overrides)
    if args.command == "tune":  # as `ray-app tune` does, before anything is rendered
        from ray_app.tune.study import require_space

        require_space(cfg)
    out = render(
        cfg, command=args.command, chart=Path(args.chart) if args.chart else CHART,
        value_files=[Path(f) for f in args.values], image=args.image, gpu_type=args.gpu_type,
        gpus_per_node=args.gpus_per_node, spot=args.spot, submission_mode=args.submission_mode,
        cluster=args.cluster, overrides=args.overrides,
    )
    problems = [p for doc in out.documents() for p in validate_manifest(doc)]
    if problems:
        raise UserError("the rendered manifests break these rules (check the values files): "
                        + "; ".join(problems))
    where = out.placement.describe(cfg.run.name)
    apply = f"kubectl apply -n NAMESPACE -f {args.output or 'FILE'}"
    header = [f"# Generated by: {_command_line(args)}", f"# Apply: {apply}",
              f"# Watch: kubectl get rayjob -n NAMESPACE {out.name} -w", f"# Outputs: {where}"]
    if args.cluster:
        header.append(f"# Needs the config on the shared volume: kubectl cp {args.config} "
                      f"<head pod of {args.cluster}>:{out.config_path}")
    text = "\n".join(header) + "\n" + out.text
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as err:
            raise UserError(f"cannot write {args.output}: {err.strerror}") from None
        print(f"wrote {args.output}; apply it with: {apply}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    print(f"RayJob {out.name}: {where}", file=sys.stderr)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The `ray-app k8s render` command that gives `args`, options in table order."""
    parts = ["ray-app", "k8s", "render", args.config]
    for flags, kwargs in _RENDER_OPTIONS:
        flag = flags[0]
        value = getattr(args, kwargs.get("dest") or flags[-1].lstrip("-").replace("-", "_"))
        if value in (None, False, [], kwargs.get("default")):
            continue
        if value is True:
            parts.append(flag)
        else:
            for item in value if isinstance(value, list) else [value]:
                parts += [flag, str(item)]
    return shlex.join(parts)


def _validate(args: argparse.Namespace, console: Any = None) -> int:
    validate_manifest = _validator()
    documents = problems = 0
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except OSError as err:
            raise UserError(f"cannot read {name}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise UserError(f"{name} is not valid YAML: {' '.join(str(err).split())}") from None
        for doc in docs:
            documents += 1
            for problem in validate_manifest(doc, project_rules=not args.kuberay_only):
                problems += 1
                print(f"{name}: {problem}")
    if problems:
        print(f"{problems} problem(s) in {documents} document(s)", file=sys.stderr)
        return 1
    print(f"{documents} document(s) valid", file=sys.stderr)
    return 0
