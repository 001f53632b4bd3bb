"""`ray-app k8s render CONFIG` and `ray-app k8s validate FILE...`.

The main CLI wires these in with `ray_app.k8s.cli.register(subparsers)`; each subcommand sets
`func(args, console=None) -> int` (exit code 0 ok, 1 invalid manifests, 2 unusable input).
Output goes to stdout/stderr directly; problems are one short paragraph, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from ray_app.errors import UserError
from ray_app.k8s.render import GPUS_PER_NODE, PLACEMENT, render_manifests
from ray_app.k8s.validate import validate_manifest

DEFAULT_IMAGE = "ray-app:0.1.0"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `k8s` command (with `render` and `validate`) to an argparse subparsers object."""
    k8s = subparsers.add_parser(
        "k8s",
        help="render and validate KubeRay manifests",
        description="Render a fine-tune config as a KubeRay RayJob, or validate manifests.",
    )
    commands = k8s.add_subparsers(dest="k8s_command", metavar="{render,validate}", required=True)

    render = commands.add_parser(
        "render",
        help="RayJob (+ ConfigMap) for a config",
        description="Print a ConfigMap holding CONFIG and a RayJob that trains with it on its "
        "own RayCluster. Apply with `kubectl apply -f`.",
    )
    render.add_argument("config", help="fine-tune config YAML")
    render.add_argument(
        "--image", default=DEFAULT_IMAGE, help=f"Ray image (default {DEFAULT_IMAGE})"
    )
    render.add_argument(
        "--gpu-type",
        help=f"GPU model, sets GPUs per node and a Ray node label ({', '.join(GPUS_PER_NODE)})",
    )
    render.add_argument("--gpus-per-node", type=int, help="GPUs on one node (overrides --gpu-type)")
    render.add_argument("--namespace", default="default", help="namespace (default: default)")
    render.add_argument("--cloud", choices=sorted(PLACEMENT), help="add node selection for a cloud")
    render.add_argument("--spot", action="store_true", help="prefer spot GPUs, fall back on-demand")
    render.add_argument(
        "--submission-mode",
        choices=["HTTPMode", "SidecarMode", "K8sJobMode"],
        default="HTTPMode",
        help="how KubeRay submits the job (default HTTPMode)",
    )
    render.add_argument("--output", "-o", help="write to this file instead of stdout")
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


def _render(args: argparse.Namespace, console: Any = None) -> int:
    try:
        cfg = _read_config(Path(args.config))
        manifests = render_manifests(
            cfg,
            image=args.image,
            gpu_type=args.gpu_type,
            gpus_per_node=args.gpus_per_node,
            namespace=args.namespace,
            cloud=args.cloud,
            spot=args.spot,
            submission_mode=args.submission_mode,
        )
    except UserError as err:
        return _fail(str(err))
    problems = [p for m in manifests for p in validate_manifest(m)]
    if problems:  # a bug in render.py, not in the user's input
        return _fail("the rendered manifests are invalid: " + "; ".join(problems))
    text = yaml.safe_dump_all(manifests, sort_keys=False)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as err:
            return _fail(f"cannot write {args.output}: {err.strerror}")
        print(
            f"wrote {args.output}; apply it with: kubectl apply -f {args.output}", file=sys.stderr
        )
    else:
        sys.stdout.write(text)
    return 0


def _validate(args: argparse.Namespace, console: Any = None) -> int:
    documents = problems = 0
    for name in args.files:
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except OSError as err:
            return _fail(f"cannot read {name}: {err.strerror}")
        except yaml.YAMLError as err:
            return _fail(f"{name} is not valid YAML: {' '.join(str(err).split())}")
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


def _read_config(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UserError(f"config {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config {path} must be a YAML mapping of sections (run, model, ...)")
    return raw


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2
