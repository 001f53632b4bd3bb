"""The driver side of a training run: data, TorchTrainer, final adapter, run summary."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer
from rich.console import Console

from ray_app.config import Config
from ray_app.data.pipeline import PreparedData, prepare, tokenizer_path
from ray_app.data.report import render_report
from ray_app.data.tokenize import load_tokenizer
from ray_app.display import status
from ray_app.errors import UserError
from ray_app.extras import check_packages
from ray_app.model.adapters import INITIAL_ADAPTER, to_plain_lora
from ray_app.model.prepare import check_tokenizer, materialise_builtin
from ray_app.secrets import redact
from ray_app.summary import speed, write_summary
from ray_app.train.faults import injected_faults
from ray_app.train.identity import check_run_identity
from ray_app.train.lease import RunLease
from ray_app.train.loop import train_loop_per_worker
from ray_app.train.methods import method_for
from ray_app.train.methods.base import TrainingMethod
from ray_app.train.plan import plan_steps
from ray_app.train.preemption import PreemptibleTorchConfig
from ray_app.train.progress import FailureRecorder, NotRetriedError, ProgressDisplay, start_hub
from ray_app.train.trace import trace_folder
from ray_app.train.tracking import Tracker

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
# The largest eval split (token ids, at most) kept in Ray's object store for the whole run.
EVAL_IN_MEMORY_BYTES = 1 << 30
# How often an elastic run checks whether more workers fit (Ray's default is 60 s).
ELASTIC_RESIZE_CHECK_S = float(os.environ.get("RAY_APP_ELASTIC_RESIZE_CHECK_S", "30"))


def run_training(cfg: Config, console: Console,
                 on_metrics: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole run on the driver: checks, data, training, final adapter, summary.

    `on_metrics(metrics)` is called on the driver with every report of rank 0 as it
    arrives (step, loss, tokens_per_s, eval metrics, memory peaks, ..., and its `time`):
    a loss curve for a test, timings for a benchmark."""
    check_packages(cfg)
    output = cfg.output_path()
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = check_tokenizer(cfg)
    with RunLease(cfg.storage_uri(), cfg.run.name, "train") as lease:
        if lease.warning:
            console.print(f"[yellow]{lease.warning}[/yellow]", highlight=False)
        return _train(cfg, console, tokenizer, output, on_metrics)


def _train(cfg: Config, console: Console, tokenizer, output: Path,
           on_metrics: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    if check_run_identity(cfg):
        console.print(f"Run {cfg.run.name!r} exists in {redact(cfg.storage_uri())}: resuming it.")
    with status(console, "Reading, validating and tokenizing the data with Ray Data..."):
        data = prepare(cfg, cfg.storage_uri(), output / "rejects", method_for(cfg).record_kind)
    cfg = materialise_builtin(cfg, tokenizer, output)
    render_report(data.report, console, cached=data.cached, rejects_dir=output / "rejects")
    world = cfg.scaling.num_workers
    if cfg.run.record_samples:
        trace_folder(cfg.storage_uri(), cfg.run.name)  # refuses object storage up front
    plan = plan_steps(cfg, data.report.train_sequences, data.report.eval_records, world)
    if cfg.train.keep_best_by == "eval_loss" and not plan.has_eval:
        raise UserError("train.keep_best_by=eval_loss needs eval data: set data.eval or "
                        "data.eval_fraction, or use keep_best_by=latest.")
    console.print(f"Training {plan.total_steps} steps on {world} "
                  f"{'GPU' if cfg.scaling.use_gpu else 'CPU'} worker(s); "
                  f"checkpoints in {redact(cfg.storage_uri())}/{cfg.run.name}")
    hub = start_hub(cfg.run.name)
    trainer = build_trainer(cfg, method_for(cfg), data, plan.to_dict(), hub)
    with Tracker(cfg, console) as tracker:
        def report(metrics: dict[str, Any]) -> None:
            tracker.log(metrics)
            if on_metrics is not None:
                on_metrics(metrics)

        with ProgressDisplay(hub, plan.total_steps, console, on_metrics=report):
            result = fit(trainer)
        summary = redact(finish(cfg, data, result, output, hub))
        tracker.finish(summary)
    write_summary(output / "run_summary.json", summary)
    return summary


class FailedResult:
    """Stands in for `ray.train.Result` when `fit()` raised, so the summary is still written."""

    def __init__(self, error: Exception):
        self.error = error
        self.metrics: dict[str, Any] = {}
        self.checkpoint = None
        self.best_checkpoints: list = []


def fit(trainer):
    """`trainer.fit()`, or a FailedResult when it raised, so the summary is still written."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        # A worker's UserError ends the run through the controller: report it, not the wrapper.
        cause = getattr(err, "controller_failure", None)
        return FailedResult(cause if isinstance(cause, NotRetriedError) else err)


def build_trainer(cfg: Config, method: TrainingMethod, data: PreparedData, plan: dict, hub,
                  callbacks: tuple = ()) -> TorchTrainer:
    """`callbacks`: more Ray Train `UserCallback`s, e.g. Tune's metric forwarder for a trial."""
    # Train sequences are read by the workers themselves in a fixed order (exact resume);
    # eval records go through Ray Data's split.
    datasets = {"eval": eval_dataset(data)} if plan["has_eval"] else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "plan": plan, "method": method,
                           "progress": hub,
                           "train_stream": data.train_stream(), "storage": cfg.storage_uri(),
                           "faults": injected_faults()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.worker_counts(), use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=cfg.scaling.worker_resources(),
            **({"elastic_resize_monitor_interval_s": ELASTIC_RESIZE_CHECK_S}
               if cfg.scaling.min_workers else {}),
        ),
        torch_config=PreemptibleTorchConfig(preemption_grace_s=cfg.run.preemption_grace_s),
        run_config=ray.train.RunConfig(
            name=cfg.run.name, storage_path=cfg.storage_uri(),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.run.max_failures,
                max_preemption_failures=cfg.run.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                **({"checkpoint_score_attribute": "eval_loss", "checkpoint_score_order": "min"}
                   if cfg.train.keep_best_by == "eval_loss" else {})),
            callbacks=[FailureRecorder(hub), *callbacks],
        ),
        datasets=datasets,
    )


def eval_dataset(data: PreparedData) -> ray.data.Dataset:
    """The eval split, held in Ray's object store when it is small enough: every eval then
    reads blocks already in memory instead of starting a read of the files, which costs
    seconds each time. A large eval set streams from its files."""
    split = data.split("eval")
    return split.materialize() if data.eval_bytes_at_most() <= EVAL_IN_MEMORY_BYTES else split


def finish(cfg: Config, data: PreparedData, result, output: Path, hub) -> dict[str, Any]:
    metrics = result.metrics or {}
    history = ray.get(hub.restarts.remote())
    summary: dict[str, Any] = {
        "status": "failed" if result.error else "succeeded",
        "data": data.report.to_dict(),
        "train": {
            "steps": metrics.get("step", 0),
            "tokens_seen": metrics.get("tokens_seen", 0),
            **speed(metrics),
            # A restart before the first checkpoint starts over, so only the history sees it.
            "restarts": max(metrics.get("restarts", 0), len(history)),
            "restart_history": history,
            "resumed_from_step": metrics.get("start_step", 0),
            "tokens_per_s_per_worker_last": metrics.get("tokens_per_s_per_worker"),
            "mfu_last": metrics.get("mfu"),
            "mfu_peak": metrics.get("mfu_peak"),
            "peak_gpu_gib": metrics.get("peak_gib"),
        },
        "eval": {f"{name}_{when}": metrics.get(f"eval_{name}{suffix}")
                 for name in ("loss", *method_for(cfg).SUMMARY)
                 for when, suffix in (("initial", "_initial"), ("final", ""))},
        "adapter_path": None,
        "checkpoints": [c.path for c, _ in (result.best_checkpoints or [])],
        "storage": f"{cfg.storage_uri()}/{cfg.run.name}",
        "config": cfg.model_dump(mode="json"),
    }
    if result.error:
        summary["error"] = f"{type(result.error).__name__}: {str(result.error)[:2000]}"
    elif result.checkpoint is not None:
        summary["adapter_path"] = str(export_adapter(cfg, result.checkpoint, output / "final"))
    return summary


def export_adapter(cfg: Config, checkpoint, final: Path) -> Path:
    """Copies the adapter (not optimizer state) out of a checkpoint, plus the tokenizer.

    The copy is built beside `final` and swapped in whole, so a crash mid-export leaves the
    previous export (or none), never a half-written one."""
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        with checkpoint.as_directory() as folder:
            for name in (*ADAPTER_FILES, INITIAL_ADAPTER):
                if (Path(folder) / name).exists():
                    shutil.copy2(Path(folder) / name, building / name)
        if (building / INITIAL_ADAPTER).exists():  # lora.init pissa/olora: for the original base
            to_plain_lora(building)
        load_tokenizer(tokenizer_path(cfg), cfg.model.trust_remote_code).save_pretrained(building)
        replace_folder(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def replace_folder(new: Path, target: Path) -> None:
    """Puts folder `new` at `target` (same file system), replacing what was there; the old
    one is moved aside first and removed only after the new one is in place."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)
