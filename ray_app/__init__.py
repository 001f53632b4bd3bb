"""LoRA fine-tuning of open LLMs on Ray: the `ray-app` CLI and its Python API.

    import ray_app
    result = ray_app.train(ray_app.load_config(None, ["train.max_steps=10"]))

The API's functions are imported on first use, so `import ray_app` stays cheap (no Ray,
no torch).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["EstimateResult", "JobHandle", "RunResult", "estimate", "evaluate", "load_config",
           "merge", "prepare_data", "submit", "train", "tune"]
_HOMES = {name: "ray_app.api" for name in __all__} | {"JobHandle": "ray_app.submit"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ray_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    """`ray_app.train`, `.tune` and `.estimate` are API functions and also the names of
    subpackages: importing a subpackage must not replace the function on the package.
    The subpackages stay importable (`from ray_app.train.run import ...`)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
