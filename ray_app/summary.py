"""`run_summary.json`: the one file that says what a run did."""

from __future__ import annotations

import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ray_app.secrets import redact


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("ray", "torch", "transformers", "peft", "ray-app"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    from ray_app.data import storage

    summary = redact({**summary, "versions": versions()})
    # Atomic: a crash mid-write must not leave a summary that later tools cannot parse.
    storage.write_text(str(path), json.dumps(summary, indent=2, default=str) + "\n")


def speed(metrics: dict[str, Any]) -> dict[str, Any]:
    """The speed figures of the summary, from the final report's wall-clock counters
    (`ray_app.train.reporting.Reporter.speed`; evaluation and checkpoints are not in them):

    - `tokens_per_s`: the steady state, tokens over seconds of the steps after the warm-up
      steps of each attempt (the whole-run average when the run had none);
    - `tokens_per_s_whole_run`: all trained tokens over all training seconds;
    - `warmup_s`: what the warm-up steps took beyond the steady rate (compilation,
      autotuning, allocator growth);
    - `time_to_first_step_s`: from the worker's start (model loading included) to the end
      of the run's first step."""
    seconds, tokens = metrics.get("train_seconds"), metrics.get("tokens_seen", 0)
    whole = tokens / seconds if seconds else None
    steady_s, steady_tokens = metrics.get("steady_seconds"), metrics.get("steady_tokens", 0)
    steady = steady_tokens / steady_s if steady_s else None
    warmup = None
    if steady and metrics.get("warmup_seconds") is not None:
        warmup = max(0.0, metrics["warmup_seconds"] - metrics.get("warmup_tokens", 0) / steady)
    return {"tokens_per_s": steady or whole, "tokens_per_s_whole_run": whole,
            "train_seconds": seconds, "warmup_s": warmup,
            "time_to_first_step_s": metrics.get("first_step_s")}


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_summary(summary: dict[str, Any], console: Console, path: Path) -> None:
    train, evals, data = summary["train"], summary["eval"], summary["data"]
    table = Table(title=f"Run {summary['config']['run']['name']}: {summary['status']}",
                  show_header=False)
    table.add_row("steps", str(train["steps"]))
    table.add_row("tokens seen", _num(train["tokens_seen"], ","))
    table.add_row("tokens/s", f"{_num(train['tokens_per_s'], ',.0f')} steady state, "
                              f"{_num(train.get('tokens_per_s_whole_run'), ',.0f')} whole run")
    table.add_row("time to first step", f"{_num(train.get('time_to_first_step_s'), '.1f')} s, "
                                        f"warm-up {_num(train.get('warmup_s'), '.1f')} s "
                                        "(compilation, autotuning)")
    if train.get("mfu_last") is not None:
        table.add_row("MFU", f"{train['mfu_last']:.1%} of {train.get('mfu_peak') or '-'}")
    table.add_row("restarts", str(train["restarts"]))
    # Every eval metric of the method, before -> after (eval loss first).
    for name in dict.fromkeys(k.rsplit("_", 1)[0] for k in evals):
        table.add_row(f"eval {name.replace('_', ' ')}",
                      f"{_num(evals.get(f'{name}_initial'), '.4g')} -> "
                      f"{_num(evals.get(f'{name}_final'), '.4g')}")
    table.add_row("records", f"{data['accepted']} accepted, {data['rejected']} rejected, "
                             f"{data['duplicates']} duplicates of {data['records_read']}")
    table.add_row("adapter", str(summary["adapter_path"] or "-"))
    table.add_row("summary", str(path))
    console.print(table)
    if summary.get("error"):
        console.print(f"[red]Training failed:[/red] {redact(summary['error'])}")
