"""DPO (train.method=dpo): the losses, the pair data path, and a run that learns the
preference, with the adapter-disabled base as reference and recovery as for SFT."""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from support import ONE_WORKER, tiny_config, write_lines

from ray_app.config import DpoSection, validate_config
from ray_app.data.tokenize import IGNORE
from ray_app.quickstart import build_assets
from ray_app.train.faults import FAIL_AT_STEP_ENV
from ray_app.train.methods.answers import PairCollate
from ray_app.train.methods.dpo import pair_losses


def _logps(chosen, rejected):
    return torch.tensor([*chosen, *rejected], dtype=torch.float64)


def test_losses_match_their_definitions():
    policy, reference = _logps([-1.0, -4.0], [-3.0, -2.0]), _logps([-2.0, -3.0], [-2.0, -2.5])
    tokens = torch.tensor([2, 4, 5, 1])
    # log-ratios: chosen (1, -1), rejected (-1, 0.5) -> delta (2, -1.5)
    delta = torch.tensor([2.0, -1.5], dtype=torch.float64)
    sig, stats = pair_losses(policy, reference, tokens, DpoSection(beta=0.5))
    assert torch.allclose(sig, -F.logsigmoid(0.5 * delta))
    assert stats[:, 1].tolist() == [1.0, 0.0]  # reward accuracy: chosen reward > rejected
    assert torch.allclose(stats[:, 2], 0.5 * delta)  # margins
    assert torch.allclose(stats[:, 3], torch.tensor([0.5, -0.5], dtype=torch.float64))
    smooth, _ = pair_losses(policy, reference, tokens, DpoSection(beta=0.5, label_smoothing=0.2))
    assert torch.allclose(smooth, -0.8 * F.logsigmoid(0.5 * delta) - 0.2 * F.logsigmoid(-0.5 * delta))
    hinge, _ = pair_losses(policy, reference, tokens, DpoSection(beta=0.5, loss="hinge"))
    assert torch.allclose(hinge, torch.relu(1 - 0.5 * delta))
    ipo, _ = pair_losses(policy, reference, tokens, DpoSection(beta=0.5, loss="ipo"))
    per_token = torch.tensor([1 / 2 - (-1 / 5), -1 / 4 - 0.5 / 1], dtype=torch.float64)
    assert torch.allclose(ipo, (per_token - 1.0) ** 2)
    # policy == reference (a fresh adapter): every sigmoid loss is log 2, no reward yet
    same, stats = pair_losses(reference, reference, tokens, DpoSection())
    assert torch.allclose(same, torch.full((2,), math.log(2), dtype=torch.float64))
    assert stats[:, 1:].abs().sum() == 0


def _pairs_batch():
    return {"input_ids": [np.array([1, 2, 3]), np.array([4, 5])],
            "labels": [np.array([IGNORE, 2, 3]), np.array([IGNORE, 5])],
            "rejected_input_ids": [np.array([1, 9]), np.array([4, 8, 8, 8])],
            "rejected_labels": [np.array([IGNORE, 9]), np.array([IGNORE, 8, 8, 8])],
            "sample_id": [7, 3]}


def test_pair_collate_puts_chosen_rows_first_then_rejected():
    out = PairCollate(pad_id=0)(_pairs_batch())
    assert out["input_ids"].shape == (4, 8) and "attention_mask" not in out
    assert out["input_ids"][:, :4].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [1, 9, 0, 0],
                                                [4, 8, 8, 8]]
    assert out["row_index"][:, :5].tolist() == [[0, 0, 0, -1, -1], [1, 1, -1, -1, -1],
                                                [2, 2, -1, -1, -1], [3, 3, 3, 3, -1]]
    assert out["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # one document: no mask
    assert out["sample_id"].tolist() == [7, 3]
    flat = PairCollate(pad_id=0, flatten=True)(_pairs_batch())  # flash_attention_2
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 9, 4, 8, 8, 8]]
    assert flat["row_index"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3, 3]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 3]]


def test_answer_logps_of_a_batch_equal_each_answer_on_its_own():
    from ray_app.data.tokenize import load_tokenizer
    from ray_app.model.loading import build_tiny_llama
    from ray_app.quickstart import TOKENIZER_DIR
    from ray_app.train.methods.answers import answer_logps

    model = build_tiny_llama(load_tokenizer(str(TOKENIZER_DIR)), seed=0).eval()
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 500, n) for n in (9, 5, 12, 7)]
    labels = [np.where(np.arange(len(r)) < 3, IGNORE, r) for r in rows]
    batch = PairCollate(pad_id=0)({"input_ids": rows[:2], "labels": labels[:2],
                                   "rejected_input_ids": rows[2:], "rejected_labels": labels[2:]})
    with torch.no_grad():
        sums, counts = answer_logps(model, batch, contextlib.nullcontext())
        for i, (ids, lab) in enumerate(zip(rows, labels)):
            logp = torch.log_softmax(model(torch.as_tensor(ids)[None]).logits[0, :-1], -1)
            want = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if lab[t] != IGNORE)
            assert float(sums[i]) == pytest.approx(want, abs=1e-4)
            assert int(counts[i]) == len(ids) - 3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Preference pairs plus records of other formats, which DPO must reject by name."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = random.Random(3)
    write_lines(folder / "p.jsonl", [json.dumps(r) for r in build_assets.preference_records(rng, 200)])
    write_lines(folder / "a.jsonl", [json.dumps(r) for r in build_assets.alpaca_records(rng, 5)])
    return folder


def _dpo_config(data: Path, tmp: Path, **train):
    return tiny_config(data, tmp, data={"eval_fraction": 0.15, "max_seq_len": 64},
                       train={"method": "dpo", "max_steps": 8, "lr": 3e-3,
                              "batch_size_per_worker": 8, "checkpoint_every": 4,
                              "eval_every": 0, **train},
                       scaling=ONE_WORKER, run={"name": "dpo", "max_failures": 1})


@pytest.mark.ray
def test_dpo_run_learns_the_preference_and_recovers_like_sft(
        ray_cluster, pairs, tmp_path, monkeypatch):
    from ray_app.train.run import run_training

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "6")  # after the checkpoint at step 4
    summary = run_training(validate_config(_dpo_config(pairs, tmp_path)), Console(width=120))
    assert summary["status"] == "succeeded", summary.get("error")
    data, evals, train = summary["data"], summary["eval"], summary["train"]
    assert data["record_kind"] == "pairs" and data["rejected"] == 5  # the alpaca records, each reported
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects" / "rejects.jsonl")
               .read_text().splitlines()]
    assert len(rejects) == 5 and all("train.method=dpo" in r["reason"] for r in rejects)
    # The reference is the base with the adapter disabled: at step 0 policy == reference.
    assert evals["loss_initial"] == pytest.approx(math.log(2), abs=1e-4)
    assert evals["reward_accuracy_initial"] == 0 and evals["reward_margin_initial"] == 0
    assert evals["reward_accuracy_final"] > 0.8 and evals["reward_margin_final"] > 0.5
    assert evals["loss_final"] < 0.5
    assert (train["steps"], train["restarts"], train["resumed_from_step"]) == (8, 1, 4)
