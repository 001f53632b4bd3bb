"""The driver side of a study: data once, then Ray Tune runs one training run per trial.

    validate -> tokenize once (the cache every trial reads) -> Tuner (or Tuner.restore)
      -> per trial: ray_app.tune.trial.run_trial -> TorchTrainer -> per-worker loop
      -> tune_summary.json, best_config.yaml, trials.png

The study's Tune state lives in `<run.storage_path>/<run.name>-tune`; `--resume`
restores it, so finished trials are kept and cut-off ones continue from their checkpoints.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from rich.console import Console

from ray_app.config import Config
from ray_app.data import storage
from ray_app.data.pipeline import prepare
from ray_app.data.report import render_report
from ray_app.display import status
from ray_app.errors import MissingPackage, UserError
from ray_app.extras import check_installed, check_packages, require
from ray_app.model.prepare import check_tokenizer, materialise_builtin
from ray_app.secrets import redact
from ray_app.summary import write_summary
from ray_app.train.lease import RunLease
from ray_app.train.methods import method_for
from ray_app.train.plan import plan_steps
from ray_app.train.run import export_adapter
from ray_app.train.tracking import tune_callbacks
from ray_app.tune.capacity import concurrent_trials, driver_resources
from ray_app.tune.plot import plot_trials
from ray_app.tune.results import best_trial, collect_trials, render_study, write_best_config
from ray_app.tune.space import param_space, study_base, trial_config
from ray_app.tune.table import INTERRUPTED, PENDING, TrialTable
from ray_app.tune.trial import StudySetup, run_trial

STUDY_FILE = "ray_app_study.json"
# The trial table replaces Tune's own console reporter.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def study_path(cfg: Config) -> str:
    return f"{cfg.storage_uri().rstrip('/')}/{cfg.run.name}-tune"


def require_space(cfg: Config) -> None:
    if not cfg.tune.space:
        raise UserError("tune.space is empty: give at least one config key to search, e.g. "
                        "tune: {space: {train.lr: {loguniform: [1.0e-5, 1.0e-3]}}}. "
                        "See docs/tune.md.")


def check_study(cfg: Config) -> None:
    """Everything a study needs that can be checked before Ray starts: a search space, and
    the packages its settings need."""
    require_space(cfg)
    reported = ("loss", "eval_loss", *(f"eval_{name}" for name in method_for(cfg).SUMMARY))
    if cfg.tune.metric not in reported:
        raise UserError(f"tune.metric: {cfg.tune.metric} is not reported by train.method: "
                        f"{cfg.train.method}; it reports {', '.join(reported)}.")
    check_packages(cfg)
    if cfg.tune.search == "optuna":
        check_installed("optuna", "tune.search: optuna", "use tune.search: random")


def run_study(cfg: Config, console: Console, resume: bool = False,
              callbacks: Sequence[tune.Callback] = ()) -> dict[str, Any]:
    """Runs (or with `resume`, continues) the study of `cfg.tune`; returns tune_summary.json's
    content. `callbacks`: more Tune callbacks for the driver (not kept with the study)."""
    check_study(cfg)
    output = cfg.output_path()
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = check_tokenizer(cfg)
    # One lease for the name: a study and a `ray-app train` of one name exclude each other.
    with RunLease(cfg.storage_uri(), cfg.run.name, "tune") as lease:
        if lease.warning:
            console.print(f"[yellow]{lease.warning}[/yellow]", highlight=False)
        return _study(cfg, console, resume, callbacks, tokenizer, output)


def _study(cfg: Config, console: Console, resume: bool, callbacks: Sequence[tune.Callback],
           tokenizer, output: Path) -> dict[str, Any]:
    path = study_path(cfg)
    restoring = _check_study(cfg, path, resume)
    with status(console, "Reading, validating and tokenizing the data with Ray Data..."):
        data = prepare(cfg, cfg.storage_uri(), output / "rejects", method_for(cfg).record_kind)
    render_report(data.report, console, cached=data.cached, rejects_dir=output / "rejects")
    model = materialise_builtin(cfg, tokenizer, output).model
    base = study_base(cfg)
    workers = base["scaling"]["num_workers"]
    plan = plan_steps(cfg, data.report.train_sequences, data.report.eval_records, workers)
    if cfg.tune.metric.startswith("eval") and not plan.has_eval:
        raise UserError(f"tune.metric={cfg.tune.metric} needs eval data: set data.eval or "
                        "data.eval_fraction, or use tune.metric: loss.")
    concurrency, why = concurrent_trials(cfg, ray.cluster_resources())
    setup = StudySetup(base=base, data=data, model=model.model_dump(mode="json"),
                       study=cfg.run.name, trials_dir=str(output / "trials"),
                       metric=cfg.tune.metric)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                    driver_resources(cfg))
    table = TrialTable(console, list(cfg.tune.space), cfg.tune.metric, cfg.tune.mode)
    console.print(f"{'Resuming' if restoring else 'Starting'} study {cfg.run.name!r}: "
                  f"{cfg.tune.num_samples} sample(s), {cfg.tune.search} search, scheduler "
                  f"{cfg.tune.scheduler}, {workers} worker(s) per trial, {concurrency} at once "
                  f"({why}); state in {redact(path)}")
    callbacks = [table, *tune_callbacks(cfg), *callbacks]
    if restoring:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
        # Tune keeps the callbacks pickled at the first start; the console is this process's.
        tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable, param_space=param_space(cfg.tune),
            tune_config=_tune_config(cfg, concurrency, plan.total_steps),
            run_config=tune.RunConfig(
                name=path.rsplit("/", 1)[-1], storage_path=path.rsplit("/", 1)[0],
                callbacks=callbacks, verbose=0,
                # Ray Train already retried the trial's workers from checkpoints.
                failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()

    trials = collect_trials(grid, table, cfg, output / "trials")
    best = best_trial(trials, cfg.tune.metric, cfg.tune.mode)
    summary: dict[str, Any] = {
        "status": INTERRUPTED if any(t["status"] in (INTERRUPTED, PENDING) for t in trials)
        else "finished",
        "study": {"name": cfg.run.name, "path": path, "resumed": restoring,
                  "metric": cfg.tune.metric, "mode": cfg.tune.mode,
                  "search": cfg.tune.search, "scheduler": cfg.tune.scheduler,
                  "num_samples": cfg.tune.num_samples, "workers_per_trial": workers,
                  "max_concurrent_trials": concurrency, "concurrency_from": why,
                  "planned_steps": plan.total_steps},
        "data": {"path": data.path, "fingerprint": data.fingerprint,
                 "cached": data.cached, "prepare_calls": 1,
                 "trials_on_it": sorted({_data_cache(t) for t in trials} - {None})},
        "best": None, "plot": None, "trials": trials,
        "config": cfg.model_dump(mode="json"),
    }
    if best:
        if best["adapter_path"] is None and best["checkpoint"]:
            best["adapter_path"] = str(_export_best(cfg, base, best, model))
        config_path = write_best_config(cfg, best, output / "best_config.yaml")
        summary["best"] = {**{k: best[k] for k in ("trial_id", "run_name", "values", "step",
                                                    cfg.tune.metric, "adapter_path",
                                                    "checkpoint")},
                           "config_path": str(config_path)}
    summary["plot"] = write_plot(trials, cfg.tune.metric, best["trial_id"] if best else None,
                                 output / "trials.png", console)
    summary_path = output / "tune_summary.json"
    write_summary(summary_path, summary)
    render_study(summary, console, summary_path)
    return summary


def write_plot(trials: list[dict[str, Any]], metric: str, best_id: str | None, path: Path,
               console: Console) -> str | None:
    """trials.png, or None: no trial reported the metric, or matplotlib (the `plot` extra)
    is missing, which the study's results do without; the console says how to get it."""
    if not any(t["history"] for t in trials):
        return None
    try:
        return str(plot_trials(trials, metric, best_id, path))
    except MissingPackage as err:
        console.print(f"No {path.name}: {err}", style="yellow", markup=False, highlight=False)
        return None


def _tune_config(cfg: Config, concurrency: int, planned_steps: int) -> tune.TuneConfig:
    t = cfg.tune
    search = None
    if t.search == "optuna":
        # Ray's module imports without optuna and fails only when the searcher is built.
        require("optuna", "tune.search: optuna", "use tune.search: random")
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=cfg.train.seed)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="step", grace_period=t.grace_period or cfg.train.eval_every or 1,
            reduction_factor=t.reduction_factor,
            # Rungs end before the last step: a trial stopped at its final report would be
            # killed while it exports its adapter. Trials are not cut at max_t.
            max_t=max(planned_steps - 1, t.grace_period or 1), stop_last_trials=False)
    return tune.TuneConfig(
        metric=t.metric, mode=t.mode, num_samples=t.num_samples, search_alg=search,
        scheduler=scheduler, max_concurrent_trials=concurrency,
        trial_dirname_creator=lambda trial: trial.trial_id,
        trial_name_creator=lambda trial: trial.trial_id,
    )


def _check_study(cfg: Config, path: str, resume: bool) -> bool:
    """True when an existing study is to be resumed. A study is the config it was started
    with: resuming with other settings, or restarting one by accident, is refused."""
    record = f"{path}/{STUDY_FILE}"
    # Trackers may change on resume; secrets are masked (the record is in storage).
    mine = redact(cfg.model_dump(mode="json", exclude={"run": {"output_dir"}, "tracking": True}))
    exists = tune.Tuner.can_restore(path)
    if exists and not resume:
        raise UserError(f"Study {cfg.run.name!r} already exists in {redact(path)}. Resume it with "
                        "--resume, or choose a new run.name to start another.")
    if exists and storage.exists(record):
        theirs = json.loads(storage.read_text(record))
        if theirs != mine:
            raise UserError(f"Study {cfg.run.name!r} in {redact(path)} was started with other "
                            "settings; resuming needs the same config. Choose a new run.name "
                            "for a new study.")
    if not exists:
        storage.write_text(record, json.dumps(mine, indent=2, sort_keys=True))
    return exists


def _export_best(cfg: Config, base: dict[str, Any], best: dict[str, Any], model) -> Path:
    """The best trial was stopped at its very last report, before it exported its adapter:
    take it from the trial's final checkpoint."""
    trial_cfg = trial_config(base, best["values"], cfg.run.name, best["trial_id"],
                             best["output"])
    trial_cfg = trial_cfg.model_copy(update={"model": model})
    return export_adapter(trial_cfg, ray.train.Checkpoint(best["checkpoint"]),
                          Path(best["output"]) / "final")


def _data_cache(trial: dict[str, Any]) -> str | None:
    summary = Path(trial["output"]) / "run_summary.json"
    if not summary.exists():
        return None
    return json.loads(summary.read_text()).get("data_cache")
