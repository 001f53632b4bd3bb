"""LoRA fine-tuning of open LLMs on Ray: the `ray-app` CLI and its Python API.

    import ray_app
    result = ray_app.train(ray_app.load_config(None, ["train.max_steps=10"]))

The API's functions are imported on first use, so `import ray_app` stays cheap (no Ray,
no torch).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any

__all__ = ["EstimateResult", "JobHandle", "RunResult", "estimate", "evaluate", "load_config",
           "merge", "prepare_data", "submit", "train", "tune"]
_HOMES = {name: "ray_app.api" for name in __all__} | {"JobHandle": "ray_app.submit"}
# API functions that share their name with a module of the package (the training core,
# the study, the memory model, the Jobs SDK client): the module is made callable as the
# function.
_CALLABLE_MODULES = ("estimate", "submit", "train", "tune")


class _CallableModule(types.ModuleType):
    """`ray_app.train(...)` calls the API function `ray_app.api.train`, while
    `ray_app.train` stays the subpackage for `import ray_app.train.loop`, `from
    ray_app.train.run import ...` and `mock.patch("ray_app.train.run....")`."""

    def _api_function(self):
        return getattr(importlib.import_module("ray_app.api"), self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._api_function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:  # help(), Jupyter's `?`, IDEs
        return inspect.signature(self._api_function())


def _callable(module: types.ModuleType) -> types.ModuleType:
    if type(module) is types.ModuleType:
        module.__class__ = _CallableModule
    return module


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_MODULES:
        return _callable(importlib.import_module(f"{__name__}.{name}"))
    if name not in _HOMES:
        raise AttributeError(f"module 'ray_app' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # The import system sets each imported submodule on its package: these become
        # callable on the way.
        if name in _CALLABLE_MODULES and isinstance(value, types.ModuleType):
            value = _callable(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
