"""The `tune.space` section in Ray Tune's terms, and the config of one trial."""

from __future__ import annotations

import copy
from typing import Any

from ray import tune

from ray_app.config import Config, TuneSection, validate_config
from ray_app.tune.space_language import with_value

_DOMAINS = {
    "loguniform": lambda values: tune.loguniform(*values),
    "uniform": lambda values: tune.uniform(*values),
    "randint": lambda values: tune.randint(*values),
    "choice": tune.choice,
    "grid": tune.grid_search,
}
_RUN_NAME_LIMIT = 63  # RunSection.name allows 63 characters


def param_space(section: TuneSection) -> dict[str, Any]:
    """Dotted config key -> Tune domain, e.g. {"train.lr": tune.loguniform(1e-5, 1e-3)}."""
    return {key: _DOMAINS[dist.kind](dist.values) for key, dist in section.space.items()}


def study_base(cfg: Config) -> dict[str, Any]:
    """The config every trial starts from: no tune section, storage as an absolute path
    (trial drivers run in other working directories), tune.workers_per_trial applied."""
    base = cfg.model_dump(mode="json", exclude={"tune"})
    base["run"]["storage_path"] = cfg.storage_uri()
    workers = cfg.tune.workers_per_trial
    if workers:
        base["scaling"]["num_workers"] = workers
        if (base["scaling"]["min_workers"] or 0) > workers:
            base["scaling"]["min_workers"] = None
    return base


def with_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """`base` with each dotted key of `values` set (`train.lr`, `train.simpo.beta`)."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        raw = with_value(raw, key, value)
    return raw


def trial_run_name(study: str, trial_id: str) -> str:
    """`<run.name>-<trial id>`: the trial's own Ray Train run, resumable by that name."""
    return f"{study[:_RUN_NAME_LIMIT - len(trial_id) - 1]}-{trial_id}"


def trial_config(base: dict[str, Any], values: dict[str, Any], study: str, trial_id: str,
                 output_dir: str) -> Config:
    raw = with_values(base, values)
    raw["run"]["name"] = trial_run_name(study, trial_id)
    raw["run"]["output_dir"] = output_dir
    return validate_config(raw, source=f"trial {trial_id}")


def sampled(config: dict[str, Any], section: TuneSection) -> dict[str, Any]:
    """The sampled values of a Tune trial config, in tune.space order."""
    return {key: config[key] for key in section.space if key in config}
