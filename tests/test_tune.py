"""Ray Tune studies: trials are training runs on one shared dataset; ASHA stops bad ones,
an interrupted study resumes without redoing finished trials, the best config trains."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml
from ray.tune import Callback
from rich.console import Console
from support import tiny_config

from ray_app.cli import main
from ray_app.config import load_config, validate_config
from ray_app.errors import UserError
from ray_app.tune.capacity import concurrent_trials
from ray_app.tune.table import COMPLETED, STOPPED


def _placement_groups() -> dict[str, str]:
    from ray.util import placement_group_table

    return {pg_id: pg["state"] for pg_id, pg in placement_group_table().items()}


def _wait_released(before: dict[str, str], timeout_s: float = 60) -> None:
    """Every placement group made since `before` is removed within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = {pg_id: state for pg_id, state in _placement_groups().items()
                if pg_id not in before and state != "REMOVED"}
        if not held:
            return
        assert time.monotonic() < deadline, f"reservations left after the study: {held}"
        time.sleep(0.5)


def _study_config(small_data, tmp_path) -> dict:
    cfg = tiny_config(
        small_data, tmp_path,
        train={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2, "log_every": 2,
               "warmup_ratio": 0.0},
        scaling={"num_workers": 2, "resources_per_worker": {"CPU": 0.5}},
        run={"name": "study"},
    )
    # Two good learning rates, then two hopeless ones: 4 trials in this order, 2 at once on
    # 2 CPUs (1 kept for Ray Data, 0.5 per one-worker trial). ASHA compares them at step 2,
    # and a hopeless trial starts only when a good one has finished, so it always meets
    # the good ones' results there and is stopped (a verdict that does not hang on which
    # trial of a concurrent pair reaches step 2 first).
    cfg["tune"] = {"space": {"train.lr": {"grid": [3e-3, 3e-3, 1e-6, 1e-6]},
                             "lora.r": {"choice": [4, 8]}},
                   "num_samples": 1, "scheduler": "asha", "grace_period": 2,
                   "reduction_factor": 2, "workers_per_trial": 1}
    return cfg


class InterruptAfter(Callback):
    """Presses Ctrl-C on the study's driver once `n` trials have finished."""

    def __init__(self, n: int):
        self.n = n
        self.finished = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        if self.finished == self.n:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.ray
def test_study_stops_bad_trials_resumes_after_interrupt_and_best_config_trains(
        ray_cluster, small_data, tmp_path):
    from ray_app.tune.study import run_study

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(_study_config(small_data, tmp_path)))
    cfg = load_config(path)

    before = _placement_groups()
    first = run_study(cfg, Console(width=160), callbacks=[InterruptAfter(3)])
    assert first["status"] == "interrupted"
    # The trials that ASHA stopped or the interrupt ended hold no CPUs any more: Ray Train
    # frees a killed trial's worker reservation once its controller is gone.
    _wait_released(before)
    assert first["study"]["max_concurrent_trials"] == 2
    finished = {t["trial_id"]: t for t in first["trials"] if t["status"] in (COMPLETED, STOPPED)}
    assert len(finished) >= 3

    with pytest.raises(UserError, match="--resume"):
        run_study(cfg, Console(width=160))
    assert main(["tune", str(path), "--resume"]) == 0
    _wait_released(before)
    out = tmp_path / "out"
    summary = json.loads((out / "tune_summary.json").read_text())
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert summary["status"] == "finished" and summary["study"]["resumed"]
    assert len(trials) == 4 and set(finished) < set(trials)
    for trial_id, before in finished.items():  # kept, not run again
        after = trials[trial_id]
        assert not after["ran_this_session"]
        assert (after["status"], after["step"], after["last_result_time"]) == (
            before["status"], before["step"], before["last_result_time"])
    assert all(t["ran_this_session"] for i, t in trials.items() if i not in finished)
    statuses = [t["status"] for t in trials.values()]
    assert STOPPED in statuses, summary["trials"]
    assert all(s in (COMPLETED, STOPPED) for s in statuses)
    stopped = [t for t in trials.values() if t["status"] == STOPPED]
    assert all(t["step"] < 4 for t in stopped)
    assert all(t["adapter_path"] for t in trials.values() if t["status"] == COMPLETED)

    # The data was tokenized once, before the first trial, and every trial read that cache.
    data = summary["data"]
    assert first["data"]["prepare_calls"] == 1 and not first["data"]["cached"]
    assert data["cached"] and data["trials_on_it"] == [data["path"]] == [first["data"]["path"]]
    assert [p.name for p in (tmp_path / "storage" / "datasets").iterdir()] == [data["fingerprint"]]

    best = summary["best"]
    assert trials[best["trial_id"]]["values"]["train.lr"] == 3e-3
    assert (out / "trials.png").read_bytes()[:4] == b"\x89PNG"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / best["adapter_path"]).iterdir()}
    best_cfg = load_config(best["config_path"])
    assert best_cfg.train.lr == 3e-3 and best_cfg.lora.r == best["values"]["lora.r"]
    assert best_cfg.scaling.num_workers == 1 and best_cfg.run.name == "study-best"
    assert best_cfg.run.output_dir.endswith("best")  # `ray-app train` of it writes beside


def _error(space: dict, **tune) -> str:
    with pytest.raises(UserError) as info:
        validate_config({"data": {"train": ["x.jsonl"]}, "tune": {"space": space, **tune}})
    return str(info.value)


@pytest.mark.parametrize("space,expected", [
    ({"train.lr": {"logunifrom": [1e-5, 1e-3]}},
     ("tune.space.train.lr: got {'logunifrom': [1e-05, 0.001]}; value error, unknown "
     "distribution 'logunifrom'; did you mean 'loguniform'?")),
    ({"train.lr": {"loguniform": [1e-3, 1e-5]}}, "bounds must satisfy low < high"),
    ({"train.lr": {"loguniform": [0, 1e-3]}}, "loguniform needs low > 0"),
    ({"train.lr": {"uniform": [1e-4, 2.0]}},
     ("tune.space.train.lr: uniform [0.0001, 2.0] allows 2.0, which train.lr does not take "
     "(Input should be less than 1)")),
    ({"lora.r": {"uniform": [4, 16]}}, "Use randint or choice for whole numbers"),
    ({"lora.r": {"randint": [4, 8.5]}}, "randint takes [low, high]: integers"),
    ({"lora.r": {"choice": []}}, "choice takes a non-empty list"),
    ({"lora.r": [8, 16]}, "must be one distribution, e.g. {loguniform"),
    ({"train.lrr": {"choice": [1e-4]}}, "'train.lrr' is not a config key; did you mean 'train.lr'?"),
    ({"data.max_seq_len": {"choice": [64, 128]}}, "data.max_seq_len cannot vary between trials"),
    ({"scaling.num_workers": {"choice": [1, 2]}}, "cannot vary between trials"),
    ({"train.method": {"choice": ["dpo", "orpo"]}}, "train.method cannot vary between trials"),
    ({"train.simpo.gama": {"uniform": [0.3, 1.0]}},
     "'train.simpo.gama' is not a config key; did you mean 'train.simpo.gamma'?"),
    ({"train.simpo.gamma": {"uniform": [-1.0, 1.0]}}, "which train.simpo.gamma does not take"),
])
def test_bad_search_space_is_named_with_key_and_fix(space, expected):
    assert expected in _error(space)


def test_a_trial_sets_nested_method_keys_and_lora_variant_flags(tmp_path):
    from ray_app.tune.space import study_base, trial_config

    space = {"train.simpo.gamma": {"uniform": [0.3, 1.5]}, "train.dpo.beta": {"choice": [0.05]},
             "lora.use_dora": {"choice": [False, True]}, "lora.init": {"choice": ["pissa"]},
             "train.lora_plus_ratio": {"choice": [None, 16]}}
    cfg = validate_config({"data": {"train": ["x.jsonl"]}, "train": {"method": "simpo"},
                           "tune": {"space": space}})
    values = {"train.simpo.gamma": 0.9, "train.dpo.beta": 0.05, "lora.use_dora": True,
              "lora.init": "default", "train.lora_plus_ratio": 16}
    trial = trial_config(study_base(cfg), values, "s", "t1", str(tmp_path))
    assert (trial.train.simpo.gamma, trial.train.simpo.beta, trial.train.dpo.beta) == (0.9, 2.0, 0.05)
    assert trial.lora.use_dora and trial.train.lora_plus_ratio == 16
    assert cfg.train.simpo.gamma == 0.5  # the study's own config is unchanged


def test_a_study_ranks_by_a_metric_its_method_reports():
    from ray_app.tune.study import check_study

    def config(method: str, metric: str):
        return validate_config({"data": {"train": ["x.jsonl"]}, "train": {"method": method},
                                "tune": {"space": {"train.dpo.beta": {"choice": [0.1, 0.3]}},
                                         "metric": metric, "mode": "max"}})

    check_study(config("dpo", "eval_reward_accuracy"))
    check_study(config("simpo", "eval_reward_margin"))
    with pytest.raises(UserError, match="eval_perplexity is not reported by train.method: dpo"):
        check_study(config("dpo", "eval_perplexity"))
    with pytest.raises(UserError, match="eval_reward_accuracy is not reported by train.method: kto"):
        check_study(config("kto", "eval_reward_accuracy"))


def test_optuna_refuses_grid_entries_and_unknown_settings_are_named():
    assert "search=optuna cannot run grid entries (lora.r)" in _error(
        {"lora.r": {"grid": [8, 16]}}, search="optuna")
    assert "tune.schedular: unknown key in section 'tune'; did you mean 'scheduler'?" in _error(
        {}, schedular="asha")
    assert "tune.mode" in _error({}, mode="minimum")


def test_concurrency_follows_the_cluster_and_keeps_a_cpu_for_ray_data():
    def cfg(**tune):
        return validate_config({"data": {"train": ["x.jsonl"]},
                                "scaling": {"resources_per_worker": {"CPU": 0.5}},
                                "tune": {"workers_per_trial": 1, **tune}})

    assert concurrent_trials(cfg(), {"CPU": 2.0, "memory": 8e9})[0] == 2
    assert concurrent_trials(cfg(), {"CPU": 16.0, "memory": 8e10})[0] == 30
    assert concurrent_trials(cfg(max_concurrent_trials=3), {"CPU": 2.0})[0] == 3
    gpu = validate_config({"data": {"train": ["x.jsonl"]}, "scaling": {"use_gpu": True},
                           "tune": {"workers_per_trial": 2}})
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0, "memory": 8e11})[0] == 4
    assert concurrent_trials(gpu, {"CPU": 4.0, "memory": 8e9})[0] == 1  # GPUs not up yet
    with pytest.raises(UserError, match="no node of the cluster offers"):
        concurrent_trials(cfg(driver_resources={"driver": 0.01}), {"CPU": 2.0, "memory": 8e9})


def test_space_becomes_optuna_tpe_and_asha_on_steps():
    from ray.tune.search.optuna import OptunaSearch

    from ray_app.tune.space import param_space
    from ray_app.tune.study import _tune_config

    cfg = validate_config({"data": {"train": ["x.jsonl"]}, "train": {"eval_every": 50}, "tune": {
        "search": "optuna", "space": {"train.lr": {"loguniform": [1e-5, 1e-3]},
                                      "train.warmup_ratio": {"uniform": [0.0, 0.1]},
                                      "train.seed": {"randint": [0, 4]},
                                      "lora.r": {"choice": [8, 16]}}}})
    tune_config = _tune_config(cfg, concurrency=2, planned_steps=400)
    assert isinstance(tune_config.search_alg, OptunaSearch)
    assert set(OptunaSearch.convert_search_space(param_space(cfg.tune))) == set(cfg.tune.space)
    asha = tune_config.scheduler
    assert (asha._time_attr, asha._max_t, tune_config.max_concurrent_trials) == ("step", 399, 2)
    assert asha._brackets[0]._rungs[-1][0] == 50  # first rung at the first eval


def test_tune_without_a_search_space_exits_2_before_ray_starts(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"train": ["x.jsonl"]}}))
    assert main(["tune", str(path)]) == 2
    assert "tune.space is empty" in capsys.readouterr().out
