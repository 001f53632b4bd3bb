"""Experiment tracking: the driver logs a run's metrics to TensorBoard, MLflow and W&B.

`tracking.backends` chooses them; each package is imported only when chosen, and a missing
one is named before any Ray work. Rank 0's reports reach the driver through the progress
hub (ray_app.train.progress), so the workers need none of these packages. The run's config
(flattened, secrets masked) is logged as params; `finish` adds the final figures.

A tracker never ends a run: a backend that fails is reported once and dropped.
Credentials come only from the environment: WANDB_API_KEY (or `wandb login`),
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN.

    with Tracker(cfg, console) as tracker:  # no backends chosen: does nothing
        tracker.log({"step": 10, "loss": 1.9})
        tracker.finish(summary)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from typing_extensions import Self

from ray_app.config import Config
from ray_app.extras import require
from ray_app.secrets import redact

# Hub bookkeeping, not training metrics.
NOT_METRICS = {"step", "time"}


def mlflow_uri(cfg: Config) -> str:
    # MLflow 3 refuses a plain file store by default; SQLite needs no server.
    return (cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{cfg.output_path()}/mlflow.db")


def flat_params(cfg: Config) -> dict[str, Any]:
    """The config as dotted keys (`train.lr`) with secrets masked; lists become strings."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", redact(cfg.model_dump(mode="json")))
    return out


def final_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The end-of-run numbers of a run summary, plus its status."""
    train, evals = summary["train"], summary["eval"]
    return {"status": summary["status"], "steps": train["steps"],
            "tokens_seen": train["tokens_seen"], "tokens_per_s": train["tokens_per_s"],
            "restarts": train["restarts"], **{f"eval_{k}": v for k, v in evals.items()}}


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, cfg: Config, params: dict[str, Any]):
        SummaryWriter = require("tensorboardX", "tracking.backends: tensorboard").SummaryWriter

        folder = Path(cfg.tracking.tensorboard_dir or cfg.output_path() / "tensorboard")
        self.writer = SummaryWriter(logdir=str(folder / cfg.run.name))
        self.params = params
        self.step = 0

    def log(self, values: dict[str, float], step: int) -> None:
        self.step = step
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, figures: dict[str, Any]) -> None:
        final = {f"final/{k}": v for k, v in _numbers(figures).items()}
        self.writer.add_hparams(self.params, final, name="hparams", global_step=self.step)
        self.writer.add_text("status", str(figures["status"]), self.step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, cfg: Config, params: dict[str, Any]):
        mlflow = require("mlflow", "tracking.backends: mlflow")
        MlflowClient, Param = mlflow.MlflowClient, require("mlflow.entities", "mlflow").Param

        self.client = MlflowClient(tracking_uri=mlflow_uri(cfg))
        found = self.client.get_experiment_by_name(cfg.tracking.project)
        experiment = (found.experiment_id if found
                      else self.client.create_experiment(cfg.tracking.project))
        self.run_id = self.client.create_run(experiment, run_name=cfg.run.name).info.run_id
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        self.step = 0

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        self.step = step
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def finish(self, figures: dict[str, Any]) -> None:
        for key, value in _numbers(figures).items():
            self.client.log_metric(self.run_id, f"final_{key}", value, step=self.step)
        self.client.set_tag(self.run_id, "status", str(figures["status"]))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class _Wandb:
    def __init__(self, cfg: Config, params: dict[str, Any]):
        wandb = require("wandb", "tracking.backends: wandb")

        self.run = wandb.init(
            project=cfg.tracking.project, entity=cfg.tracking.wandb_entity, name=cfg.run.name,
            config=params, dir=None if os.environ.get("WANDB_DIR") else str(cfg.output_path()),
            # console="off": W&B would otherwise wrap the driver's stdout.
            settings=wandb.Settings(console="off", quiet=True),
        )
        # Our step is the x-axis; it may go back after a resume, W&B's own _step may not.
        self.run.define_metric("*", step_metric="step")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "step": step})

    def finish(self, figures: dict[str, Any]) -> None:
        self.run.summary.update({f"final_{k}": v for k, v in figures.items()})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


BACKENDS = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}


class Tracker:
    """Sends metrics to the chosen backends; a context manager that closes them (marking
    the run failed when the block raised)."""

    def __init__(self, cfg: Config, console: Console):
        self.console = console
        self.backends: dict[str, Any] = {}
        self.failed = False
        params = flat_params(cfg)
        for name in cfg.tracking.backends:
            try:
                self.backends[name] = BACKENDS[name](cfg, params)
            except Exception as err:  # noqa: BLE001 - e.g. an unreachable server
                self._warn(name, err)

    def log(self, metrics: dict[str, Any]) -> None:
        """Logs the numeric values of one report at x = metrics["step"]."""
        values = _numbers({k: v for k, v in metrics.items() if k not in NOT_METRICS})
        if metrics.get("step") is None or not values:
            return
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda b=backend: b.log(values, int(metrics["step"])))

    def finish(self, summary: dict[str, Any]) -> None:
        """Logs the run summary's final figures and closes every backend."""
        figures = final_figures(summary)
        self.failed = figures["status"] != "succeeded"
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda b=backend: b.finish(figures))
        self.close()

    def close(self) -> None:
        for name, backend in list(self.backends.items()):
            self._guard(name, lambda b=backend: b.close(self.failed))
        self.backends.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.failed = self.failed or exc_type is not None
        self.close()

    def _guard(self, name: str, call) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - a tracker must never end the run
            self.backends.pop(name, None)
            self._warn(name, err)

    def _warn(self, name: str, err: Exception) -> None:
        self.console.print(f"[yellow]Warning:[/yellow] tracking backend {name} failed and "
                               f"is turned off for this run: {redact(str(err))[:500]}",
                               highlight=False)


def tune_callbacks(cfg: Config) -> list:
    """Ray's own Tune logger callbacks for the chosen backends, one run per trial."""
    from ray.tune.logger import TBXLoggerCallback

    out: list = []
    if "tensorboard" in cfg.tracking.backends:  # into each trial's folder
        out.append(TBXLoggerCallback())
    if "mlflow" in cfg.tracking.backends:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg),
                                        experiment_name=cfg.tracking.project))
    if "wandb" in cfg.tracking.backends:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=cfg.tracking.project,
                                       entity=cfg.tracking.wandb_entity))
    return out
