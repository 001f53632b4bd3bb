"""What a study leaves behind: every trial's record, the best trial, its ready-to-run config.

    <output>/tune_summary.json    all trials: sampled values, status, steps, metric history,
                                  adapter, checkpoint; the best trial; the shared dataset
    <output>/best_config.yaml     the best trial's settings as a config for `ray-app train`
    <output>/trials/<trial id>/   each trial's run_summary.json and adapter (final/)
    <output>/trials.png           the metric per trial over steps
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from ray_app.config import Config, validate_config
from ray_app.tune.space import sampled, study_base, trial_run_name, with_values
from ray_app.tune.table import COMPLETED, INTERRUPTED, PENDING, TrialTable


def collect_trials(grid, table: TrialTable, cfg: Config, trials_dir: Path) -> list[dict[str, Any]]:
    """One record per trial, from Tune's stored results and the table's statuses."""
    metric = cfg.tune.metric
    better = min if cfg.tune.mode == "min" else max
    statuses = table.statuses()
    out = []
    for result in grid:
        trial_id = Path(result.path).name  # trial folders are named by trial id
        metrics = result.metrics or {}
        history = _history(result.metrics_dataframe, metric)
        folder = trials_dir / trial_id
        finished = (folder / "run_summary.json").exists() and (folder / "final").is_dir()
        values = sampled(result.config, cfg.tune)
        out.append({
            "trial_id": trial_id,
            "run_name": trial_run_name(cfg.run.name, trial_id),
            "values": values,
            "label": ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in values.items()),
            "status": statuses.get(trial_id, PENDING),
            "step": metrics.get("step"),
            "total_steps": metrics.get("total_steps"),
            metric: metrics.get(metric),
            f"best_{metric}": better(v for _, v in history) if history else None,
            "history": history,
            "adapter_path": str(folder / "final") if finished else None,
            "checkpoint": metrics.get("checkpoint_path"),
            "error": f"{type(result.error).__name__}: {str(result.error)[:1000]}"
            if result.error else None,
            "ran_this_session": trial_id in table.started,
            "last_result_time": metrics.get("timestamp"),
            "output": str(folder),
        })
    return sorted(out, key=lambda t: t["trial_id"])


def best_trial(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The completed trial with the best final metric (trials stopped early lost out)."""
    done = [t for t in trials if t["status"] == COMPLETED and t[metric] is not None
            and math.isfinite(t[metric])]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda t: t[metric])


def write_best_config(cfg: Config, best: dict[str, Any], path: Path) -> Path:
    """The best trial's settings as a config that `ray-app train` runs as it is."""
    raw = with_values(cfg.model_dump(mode="json", exclude={"tune"}), best["values"])
    raw["scaling"] = study_base(cfg)["scaling"]
    raw["run"]["name"] = trial_run_name(cfg.run.name, "best")
    raw["run"]["output_dir"] = str(path.parent / "best")
    validate_config(raw, source="the best trial's config")
    header = (f"# Best trial {best['trial_id']} of study {cfg.run.name!r}: "
              f"{cfg.tune.metric} {best[cfg.tune.metric]:.6g} after {best['step']} steps.\n"
              f"# Its adapter: {best['adapter_path']}\n"
              f"# Train it again (or longer, with --set): ray-app train {path}\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def render_study(summary: dict[str, Any], console: Console, path: Path) -> None:
    study, best = summary["study"], summary["best"]
    table = Table(title=f"Study {study['name']}: {summary['status']}", show_header=False)
    counts: dict[str, int] = {}
    for trial in summary["trials"]:
        counts[trial["status"]] = counts.get(trial["status"], 0) + 1
    table.add_row("trials", ", ".join(f"{n} {status}" for status, n in counts.items()))
    data = summary["data"]
    table.add_row("data", f"tokenized {'earlier (cache reused)' if data['cached'] else 'once'} "
                          f"in {data['path']}; {data['prepare_calls']} prepare call(s)")
    if best:
        table.add_row("best trial", f"{best['trial_id']}: {_values(best['values'])}")
        table.add_row(study["metric"], f"{best[study['metric']]:.4f}")
        table.add_row("best config", str(best["config_path"]))
        table.add_row("adapter", str(best["adapter_path"]))
    table.add_row("plot", str(summary["plot"] or "-"))
    table.add_row("summary", str(path))
    console.print(table)
    if summary["status"] == INTERRUPTED:
        console.print(f"The study was interrupted. Resume it with: ray-app tune CONFIG --resume "
                      f"(finished trials are kept; study state in {study['path']}).")


def _history(frame, metric: str) -> list[list[float]]:
    if frame is None or metric not in frame or "step" not in frame:
        return []
    rows = frame[["step", metric]].dropna()
    return [[int(step), float(value)] for step, value in rows.itertuples(index=False)]


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())
