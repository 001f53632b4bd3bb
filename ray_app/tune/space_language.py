"""The `tune.space` language: what a search-space entry may say, and which keys it may vary.

A space maps a dotted config key to one distribution, written in YAML as
`train.lr: {loguniform: [1.0e-5, 1.0e-3]}`. This module holds the language and its rules:
the distributions (`Distribution`), their bounds, the keys a study cannot vary
(`FIXED_IN_A_STUDY`) and the check that every value a distribution can draw is one its key
takes (`space_problems`). `ray_app.tune.space` turns a checked space into Ray Tune domains.

Why here and not in `ray_app.config`: the space is Tune's language, and config should not
grow with it. Config still validates the `tune` section once, before Ray starts, so it
imports this module: it is pure pydantic (no Ray, no torch) and imports nothing of
`ray_app` at import time, and `ray_app/tune/__init__.py` stays empty, so importing it costs
config nothing and cannot loop back. The checks that need the whole config receive it as an
argument instead of importing `Config`.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer, model_validator

if TYPE_CHECKING:
    from ray_app.config import Config

DISTRIBUTIONS = {
    "loguniform": "[low, high]: floats, log scale (low > 0)",
    "uniform": "[low, high]: floats",
    "randint": "[low, high]: integers from low to high - 1",
    "choice": "[a, b, ...]: one of the values, sampled",
    "grid": "[a, b, ...]: every value, each in its own trials (random search only)",
}
# Keys a trial may not change: data settings and the tokenizer would each need their own
# tokenized dataset (prepared once per study), run settings name the study itself, and the
# worker count and resources decide how many trials fit the cluster.
FIXED_IN_A_STUDY = ("data.", "run.", "tune.", "tracking.", "model.name_or_path", "model.tokenizer",
                    "train.method",
                    "scaling.num_workers", "scaling.min_workers", "scaling.use_gpu",
                    "scaling.resources_per_worker")


class Distribution(BaseModel):
    """One search-space entry, written in YAML as `{loguniform: [1.0e-5, 1.0e-3]}`."""

    model_config = ConfigDict(frozen=True)
    kind: str
    values: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and set(raw) == {"kind", "values"}:
            return raw
        if not isinstance(raw, dict) or len(raw) != 1:
            raise ValueError("must be one distribution, e.g. {loguniform: [1.0e-5, 1.0e-3]} or "
                             f"{{choice: [8, 16]}}; distributions: {', '.join(DISTRIBUTIONS)}")
        (kind, values), = raw.items()
        if kind not in DISTRIBUTIONS:
            hint = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown distribution {kind!r}{did} Allowed: "
                             + "; ".join(f"{k} {v}" for k, v in DISTRIBUTIONS.items()))
        if not isinstance(values, list) or not values:
            raise ValueError(f"{kind} takes a non-empty list: {kind} {DISTRIBUTIONS[kind]}")
        if kind in ("loguniform", "uniform", "randint"):
            _check_bounds(kind, values)
        return {"kind": kind, "values": values}

    @model_serializer
    def _as_yaml(self) -> dict[str, list[Any]]:
        return {self.kind: self.values}

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range when checked against the config: both
        bounds, and for continuous ranges a non-integer inside them."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        low, high = self.values
        if self.kind == "randint":
            return [low, high - 1]
        return [float(low), float(high), low + (high - low) * 0.37]


def _check_bounds(kind: str, values: list[Any]) -> None:
    number = int if kind == "randint" else (int, float)
    if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool)
                                   for v in values):
        raise ValueError(f"{kind} takes {DISTRIBUTIONS[kind]}, got {values!r}")
    low, high = values
    if not low < high:
        raise ValueError(f"{kind} bounds must satisfy low < high, got low={low}, high={high}")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"loguniform needs low > 0 (log scale), got low={low}")


def grid_problem(space: dict[str, Distribution], search: str) -> str | None:
    """Optuna's TPE samples; it cannot enumerate grid entries."""
    grids = [key for key, dist in space.items() if dist.kind == "grid"]
    if grids and search == "optuna":
        return (f"search=optuna cannot run grid entries ({', '.join(grids)}); use choice for "
                "them, or search: random")
    return None


def config_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every settable dotted key of a config model, nested sections included
    (`train.lr`, `train.simpo.gamma`, `lora.use_dora`)."""
    keys = []
    for name, field in section.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys += config_keys(kind, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def with_value(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of the config dict `raw` with the dotted `key` set to `value` (the dicts on
    its path copied, the rest shared)."""
    head, _, rest = key.partition(".")
    return {**raw, head: with_value(raw[head], rest, value) if rest else value}


def space_problems(cfg: Config) -> list[str]:
    """One message per `tune.space` entry of `cfg` that a study cannot run: an unknown key,
    a key fixed in a study, or a range that draws values the key does not take."""
    problems = [_key_problem(cfg, key, dist) for key, dist in cfg.tune.space.items()]
    return [p for p in problems if p]


def _key_problem(cfg: Config, key: str, dist: Distribution) -> str | None:
    config = type(cfg)
    where = f"tune.space.{key}"
    known = config_keys(config)
    if key not in known:
        hint = difflib.get_close_matches(key, known, n=1)
        did = f"; did you mean {hint[0]!r}?" if hint else ""
        return f"{where}: {key!r} is not a config key{did} Use section.key, e.g. train.lr."
    if key.startswith(FIXED_IN_A_STUDY):
        return (f"{where}: {key} cannot vary between trials: every trial trains on the one "
                "tokenized dataset of the study and fits the same resources. Set it outside "
                "tune.space (run one study per value).")
    base = cfg.model_dump(mode="json", exclude={"tune"})
    for value in dist.candidates():
        try:
            config.model_validate(with_value(base, key, value))
        except ValidationError as err:
            reason = err.errors()[0]["msg"]
            fix = ("Use randint or choice for whole numbers." if "integer" in reason
                   else f"Keep the range inside what {key} allows.")
            return (f"{where}: {dist.kind} {dist.values!r} allows {value!r}, which {key} does "
                    f"not take ({reason}). {fix}")
    return None
