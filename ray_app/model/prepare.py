"""The run's tokenizer and base model, made ready on the driver before any Ray work.

Shared by `ray-app train`, `ray-app tune` and `ray-app eval`: the tokenizer is loaded once
on the driver so that a wrong path fails in a second, and the built-in quickstart base is
written to a folder that workers and actors load with `from_pretrained` like any other.
"""

from __future__ import annotations

from pathlib import Path

from ray_app.config import BUILTIN_TINY_LLAMA, Config
from ray_app.data.pipeline import tokenizer_path
from ray_app.data.tokenize import load_tokenizer
from ray_app.errors import UserError


def check_tokenizer(cfg: Config):
    """Loads the tokenizer on the driver, so a wrong path fails before any Ray work."""
    try:
        return load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.tokenizer / model.name_or_path: cannot load a tokenizer from "
            f"{tokenizer_path(cfg)!r} ({str(err).splitlines()[0]}). Give a hub id or a local "
            "folder with tokenizer files; set HF_TOKEN for gated models."
        ) from None


def materialise_builtin(cfg: Config, tokenizer, output: Path) -> Config:
    """Saves the built-in base model so workers load it with `from_pretrained`."""
    if cfg.model.name_or_path != BUILTIN_TINY_LLAMA:
        return cfg
    from ray_app.model.loading import save_builtin_base

    folder = save_builtin_base(tokenizer, str(output / "base_model"), cfg.train.seed)
    model = cfg.model.model_copy(update={"name_or_path": folder, "tokenizer": folder})
    return cfg.model_copy(update={"model": model})
