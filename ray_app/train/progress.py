"""Live progress on the driver's console, and the record of restarts.

Rank 0 pushes its reported metrics to a small actor; the driver polls it and renders a
rich progress bar (on a terminal, or in Jupyter with ipywidgets) or one plain line per
report (in `ray job submit` logs, in a notebook without ipywidgets).
Ray Train's controller tells the same actor about every worker-group failure
(`FailureRecorder`), so each restart is shown as it happens and recorded with its cause,
the step it resumed from and how long recovery took.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.train import UserCallback
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typing_extensions import Self

from ray_app.display import live
from ray_app.errors import UserError

# Reported metric -> Ray metric (shown in the dashboard's metrics view; Prometheus adds the
# "ray_" prefix: ray_ray_app_train_loss, ...).
RAY_METRICS = {"loss": "ray_app_train_loss", "eval_loss": "ray_app_eval_loss",
               "tokens_per_s": "ray_app_tokens_per_s", "mfu": "ray_app_mfu",
               "peak_gib": "ray_app_gpu_mem_gib", "step": "ray_app_step",
               "restarts": "ray_app_restarts", "reward_accuracy": "ray_app_reward_accuracy",
               "reward_margin": "ray_app_reward_margin", "kl": "ray_app_kl"}


@ray.remote(num_cpus=0)
class ProgressHub:
    def __init__(self, run_name: str = "") -> None:
        from ray.util.metrics import Gauge

        self.history: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.tags = {"run": run_name}
        self.gauges = {key: Gauge(name, description=f"ray_app training metric {key!r}",
                                  tag_keys=("run",)) for key, name in RAY_METRICS.items()}

    def update(self, metrics: dict[str, Any]) -> None:
        self.history.append({**metrics, "time": time.time()})
        for key, gauge in self.gauges.items():
            if isinstance(metrics.get(key), (int, float)):
                gauge.set(float(metrics[key]), tags=self.tags)

    def failure(self, cause: str) -> None:
        event = {"event": "failure", "cause": cause, "time": time.time()}
        self.failures.append(event)
        self.history.append(event)

    def since(self, index: int) -> list[dict[str, Any]]:
        return self.history[index:]

    def restarts(self) -> list[dict[str, Any]]:
        """One entry per restart: its cause (the failures seen before it), the step it
        resumed from (0 when no checkpoint existed yet), the steps lost, the workers it
        resumed with and the recovery time."""
        out, pending, last_step, failed_at = [], [], 0, None
        for index, event in enumerate(self.history):
            if event.get("event") == "failure":
                pending.append(event)
                continue
            if event.get("event") == "first_step":
                # The first step after a restart: the time from the failure to training again.
                if out and failed_at is not None and out[-1].get("next_step_s") is None:
                    out[-1]["next_step_s"] = round(event["time"] - failed_at, 1)
                    # Where the restarted worker's time went: its start to the end of its
                    # first step, of which set-up (model loaded, speed-ups, adapter and
                    # strategy applied) and the checkpoint's restore.
                    for key in ("first_step_s", "set_up_s", "restore_s"):
                        if event.get(key) is not None:
                            out[-1][key] = round(event[key], 1)
                failed_at = None
                continue
            if event.get("resumed") or pending:
                first = pending[0] if pending else None
                resumed_from = event.get("step", 0) if event.get("resumed") else 0
                # Without a failure, a resume is this driver's start (a rerun) or, later in
                # the run, Ray Train restarting the group with more workers (elastic).
                unforced = ("driver restarted: the run was resumed from storage" if index == 0
                            else f"elastic resize: more workers fit, restarted with "
                            f"{event.get('world_size')}")
                out.append({
                    "cause": "; ".join(dict.fromkeys(e["cause"] for e in pending)) or unforced,
                    "resumed_from_step": resumed_from,
                    "steps_lost": max(0, last_step - resumed_from),
                    "world_size": event.get("world_size"),
                    "recovery_s": round(event["time"] - first["time"], 1) if first else None,
                    "next_step_s": None,
                    "warnings": event.get("warnings") or [],
                })
                failed_at = first["time"] if first else None
                pending = []
            last_step = event.get("step", last_step) or last_step
        return out



def start_hub(run_name: str):
    """A ProgressHub on the caller's own node: placed by Ray's default it could land on a
    worker node, and a preempted worker node would then take the run's record with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - no node id (e.g. a Ray client session): Ray places it
        return ProgressHub.remote(run_name)
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return ProgressHub.options(scheduling_strategy=strategy).remote(run_name)

class FailureRecorder(UserCallback):
    """Runs in Ray Train's controller: forwards every worker-group failure to the hub, and
    stops the run at once when a worker failed with a UserError (a configuration, a
    missing package, an unsupported combination: a retry would fail the same way)."""

    def __init__(self, hub):
        self.hub = hub

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        ranks: dict[str, list[int]] = {}
        for rank, err in sorted(worker_exceptions.items()):
            ranks.setdefault(f"{type(err).__name__}: {_first_line(err)}", []).append(rank)
        parts = [f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {message}"
                 for message, r in ranks.items()]
        self.hub.failure.remote("; ".join(parts)[:1000])
        fatal = [err for err in worker_exceptions.values() if isinstance(err, UserError)]
        if fatal:
            # An exception here ends the run: Ray Train does not retry its controller's.
            raise NotRetriedError(_first_line(fatal[0]))


class NotRetriedError(UserError):
    """A worker's UserError, which ends the run instead of being retried."""


def _first_line(err: Exception) -> str:
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    # Ray wraps worker errors; the last line names the original exception.
    return (lines[-1] if lines else "").strip()[:300]


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


class ProgressDisplay:
    """Polls the hub in a background thread while `trainer.fit()` blocks the main one.
    `on_metrics` receives every report of rank 0 (not the failure events), e.g. a tracker's
    `log`."""

    def __init__(self, hub, total_steps: int, console: Console, interval_s: float = 0.5,
                 on_metrics: Callable[[dict[str, Any]], None] | None = None):
        self.hub = hub
        self.on_metrics = on_metrics
        self.total = total_steps
        self.console = console
        self.interval = interval_s
        self.latest: dict[str, Any] = {}
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.live = live(console)  # else one plain line per report (job logs, notebooks)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=console, disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, info="starting workers")

    def __enter__(self) -> Self:
        self.progress.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()
        self.progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def _poll(self) -> None:
        try:
            new = ray.get(self.hub.since.remote(self._seen), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never kill the run
            return
        self._seen += len(new)
        for metrics in new:
            self._show(metrics)

    def _show(self, metrics: dict[str, Any]) -> None:
        if metrics.get("event") == "failure":
            self.console.print(f"[red]Worker failure[/red] ({metrics['cause']}); Ray Train "
                               "restarts the workers from the last checkpoint.")
            return
        if metrics.get("event"):  # bookkeeping for the restart record, not a report
            return
        if self.on_metrics:
            self.on_metrics(metrics)
        for warning in metrics.get("warnings") or []:
            self.console.print(f"[yellow]Warning:[/yellow] {warning}")
        if metrics.get("resumed"):
            self.console.print(f"Resumed from checkpoint at step {metrics['step']} on "
                               f"{metrics.get('world_size')} worker(s) "
                               f"(restart {metrics.get('restarts', 0)}).")
        if metrics.get("preemption"):
            self.console.print(f"Preemption notice ({metrics['preemption']}): checkpoint "
                               f"written at step {metrics.get('step')}.")
        self.latest.update({k: v for k, v in metrics.items() if v is not None})
        m = self.latest
        info = (f"loss {_fmt(m.get('loss'), '.4f')}  eval {_fmt(m.get('eval_loss'), '.4f')}  "
                f"{_fmt(m.get('tokens_per_s'), ',.0f')} tok/s")
        if "reward_accuracy" in m or "eval_reward_accuracy" in m:  # DPO, ORPO, SimPO
            info += (f"  reward acc {_fmt(m.get('reward_accuracy'), '.2f')}"
                     f"/{_fmt(m.get('eval_reward_accuracy'), '.2f')} (train/eval)"
                     f"  margin {_fmt(m.get('reward_margin'), '.3f')}")
        if "log_odds_chosen" in m:  # ORPO
            info += f"  log odds {_fmt(m.get('log_odds_chosen'), '.3f')}"
        if "kl" in m:  # KTO
            info += (f"  kl {_fmt(m.get('kl'), '.3f')}  margin {_fmt(m.get('reward_margin'), '.3f')}"
                     f"/{_fmt(m.get('eval_reward_margin'), '.3f')} (train/eval)")
        self.progress.update(self.task, completed=m.get("step", 0), info=info)
        if not self.live:
            self.console.print(f"step {m.get('step', 0)}/{self.total}  {info}  "
                               f"lr {_fmt(m.get('lr'), '.2e')}", highlight=False)
