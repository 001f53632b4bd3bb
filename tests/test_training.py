"""Ray Train end to end: a 2-worker run writes a loadable adapter and its summary
(recovery and reruns: test_recovery.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from support import ONE_WORKER, tiny_config

from ray_app.config import validate_config
from ray_app.train.run import run_training

pytestmark = pytest.mark.ray


def _train(cfg_dict) -> dict:
    return run_training(validate_config(cfg_dict), Console(width=120))


def test_two_workers_write_a_loadable_adapter_and_summary(ray_cluster, small_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = _train(tiny_config(small_data, tmp_path))
    assert summary["status"] == "succeeded", summary.get("error")
    out = tmp_path / "out"
    on_disk = json.loads((out / "run_summary.json").read_text())
    assert on_disk["train"]["steps"] == 4 and on_disk["train"]["tokens_seen"] > 0
    assert on_disk["train"]["tokens_per_s"] > 0 and on_disk["train"]["restarts"] == 0
    data = on_disk["data"]
    assert data["records_read"] == data["accepted"] + data["rejected"] + data["duplicates"] == 380
    assert on_disk["eval"]["loss_initial"] > on_disk["eval"]["loss_final"] > 0
    assert set(on_disk["versions"]) >= {"python", "ray", "torch", "transformers", "peft"}
    assert len(on_disk["checkpoints"]) == 2  # steps 2 and 4
    final = Path(on_disk["adapter_path"])
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    ids = tokenizer("What is 1 + 2?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape[-1] == len(tokenizer)


@pytest.mark.timeout(420)
def test_a_hostile_corpus_trains_with_every_line_accounted_for(ray_cluster, tmp_path):
    """The corpus of tests/support_hostile.py (deep nesting, huge ints, lone surrogates,
    cut and corrupt compressed shards, empty shards, refusing chat templates, ...) goes
    through `ray-app train` as it goes through `ray-app data`: the run succeeds, and each
    shard's accounting is what its writer expected."""
    from support_hostile import hostile_corpus, hostile_data_config

    corpus = hostile_corpus(tmp_path)
    cfg = tiny_config(corpus.folder, tmp_path, data=hostile_data_config(),
                      train={"max_steps": 2, "batch_size_per_worker": 4}, scaling=ONE_WORKER)
    cfg["model"]["tokenizer"] = str(corpus.tokenizer)
    summary = _train(cfg)
    assert summary["status"] == "succeeded", summary.get("error")
    assert summary["train"]["steps"] == 2 and Path(summary["adapter_path"]).is_dir()
    files = {Path(f["path"]).name: f for f in summary["data"]["files"]}
    assert set(files) == set(corpus.expected)
    for name, want in corpus.expected.items():
        got = files[name]
        assert (got["records_read"], got["accepted"], got["rejected"], got["duplicates"]) == (
            want.read, want.accepted, want.rejected, want.duplicates), name
    rejects = (tmp_path / "out" / "rejects" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == sum(w.rejected for w in corpus.expected.values())
