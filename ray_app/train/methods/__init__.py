"""Training methods, by the name `train.method` gives (see `base.TrainingMethod`)."""

from __future__ import annotations

from ray_app.config import Config
from ray_app.errors import UserError
from ray_app.train.methods.base import TrainingMethod
from ray_app.train.methods.dpo import DPO
from ray_app.train.methods.kto import KTO
from ray_app.train.methods.orpo import ORPO
from ray_app.train.methods.sft import SFT
from ray_app.train.methods.simpo import SimPO

METHODS: dict[str, type[TrainingMethod]] = {
    "sft": SFT,
    "dpo": DPO,
    "orpo": ORPO,
    "simpo": SimPO,
    "kto": KTO,
}


def method_for(cfg: Config) -> TrainingMethod:
    """The method of `cfg.train.method`, or a UserError naming the known ones."""
    try:
        return METHODS[cfg.train.method](cfg)
    except KeyError:
        raise UserError(f"train.method: unknown method {cfg.train.method!r}; known: "
                        f"{', '.join(METHODS)}.") from None
