"""ORPO, SimPO and KTO (train.method=orpo|simpo|kto): the losses against references
written here from the papers and against TRL's own trainers on the same numbers, the
unpaired data format and KTO's mismatched KL rows, and one short run of each through Ray
Train whose preference metrics move the right way."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console
from support import tiny_config, write_lines

from ray_app.config import KtoSection, SimpoSection, validate_config
from ray_app.data.formats import RecordError, detect_format, to_completion, to_turns
from ray_app.data.tokenize import IGNORE, load_tokenizer
from ray_app.quickstart import build_assets
from ray_app.train.methods.answers import CompletionCollate, kl_view
from ray_app.train.methods.kto import KTO, kto_losses
from ray_app.train.methods.orpo import orpo_losses
from ray_app.train.methods.simpo import simpo_losses

# Per-answer log-prob sums and token counts of 3 pairs: chosen rows first, then rejected.
LOGPS = torch.tensor([-6.0, -2.5, -12.0, -9.0, -1.5, -4.0], dtype=torch.float64)
TOKENS = torch.tensor([3, 5, 4, 3, 1, 8])
MEANS = [(-2.0, -3.0), (-0.5, -1.5), (-3.0, -0.5)]  # (chosen, rejected) per token


def test_orpo_matches_the_papers_odds_ratio_loss():
    losses, stats = orpo_losses(LOGPS, TOKENS, beta=0.25)
    for i, (c, r) in enumerate(MEANS):
        # odds(y) = p / (1 - p) with p the mean per-token probability, ORPO paper eq. 4-7
        odds_c, odds_r = math.exp(c) / (1 - math.exp(c)), math.exp(r) / (1 - math.exp(r))
        log_or = math.log(odds_c / odds_r)
        want = -c - 0.25 * math.log(1 / (1 + math.exp(-log_or)))
        assert float(losses[i]) == pytest.approx(want, rel=1e-9)
        assert float(stats[i, 3]) == pytest.approx(log_or, rel=1e-9)  # log_odds_chosen
        assert float(stats[i, 1]) == pytest.approx(-c)  # nll_loss
        assert float(stats[i, 4]) == (1.0 if c > r else 0.0)  # reward accuracy
    assert torch.allclose(stats[:, 6], 0.25 * torch.tensor([c for c, _ in MEANS], dtype=torch.float64))


def test_simpo_matches_the_papers_length_normalised_loss():
    settings = SimpoSection(beta=2.0, gamma=0.6, label_smoothing=0.1)
    losses, stats = simpo_losses(LOGPS, TOKENS, settings)
    for i, (c, r) in enumerate(MEANS):
        z = 2.0 * c - 2.0 * r - 0.6  # SimPO paper eq. 6: beta/|y_w| log p - beta/|y_l| log p - gamma
        want = -0.9 * math.log(1 / (1 + math.exp(-z))) - 0.1 * math.log(1 / (1 + math.exp(z)))
        assert float(losses[i]) == pytest.approx(want, rel=1e-9)
        assert float(stats[i, 2]) == pytest.approx(2.0 * (c - r))  # reward margin
    assert stats[:, 1].tolist() == [1.0, 1.0, 0.0]


def _kto() -> KTO:
    return KTO(validate_config({"data": {"train": ["x.jsonl"]}, "train": {"method": "kto"}}))


def test_kto_matches_the_papers_value_function():
    policy = torch.tensor([-3.0, -5.0, -2.0, -8.0], dtype=torch.float64)
    reference = torch.tensor([-4.0, -4.5, -2.0, -6.0], dtype=torch.float64)
    desirable = torch.tensor([True, True, False, False])
    settings = KtoSection(beta=0.5, desirable_weight=1.5, undesirable_weight=0.8)
    losses, stats = kto_losses(policy, reference, torch.tensor(0.3, dtype=torch.float64),
                               desirable, settings)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))
    want = [1.5 * (1 - sigmoid(0.5 * (1.0 - 0.3))), 1.5 * (1 - sigmoid(0.5 * (-0.5 - 0.3))),
            0.8 * (1 - sigmoid(0.5 * (0.3 - 0.0))), 0.8 * (1 - sigmoid(0.5 * (0.3 + 2.0)))]
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    metrics = _kto().metrics(dict(zip(KTO.STATS, (stats.sum(0) / 4).tolist())))
    assert metrics["chosen_reward"] == pytest.approx(0.5 * (1.0 - 0.5) / 2)
    assert metrics["rejected_reward"] == pytest.approx(0.5 * (0.0 - 2.0) / 2)
    assert metrics["reward_margin"] == pytest.approx(0.125 + 0.5)
    assert metrics["kl"] == pytest.approx(0.3) and metrics["desirable_share"] == 0.5


def _trl_self(**settings):
    return SimpleNamespace(accelerator=SimpleNamespace(device="cpu"), alpha=0.0, **settings)


def test_orpo_and_simpo_equal_trls_trainers_on_the_same_log_probs():
    pytest.importorskip("trl")  # not a dependency: checked where it is installed
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    means = LOGPS / TOKENS
    chosen, rejected = means.chunk(2)
    trl_ratio, *_ = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.25), chosen, rejected)
    losses, stats = orpo_losses(LOGPS, TOKENS, beta=0.25)
    # TRL's total is nll - mean(beta * ratio); per pair the odds-ratio part is the same.
    # TRL computes in float32.
    assert torch.allclose(losses - stats[:, 1], -trl_ratio.double(), atol=1e-6)

    settings = SimpoSection(beta=2.0, gamma=0.6, label_smoothing=0.1)
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(
        _trl_self(beta=2.0, loss_type="simpo", simpo_gamma=0.6, label_smoothing=0.1),
        chosen, rejected)
    losses, stats = simpo_losses(LOGPS, TOKENS, settings)
    assert torch.allclose(losses, trl_losses.double(), atol=1e-6)
    assert torch.allclose(stats[:, 3], trl_chosen.double(), atol=1e-6)
    assert torch.allclose(stats[:, 4], trl_rejected.double(), atol=1e-6)


def test_kto_equals_trls_trainer_on_the_same_log_probs():
    """TRL's KTOTrainer._compute_loss on a batch whose model outputs are the given
    per-token log-probs (its reference and KL log-probs precomputed)."""
    pytest.importorskip("trl")
    from trl import KTOTrainer

    policy = torch.tensor([-3.0, -5.0, -2.0, -8.0, -1.0], dtype=torch.float64)
    reference = torch.tensor([-4.0, -4.5, -2.0, -6.0, -1.5], dtype=torch.float64)
    kl_policy = torch.tensor([-7.0, -3.0, -4.0, -6.0, -2.0], dtype=torch.float64)
    kl_reference = torch.tensor([-7.5, -3.5, -3.0, -6.5, -2.0], dtype=torch.float64)
    labels = [True, True, False, False, True]
    n, width = len(labels), 4

    def model(**_):
        log_probs = torch.zeros(n, width - 1, dtype=torch.float64)
        log_probs[:, 0] = policy
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs),
                               mean_logits=torch.zeros_like(log_probs))

    fake = SimpleNamespace(
        model=SimpleNamespace(training=True), calculate_KL=True, precompute_ref_logps=True,
        loss_type="kto", beta=0.5, desirable_weight=1.5, undesirable_weight=0.8,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda t: t.reshape(-1)),
        _compute_kl_logps=lambda model, batch: kl_policy)
    batch = {"input_ids": torch.ones(n, width, dtype=torch.long),
             "attention_mask": torch.ones(n, width, dtype=torch.long),
             "completion_mask": torch.ones(n, width, dtype=torch.long),
             "label": torch.tensor(labels), "ref_logps": reference, "ref_KL_logps": kl_reference}
    trl_loss = KTOTrainer._compute_loss(fake, model, batch, return_outputs=False)

    kl = (kl_policy - kl_reference).mean().clamp(min=0)
    settings = KtoSection(beta=0.5, desirable_weight=1.5, undesirable_weight=0.8)
    losses, stats = kto_losses(policy, reference, kl, torch.tensor(labels), settings)
    assert float(losses.mean()) == pytest.approx(float(trl_loss), rel=1e-12)
    metrics = _kto().metrics(dict(zip(KTO.STATS, (stats.sum(0) / n).tolist())))
    train = fake._metrics["train"]
    assert metrics["kl"] == pytest.approx(train["kl"][-1])
    assert metrics["chosen_reward"] == pytest.approx(train["rewards/chosen"][-1])
    assert metrics["rejected_reward"] == pytest.approx(train["rewards/rejected"][-1])
    assert metrics["reward_margin"] == pytest.approx(train["rewards/margins"][-1])


def test_unpaired_records_are_read_with_their_label():
    record = {"prompt": "Hi?", "completion": "Hello.", "label": False}
    assert detect_format(record) == "unpaired"
    one = to_completion(record)
    assert (one.completion.content, one.desirable, one.prompt[0].role) == ("Hello.", False, "user")
    assert to_completion({**record, "label": True}).desirable
    with pytest.raises(RecordError, match="'label' must be true or false, got 'yes'"):
        to_completion({**record, "label": "yes"})
    with pytest.raises(RecordError, match="missing field 'label'"):
        to_completion({"prompt": "Hi?", "completion": "Hello."})
    # SFT trains on a desirable completion only.
    assert to_turns({**record, "label": True}, "unpaired")[-1].content == "Hello."
    with pytest.raises(RecordError, match="undesirable completion"):
        to_turns(record, "unpaired")


def test_kto_kl_rows_pair_each_prompt_with_the_previous_records_completion():
    ids = [np.array([1, 2, 10, 11]), np.array([3, 20]), np.array([4, 5, 6, 30, 31, 32])]
    labels = [np.array([IGNORE, IGNORE, 10, 11]), np.array([IGNORE, 20]),
              np.array([IGNORE, IGNORE, IGNORE, 30, 31, 32])]
    batch = CompletionCollate(pad_id=0, max_len=6)(
        {"input_ids": ids, "labels": labels, "desirable": [True, False, True], "sample_id": [5, 6, 7]})
    kl = kl_view(batch)
    rows = [r[r != 0].tolist() for r in kl["input_ids"]]
    assert rows == [[1, 2, 30, 31, 32], [3, 10, 11], [4, 5, 6, 20]]
    assert [r[r != IGNORE].tolist() for r in kl["labels"]] == [[30, 31, 32], [10, 11], [20]]
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["num_real_tokens"] == 12 + 12  # the completions and the KL rows
    cut = kl_view(CompletionCollate(pad_id=0, max_len=4)(
        {"input_ids": ids, "labels": labels, "desirable": [True] * 3}))
    assert cut["input_ids"][0, :4].tolist() == [1, 2, 30, 31]  # cut to max_len
    assert int((cut["row_index"][0] == 0).sum()) == 4


@pytest.fixture(scope="module")
def feedback(tmp_path_factory) -> Path:
    """Preference pairs, the same kind of task as unpaired thumbs-up/down records, and
    records of another format that every preference method rejects."""
    folder = tmp_path_factory.mktemp("feedback")
    rng = random.Random(5)
    pairs = build_assets.preference_records(rng, 200)
    write_lines(folder / "pairs.jsonl", [json.dumps(r) for r in pairs[:120]])
    unpaired = [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                for p in pairs[120:] for key in ("chosen", "rejected")]
    write_lines(folder / "unpaired.jsonl", [json.dumps(r) for r in unpaired])
    write_lines(folder / "alpaca.jsonl", [json.dumps(r) for r in build_assets.alpaca_records(rng, 4)])
    return folder


# One run per method, each also carrying LoRA variants under another strategy, so that
# three short runs cover every method, every strategy, QLoRA and the variants' checkpoints.
RUNS = {
    # FSDP2 + DoRA + rsLoRA + LoRA+.
    "orpo": ({"beta": 0.5}, {"strategy": "fsdp"},
             {"use_dora": True, "use_rslora": True}, {"lora_plus_ratio": 4}, {"quantization": "none"}),
    # DeepSpeed ZeRO-3 + PiSSA: the exported adapter is converted for the original base.
    "simpo": ({"beta": 2.0, "gamma": 0.5}, {"strategy": "deepspeed"}, {"init": "pissa"}, {},
              {"quantization": "none"}),
    # DDP + QLoRA + DoRA.
    "kto": ({"beta": 0.5}, {"strategy": "ddp"}, {"use_dora": True}, {}, {"quantization": "nf4"}),
}


@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.parametrize("method", list(RUNS))
def test_a_short_run_learns_the_preference(ray_cluster, feedback, tmp_path_factory, method):
    from ray_app.train.run import run_training

    settings, scaling, lora, train, model = RUNS[method]
    tmp = tmp_path_factory.mktemp(method)
    cfg = tiny_config(feedback, tmp, data={"eval_fraction": 0.15, "max_seq_len": 64},
                      train={"method": method, method: settings, "max_steps": 8, "lr": 3e-3,
                             "batch_size_per_worker": 4, "checkpoint_every": 8, **train},
                      lora=lora, scaling=scaling, model=model, run={"name": method})
    seen: list[dict] = []
    summary = run_training(validate_config(cfg), Console(width=120), on_metrics=seen.append)
    assert summary["status"] == "succeeded", summary.get("error")
    data, evals = summary["data"], summary["eval"]
    # The alpaca records, and for the pair methods the unpaired ones too, each with a reason.
    assert data["rejected"] == (4 if method == "kto" else 4 + 160)
    assert {m["step"] for m in seen if m.get("loss") is not None} == set(range(1, 9))
    assert evals["loss_final"] < evals["loss_initial"]
    if method == "kto":
        assert data["record_kind"] == "completions"
        assert evals["loss_initial"] == pytest.approx(0.5, abs=1e-4)  # policy == reference
        assert evals["reward_margin_initial"] == pytest.approx(0, abs=1e-6)
        assert evals["reward_margin_final"] > 0.5 and evals["kl_final"] >= 0
        assert all({"kl", "chosen_reward", "rejected_reward"} <= set(m) for m in seen
                   if m.get("loss") is not None)
    else:
        assert data["record_kind"] == "pairs"
        assert evals["reward_margin_final"] > evals["reward_margin_initial"]
        assert evals["reward_accuracy_final"] > 0.8
    adapter = json.loads((Path(summary["adapter_path"]) / "adapter_config.json").read_text())
    assert adapter["use_dora"] is bool(lora.get("use_dora"))
    if method == "orpo":
        assert evals["log_odds_ratio_final"] > evals["log_odds_ratio_initial"]
        assert evals["nll_loss_final"] < evals["nll_loss_initial"]
        assert adapter["use_rslora"] is True
    if method == "simpo":
        _merged_model_is_the_trained_one(summary, tmp)


def _merged_model_is_the_trained_one(summary: dict, tmp: Path) -> None:
    """The PiSSA run's exported adapter merges onto the original base into the model the
    run trained: the last checkpoint's own PiSSA adapter, which PEFT re-initialises from
    the base when it loads it (its config says init_lora_weights: pissa)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_app.export.merge import SAMPLE_TEXTS, merge_adapter

    base = str(tmp / "out" / "base_model")
    result = merge_adapter(summary["adapter_path"], str(tmp / "merged"), base, "float32", "5GB",
                           None, Console(width=120))
    checkpoint = Path(summary["checkpoints"][-1])
    assert json.loads((checkpoint / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), checkpoint).eval()
    merged = AutoModelForCausalLM.from_pretrained(result.out).eval()
    ids = load_tokenizer(base)(list(SAMPLE_TEXTS[:1]), return_tensors="pt").input_ids
    with torch.no_grad():
        want = trained(ids).logits
        diff = float((merged(ids).logits - want).abs().max())
    # float32 summation-order noise only, as ray-app merge allows it
    assert diff <= 1e-4 * max(1.0, float(want.abs().max())), diff
