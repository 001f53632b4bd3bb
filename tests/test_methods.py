"""The TrainingMethod seam: a new method is one class plus one line of registration, and
the loop names no method; a worker's UserError fails the run at once instead of being
retried."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ray import cloudpickle
from rich.console import Console
from support import ONE_WORKER, tiny_config

from ray_app.config import validate_config
from ray_app.data.collate import PackedCollate, PadCollate
from ray_app.data.tokenize import IGNORE
from ray_app.errors import UserError
from ray_app.train.methods import METHODS
from ray_app.train.methods.base import TrainingMethod
from ray_app.train.run import run_training

pytestmark = pytest.mark.ray
TRAIN = Path(__file__).resolve().parents[1] / "ray_app" / "train"


class SequenceMean(TrainingMethod):
    """A throwaway method: every sequence weighs the same (its mean token loss), instead
    of every token; it also reports the trained tokens per sequence."""

    name = "sequence_mean"
    STATS = ("loss", "trained_tokens")

    def collates(self, pad_id, flatten):
        return PackedCollate(pad_id), PadCollate(pad_id)

    def units(self, batch):
        return int(batch["input_ids"].shape[0])

    def _per_row(self, engine, batch, autocast):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with autocast:
            logits = engine.model(**inputs).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                     reduction="none")
        trained = (labels != IGNORE).sum(1).clamp(min=1)
        return token_loss.sum(1) / trained, trained.double()

    def loss(self, engine, batch, autocast, denominator):
        rows, trained = self._per_row(engine, batch, autocast)
        return rows.sum() / denominator, torch.stack([rows.detach().double().sum(), trained.sum()])

    def eval_sums(self, engine, batch, autocast):
        rows, trained = self._per_row(engine, batch, autocast)
        return torch.stack([rows.double().sum(), trained.sum()]), rows.shape[0]


class RefusesToStart(SequenceMean):
    name = "refuses"

    def collates(self, pad_id, flatten):
        raise UserError("this method refuses to start (a deterministic configuration error)")


@pytest.fixture
def registered(monkeypatch):
    # The test module is not importable on Ray's workers: ship its classes by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    monkeypatch.setitem(METHODS, "sequence_mean", SequenceMean)  # the one line of registration
    monkeypatch.setitem(METHODS, "refuses", RefusesToStart)
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_new_method_is_one_class_and_one_line_of_registration(
        ray_cluster, registered, small_data, tmp_path):
    seen: list[dict] = []
    cfg = tiny_config(small_data, tmp_path, train={"method": "sequence_mean", "max_steps": 6},
                      scaling=ONE_WORKER)
    summary = run_training(validate_config(cfg), Console(width=120), on_metrics=seen.append)
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["eval"]["loss_final"] < summary["eval"]["loss_initial"]
    steps = [m for m in seen if m.get("loss") is not None]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    # Its own statistic reaches the metrics: trained tokens per sequence, within the limits.
    assert all(0 < m["trained_tokens"] <= 64 for m in steps)
    assert 0 < summary["data"]["train_records"]


def test_a_workers_user_error_fails_the_run_at_once(ray_cluster, registered, small_data,
                                                     tmp_path):
    cfg = tiny_config(small_data, tmp_path, train={"method": "refuses"}, scaling=ONE_WORKER,
                      run={"name": "refuses", "max_failures": 3})
    summary = run_training(validate_config(cfg), Console(width=120))
    assert summary["status"] == "failed"
    assert "refuses to start" in summary["error"]
    assert summary["train"]["restarts"] <= 1  # one failure recorded, no retries after it
    assert len(summary["train"]["restart_history"]) == 0


def test_an_unknown_method_is_named_with_the_known_ones(small_data, tmp_path):
    from ray_app.train.methods import method_for

    cfg = validate_config(tiny_config(small_data, tmp_path, train={"method": "ppo"}))
    with pytest.raises(UserError, match="unknown method 'ppo'; known: sft, dpo, orpo, simpo, kto"):
        method_for(cfg)


def test_the_training_core_names_no_method():
    """The loop, the step, the engines and the reports work for any method."""
    for name in ("loop.py", "steps.py", "engines.py", "reporting.py", "run.py"):
        text = (TRAIN / name).read_text()
        found = re.findall(r"\b(dpo|DPO|sft|SFT|orpo|ORPO|simpo|SimPO|kto|KTO|pairs|"
                           r"completions|preference)\b", text)
        assert not found, f"{name} names {found}"
