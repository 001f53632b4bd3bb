"""The live table of trials on the study's console, fed by Tune's driver-side callbacks.

On a terminal it is a rich table redrawn in place (sampled values, step, metric, best
metric, status); elsewhere (`ray job submit` logs, CI) it prints one plain line per event.
It also keeps what the summary needs that Tune's results do not say: which trials ran in
this session and how each one ended.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

RUNNING, COMPLETED, STOPPED, ERROR, INTERRUPTED, PENDING = (
    "running", "completed", "stopped early", "error", "interrupted", "pending")


class TrialTable(Callback):
    def __init__(self, console: Console, keys: list[str], metric: str, mode: str):
        self.console = console
        self.keys = keys
        self.metric = metric
        self.better = min if mode == "min" else max
        self.rows: dict[str, dict[str, Any]] = {}
        self.started: set[str] = set()  # trials that ran in this session
        self.live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the study; a console and a live display are this
        # process's own.
        return {**self.__dict__, "console": None, "live": None}

    # ------------------------------------------------------------------ Tune callbacks

    def setup(self, **info) -> None:
        if self.console is not None and self.console.is_terminal:
            self.live = Live(self._table(), console=self.console, refresh_per_second=2)
            self.live.start()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started.add(trial.trial_id)
        row = self._row(trial)
        row["status"] = RUNNING
        self._event(trial.trial_id, "started " + _values(row["values"]))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        row = self._row(trial)
        value = result.get(self.metric)
        row.update(step=result.get("step"), total=result.get("total_steps"), value=value)
        if value is not None:
            row["best"] = value if row.get("best") is None else self.better(row["best"], value)
        self._event(trial.trial_id, f"step {row['step']}/{row['total']}  {self.metric} "
                                    f"{_num(value)}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        row = self._row(trial)
        done = row.get("total") is not None and (row.get("step") or 0) >= row["total"]
        row["status"] = COMPLETED if done else STOPPED
        self._event(trial.trial_id, f"{row['status']} at step {row.get('step')}  "
                                    f"{self.metric} {_num(row.get('value'))}")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._row(trial)["status"] = ERROR
        self._event(trial.trial_id, "failed; the study goes on")

    def on_experiment_end(self, trials, **info) -> None:
        for trial in trials:
            row = self._row(trial)
            if row.get("status") in (COMPLETED, STOPPED, ERROR):
                continue
            if trial.status == "ERROR":
                row["status"] = ERROR
            elif trial.trial_id in self.started:
                row["status"] = INTERRUPTED
            elif trial.status == "TERMINATED":  # finished in an earlier session
                last = trial.last_result or {}
                row.update(step=last.get("step"), total=last.get("total_steps"),
                           value=last.get(self.metric))
                done = row["total"] is not None and (row["step"] or 0) >= row["total"]
                row["status"] = COMPLETED if done else STOPPED
            else:
                row["status"] = PENDING
        if self.live is not None:
            self.live.update(self._table())
            self.live.stop()
            self.live = None

    # ------------------------------------------------------------------ rendering

    def statuses(self) -> dict[str, str]:
        return {trial_id: row.get("status", PENDING) for trial_id, row in self.rows.items()}

    def _row(self, trial) -> dict[str, Any]:
        return self.rows.setdefault(trial.trial_id, {
            "values": {k: trial.config.get(k) for k in self.keys}, "status": PENDING})

    def _event(self, trial_id: str, text: str) -> None:
        if self.live is not None:
            self.live.update(self._table())
        elif self.console is not None:
            self.console.print(f"trial {trial_id}: {text}", highlight=False)

    def _table(self) -> Table:
        table = Table(title="Trials")
        for column in ("trial", *self.keys, "step", self.metric, "best", "status"):
            table.add_column(column, justify="left" if column in ("trial", "status") else "right")
        for trial_id, row in self.rows.items():
            steps = f"{row.get('step', '-')}/{row.get('total', '-')}" if row.get("step") \
                is not None else "-"
            table.add_row(trial_id, *(_num(row["values"].get(k)) for k in self.keys), steps,
                          _num(row.get("value")), _num(row.get("best")), row["status"])
        return table


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _values(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in values.items())
