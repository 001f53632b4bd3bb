"""One trial: a whole `ray-app train` run with the sampled settings, driven from a Tune actor.

The trial's function builds and fits a TorchTrainer exactly as `ray-app train` does
(strategies, QLoRA, failure and preemption recovery all apply) on the dataset the study
prepared once. Its Ray Train run is named `<run.name>-<trial id>`, so a trial cut off by an
interrupted study continues from its own last checkpoint when the study is resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from ray_app.data.pipeline import PreparedData
from ray_app.summary import write_summary
from ray_app.train.identity import check_run_identity
from ray_app.train.methods import method_for
from ray_app.train.plan import plan_steps
from ray_app.train.progress import start_hub
from ray_app.train.run import build_trainer, finish, fit
from ray_app.tune.space import trial_config


@dataclass(frozen=True)
class StudySetup:
    """What every trial shares, prepared once on the study's driver."""

    base: dict[str, Any]  # the config without the tune section (see space.study_base)
    data: PreparedData
    model: dict[str, Any]  # model section to train with (the saved built-in base, if any)
    study: str  # run.name of the study
    trials_dir: str  # <output>/trials
    metric: str


class TrialFailed(RuntimeError):
    """The trial's training run failed; Tune records the trial as errored and goes on."""


class MetricForwarder(TuneReportCallback):
    """Hands rank 0's reports that carry the study's metric to Tune.

    Tune requires the metric in every result it is given, and the loop also reports
    loss-only steps between evaluations; those stay in the trial's own progress hub."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and metrics[0].get(self.metric) is not None:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(values: dict[str, Any], setup: StudySetup) -> None:
    """Tune's trial function: `values` are the sampled dotted keys of this trial."""
    trial_id = ray.tune.get_context().get_trial_id()
    output = Path(setup.trials_dir) / trial_id
    cfg = trial_config(setup.base, values, setup.study, trial_id, str(output))
    output.mkdir(parents=True, exist_ok=True)
    check_run_identity(cfg)  # a resumed study continues this trial's own run
    cfg = cfg.model_copy(update={"model": cfg.model.model_validate(setup.model)})
    data = setup.data
    plan = plan_steps(cfg, data.report.train_sequences, data.report.eval_records,
                      cfg.scaling.num_workers)
    hub = start_hub(cfg.run.name)
    trainer = build_trainer(cfg, method_for(cfg), data, plan.to_dict(), hub,
                            callbacks=(MetricForwarder(setup.metric),))
    result = fit(trainer)
    summary = finish(cfg, data, result, output, hub)
    summary["data_cache"] = data.path
    write_summary(output / "run_summary.json", summary)
    if result.error:
        raise TrialFailed(summary["error"])
