"""Optional packages: the extra of pyproject.toml that brings each, and the error naming it.

`pip install ray-app` is enough to train (the quickstart included). The rest is optional
and imported inside the function that uses it, through `require` (or checked up front,
before any Ray work, with `check_installed`), so a missing package fails with the one line
to run instead of a traceback:

    sacrebleu = require("sacrebleu", "ray-app eval (BLEU)")
    # or MissingPackage: ray-app eval (BLEU) needs sacrebleu, which is not installed.
    #   Install it: pip install 'ray-app[eval]' (in a source checkout: pip install -e '.[eval]').

`check_packages(cfg)` does that for every optional package a config's settings need. The
table `OPTIONAL` is kept true by tests/test_packaging.py: each module's distribution is in
its extra in pyproject.toml, and every optional import in ray_app/ is listed here.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING

from ray_app.errors import MissingPackage

if TYPE_CHECKING:
    from ray_app.config import Config

# import name -> (extra, distribution)
OPTIONAL: dict[str, tuple[str, str]] = {
    "rouge_score": ("eval", "rouge-score"),
    "sacrebleu": ("eval", "sacrebleu"),
    "matplotlib": ("plot", "matplotlib"),
    "optuna": ("tune", "optuna"),
    "tensorboardX": ("tracking", "tensorboardX"),
    "mlflow": ("tracking", "mlflow-skinny"),
    "wandb": ("tracking", "wandb"),
    "jsonschema": ("k8s", "jsonschema"),
    "deepspeed": ("gpu", "deepspeed"),
    "bitsandbytes": ("gpu", "bitsandbytes"),
    "liger_kernel": ("gpu", "liger-kernel"),
    "triton": ("gpu", "triton"),
}
# tracking.backends -> the module each one logs through
TRACKERS = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def missing_package(module: str, needed_for: str, instead: str = "") -> MissingPackage:
    """The error for optional `module` (dotted names: its top-level package) not installed.
    `needed_for` says what needs it; `instead`, another way out, e.g. a setting to change."""
    top = module.split(".")[0]
    extra, dist = OPTIONAL[top]
    what = top if dist == top else f"{top} (package {dist})"
    other = f", or {instead}" if instead else ""
    return MissingPackage(
        f"{needed_for} needs {what}, which is not installed. Install it: pip install "
        f"'ray-app[{extra}]' (in a source checkout: pip install -e '.[{extra}]'){other}.",
        top, extra)


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except ImportError:  # an import hook that refuses it
        return False


def check_installed(module: str, needed_for: str, instead: str = "") -> None:
    """Raises MissingPackage unless optional `module` is installed; imports nothing, so it is
    cheap enough to call for every need before Ray starts."""
    if not installed(module):
        raise missing_package(module, needed_for, instead)


def require(module: str, needed_for: str, instead: str = "") -> ModuleType:
    """Imports optional `module` (e.g. "rouge_score.rouge_scorer"), or raises MissingPackage
    with the pip line of its extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and err.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there, and something it imports is broken: show that
        raise missing_package(module, needed_for, instead) from None


def check_packages(cfg: Config) -> None:
    """Names the first optional package this config's settings need that is not installed,
    before any Ray work, instead of a worker traceback."""
    needs = [
        ("deepspeed", "scaling.strategy: deepspeed", cfg.scaling.strategy == "deepspeed", ""),
        ("bitsandbytes", "model.quantization: nf4", cfg.model.quantization == "nf4", ""),
        ("bitsandbytes", f"train.optimizer: {cfg.train.optimizer}",
         cfg.train.optimizer in ("adamw_8bit", "paged_adamw_8bit"), ""),
        ("liger_kernel", "model.liger: on", cfg.model.liger == "on", ""),
        ("triton", "model.precision: fp8", cfg.model.precision == "fp8",
         "set model.precision: default"),
        *((TRACKERS[b], f"tracking.backends: {b}", True, "remove it from tracking.backends")
          for b in cfg.tracking.backends),
    ]
    for module, needed_for, needed, instead in needs:
        if needed:
            check_installed(module, needed_for, instead)
