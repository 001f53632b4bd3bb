"""The Python API: the runs of the `ray-app` CLI as functions, for scripts and notebooks.

The CLI is a thin layer over these functions (one code path), so a config is validated the
same way and a run writes the same files:

    import ray_app

    cfg = ray_app.load_config("jobs/configs/example.yaml", ["train.max_steps=20"])
    result = ray_app.train(cfg)                     # a local Ray cluster
    result = ray_app.train(cfg, "ray://head:10001")  # a Ray client session
    result.metrics_frame().plot(x="step", y="loss")
    job = ray_app.submit(cfg, "http://head:8265")   # a Ray job, through the Jobs SDK
    job.logs(follow=True); job.result()

Over a Ray client session (`ray://`) the driver work runs in a task on the cluster, so its
live progress stays in the cluster's logs and the result comes back when the run ends; for
long runs `submit` is the better fit (Ray recommends jobs over the client for them).
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ray_app.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from ray_app.config import Config
    from ray_app.data.pipeline import PreparedData
    from ray_app.estimate import Estimate, Plan, Recommendation, Shape
    from ray_app.export.merge import MergeResult
    from ray_app.submit import JobHandle

    ConfigLike = Config | str | os.PathLike | Mapping[str, Any] | None


def load_config(source: ConfigLike = None, overrides: Iterable[str] = ()) -> Config:
    """A validated `Config`, exactly as the CLI builds it.

    `source`: a YAML path, a dict of sections, a `Config`, or None for the built-in
    quickstart. `overrides`: `KEY.PATH=VALUE` strings, as `--set` takes them.

    >>> cfg = load_config(None, ["train.max_steps=10", "run.name=try"])
    """
    from ray_app import config as config_module
    from ray_app.train.methods import method_for

    overrides = list(overrides)
    if isinstance(source, config_module.Config):
        source = source.model_dump(mode="json")
    if isinstance(source, Mapping):
        raw = copy.deepcopy(dict(source))
        for item in overrides:
            config_module._apply_override(raw, item)
        cfg = config_module.validate_config(raw, source="the given config")
    else:
        cfg = config_module.load_config(source, overrides)
    method_for(cfg)  # an unknown train.method fails here, before Ray starts
    return cfg


def _config(config, overrides: Iterable[str] = ()) -> Config:
    from ray_app.config import Config

    overrides = list(overrides)
    return config if isinstance(config, Config) and not overrides else load_config(config,
                                                                                   overrides)


def _is_client(address: str | None) -> bool:
    return bool(address) and address.startswith("ray://")


def _for_session(cfg: Config, address: str | None) -> Config:
    """`cfg` with its run paths absolute where a Ray client session needs them so.

    Over a client session the run's driver works in a task on the cluster, whose working
    directory is not this one: relative `run.storage_path` and `run.output_dir` are placed as
    `submit` places them, under RAY_APP_STORAGE, or this folder when the cluster runs on this
    machine."""
    from ray_app.config import STORAGE_ENV
    from ray_app.submit import is_on_this_machine, job_paths

    if not _is_client(address):
        return cfg
    output = cfg.run.output_dir or f"outputs/{cfg.run.name}"
    location = os.environ.get(STORAGE_ENV) or (os.getcwd() if is_on_this_machine(address)
                                               else None)
    for key, path in (("run.storage_path", cfg.run.storage_path), ("run.output_dir", output)):
        if not location and "://" not in path and not Path(path).expanduser().is_absolute():
            raise UserError(
                f"{key} {path!r} is relative: over a Ray client session the run's driver works "
                "in a task on the cluster, in a folder of its own. Make it absolute (a path "
                f"every node mounts), set {STORAGE_ENV} to one, or submit the run as a job: "
                "ray_app.submit(config, 'http://HOST:8265', storage=...).")
    storage, output = job_paths(cfg.run.storage_path, output, location)
    run = cfg.run.model_copy(update={"storage_path": storage, "output_dir": output})
    return cfg.model_copy(update={"run": run})


def _connect(address: str | None, num_cpus: int | None, verbose: bool, console: Console,
             what: str, announce: bool = True) -> None:
    from ray_app.ray_session import connect, is_dashboard_address

    if is_dashboard_address(address):
        raise UserError(f"{address} is a dashboard URL: submit {what} as a Ray job with "
                        f"ray_app.submit(config, {address!r}) (the CLI does that for --address "
                        "http://...).")
    dashboard = connect(address, num_cpus, verbose)
    if dashboard and announce:  # a short run (data, eval) keeps its output to its report
        console.print(f"Ray dashboard: http://{dashboard}")


@dataclass
class RunResult:
    """What `train` returns: the run's summary (`run_summary.json`), and every metrics row
    rank 0 reported (step, loss, eval metrics, tokens/s, ..., and the wall `time`)."""

    status: str
    summary: dict[str, Any]
    adapter_path: str | None
    restarts: int
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)
    summary_path: str = ""

    @classmethod
    def from_run(cls, summary: dict[str, Any], rows: list[dict[str, Any]],
                 summary_path: str) -> RunResult:
        return cls(summary["status"], summary, summary["adapter_path"],
                   summary["train"]["restarts"], rows, summary_path)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def metrics_frame(self) -> pd.DataFrame:
        """The metrics rows as a pandas DataFrame, one row per report (`.plot(x="step",
        y="loss")` draws the loss curve; eval rows carry `eval_loss`)."""
        import pandas as pd

        return pd.DataFrame(self.metrics)

    def render(self, console: Console) -> None:
        """The summary table the CLI prints at the end of a run."""
        from ray_app.summary import render_summary

        render_summary(self.summary, console, Path(self.summary_path))

    def _recorded(self) -> Console:
        console = Console(record=True, file=io.StringIO(), width=100, force_jupyter=False)
        self.render(console)
        return console

    def __repr__(self) -> str:
        return self._recorded().export_text(styles=False).rstrip()

    def _repr_html_(self) -> str:
        return self._recorded().export_html(
            inline_styles=True, code_format="<pre style=\"font-family:monospace\">{code}</pre>")


def _train_collecting(cfg: Config, console: Console) -> tuple[dict[str, Any], list[dict]]:
    """run_training, plus the metrics rows it reports (a module function, so that a Ray
    client session can run it in a task on the cluster and get both back)."""
    from ray_app.train.run import run_training

    rows: list[dict[str, Any]] = []
    summary = run_training(cfg, console, on_metrics=rows.append)
    return summary, rows


def train(config: ConfigLike = None, address: str | None = None, *, num_cpus: int | None = None,
          console: Console | None = None, verbose: bool = False) -> RunResult:
    """Trains the config's adapter; returns a `RunResult` (also when the run failed: see
    `.status` and `.summary["error"]`).

    `address`: None starts a local Ray cluster (`num_cpus` of them), "auto" joins this
    machine's, "ray://HOST:10001" connects a Ray client. A run of the same `run.name`
    resumes from its last checkpoint, as with `ray-app train`.

    >>> result = train(load_config(None, ["train.max_steps=10"]))
    >>> result.metrics_frame()[["step", "loss"]]
    """
    from ray_app.extras import check_packages
    from ray_app.ray_session import on_cluster

    cfg = _for_session(_config(config), address)
    check_packages(cfg)  # a missing package is named before Ray starts
    console = console or Console()
    _connect(address, num_cpus, verbose, console, "a training run")
    summary, rows = on_cluster(_train_collecting, cfg, console)
    return RunResult.from_run(summary, rows, str(cfg.output_path() / "run_summary.json"))


def prepare_data(config: ConfigLike = None, address: str | None = None, *,
                 num_cpus: int | None = None, console: Console | None = None,
                 verbose: bool = False) -> PreparedData:
    """Reads, validates and tokenizes the data (as `ray-app data`); returns the prepared
    data: `.report` (accounting: read, accepted, rejected, duplicates), `.path` (the
    tokenized records), `.cached` (reused from an earlier identical run)."""
    from ray_app.data.pipeline import prepare
    from ray_app.display import status
    from ray_app.ray_session import on_cluster
    from ray_app.train.methods import method_for

    cfg = _for_session(_config(config), address)
    console = console or Console()
    _connect(address, num_cpus, verbose, console, "the data preparation", announce=False)
    output = cfg.output_path()
    with status(console, "Reading, validating and tokenizing the data with Ray Data..."):
        return on_cluster(prepare, cfg, cfg.storage_uri(), output / "rejects",
                          method_for(cfg).record_kind)


def tune(config: ConfigLike = None, address: str | None = None, resume: bool = False, *,
         num_cpus: int | None = None, console: Console | None = None,
         verbose: bool = False) -> dict[str, Any]:
    """Runs (`resume`: continues) the hyperparameter study of `config.tune`; returns
    tune_summary.json's content (`status`, `best`, `trials`, ...). Not over a Ray client
    session: a study is a long driver; submit it as a job instead."""
    from ray_app.tune.study import check_study, run_study

    cfg = _config(config)
    check_study(cfg)  # search space, packages, optuna: before Ray starts
    if _is_client(address):
        raise UserError(
            "ray_app.tune does not run over a Ray client session (ray://): Ray Tune's driver "
            "must live on the cluster for the whole study. Submit it as a job instead: "
            "ray_app.submit(config, 'http://HOST:8265', command='tune') or "
            "`ray-app submit CONFIG --command tune --address http://HOST:8265`.")
    console = console or Console()
    _connect(address, num_cpus, verbose, console, "the study")
    return run_study(cfg, console, resume=resume)


def evaluate(config: ConfigLike, adapter: str | os.PathLike, address: str | None = None, *,
             num_cpus: int | None = None, console: Console | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Compares the base model and base + `adapter` on the eval split (as `ray-app eval`):
    perplexity, ROUGE-L, BLEU, exact match. Needs the `eval` extra. Returns the results
    (also written to `<output>/eval/eval_results.json`)."""
    from ray_app.export.evaluate import prepare_eval, run_eval
    from ray_app.ray_session import on_cluster

    # The adapter and the base are checked before Ray starts.
    cfg, checked = prepare_eval(_for_session(_config(config), address), str(adapter))
    console = console or Console()
    _connect(address, num_cpus, verbose, console, "the evaluation", announce=False)
    return on_cluster(run_eval, cfg, checked, console)


def merge(adapter: str | os.PathLike, out: str | os.PathLike, base: str | None = None,
          dtype: str = "auto", max_shard_size: str = "5GB", tolerance: float | None = None,
          console: Console | None = None) -> MergeResult:
    """Folds `adapter` into its base (or `base`) and writes a plain transformers model to
    `out`, verified against base + adapter (as `ray-app merge`). No Ray needed."""
    from ray_app.export.merge import merge_adapter

    return merge_adapter(str(adapter), str(out), base, dtype, max_shard_size, tolerance,
                         console or Console())


@dataclass
class EstimateResult:
    """The per-GPU memory of a run (`estimate`), and the fastest settings that fit."""

    shape: Shape
    plan: Plan
    estimate: Estimate
    recommendation: Recommendation
    gpu_memory_gib: float

    @property
    def fits(self) -> bool:
        return self.recommendation.fits

    def to_json(self) -> dict[str, Any]:
        from ray_app.estimate import to_json

        return to_json(self.shape, self.plan, self.estimate, self.recommendation)

    def render(self, console: Console) -> None:
        from ray_app.estimate_report import render

        render(self.shape, self.plan, self.estimate, self.recommendation, self.gpu_memory_gib,
               console)


def estimate(config: ConfigLike = None, *, overrides: Iterable[str] = (),
             model: str | None = None, method: str | None = None,
             strategy: str | None = None, gpus: int | None = None, batch: int | None = None,
             seq_len: int | None = None, gpu_memory_gib: float = 80.0) -> EstimateResult:
    """The per-GPU memory of a training run and the settings that fit (as `ray-app
    estimate`); reads only the model's config. `overrides` are `--set`s; the other
    arguments override the config's values, as the CLI's flags do."""
    from ray_app.estimate import estimate as estimate_memory
    from ray_app.estimate import plan_from_config, recommend
    from ray_app.estimate_report import liger_supported, model_shape

    cfg = _config(config, overrides)
    for name, value in (("gpus", gpus), ("batch", batch), ("seq_len", seq_len)):
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory-gib must be positive, got {gpu_memory_gib}")
    shape = model_shape(cfg, model)
    plan = plan_from_config(cfg, liger_auto=liger_supported(shape.model_type), method=method,
                            strategy=strategy, gpus=gpus, batch=batch, seq_len=seq_len)
    return EstimateResult(shape, plan, estimate_memory(shape, plan),
                          recommend(shape, plan, gpu_memory_gib), gpu_memory_gib)


def submit(config: ConfigLike = None, address: str | None = None, *, command: str = "train",
           overrides: Iterable[str] = (), storage: str | None = None,
           output: str | None = None, resume: bool = False,
           console: Console | None = None) -> JobHandle:
    """Runs `command` ("train", "data" or "tune") of `config` as a Ray job on the cluster
    whose dashboard is `address` (default: RAY_ADDRESS), through Ray's Jobs SDK; returns a
    `JobHandle` (`.status()`, `.logs(follow=True)`, `.wait()`, `.stop()`, `.result()`).

    Relative run paths are placed under `storage` (a path every node mounts, or s3://...;
    default RAY_APP_STORAGE, or this folder when the cluster runs on this machine). With
    `config` None the job runs the built-in quickstart with `overrides`.

    >>> job = submit("my.yaml", "http://head:8265")
    >>> job.wait(), job.result()["status"]
    """
    from ray_app.ray_session import is_dashboard_address
    from ray_app.submit import submit_job

    address = address or os.environ.get("RAY_ADDRESS")
    if not is_dashboard_address(address):
        raise UserError("ray-app submit needs the cluster's dashboard URL: --address "
                        "http://HOST:8265 (or RAY_ADDRESS). On Kubernetes: kubectl port-forward "
                        "svc/<cluster>-head-svc 8265:8265.")
    if command not in ("train", "data", "tune"):
        raise UserError(f"command {command!r}: allowed are train, data, tune")
    overrides = list(overrides)
    # Validated before anything is uploaded; packages are the cluster's business.
    cfg = load_config(config, overrides)
    return submit_job(cfg, address, command, storage=storage, output=output, resume=resume,
                      quickstart_overrides=overrides if config is None else None,
                      console=console)
