"""`ray-app eval` and `ray-app merge` on one adapter trained for a few steps.

The adapter is trained once per module (about a minute on 2 CPU cores) and shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console
from support import ONE_WORKER, tiny_config

from ray_app.cli import main
from ray_app.config import validate_config
from ray_app.data.tokenize import IGNORE
from ray_app.export.metrics import exact_match, generation_scores, rouge_l
from ray_app.export.scoring import prompt_and_reference
from ray_app.quickstart import TINY_LLAMA, TOKENIZER_DIR


@pytest.fixture(scope="module")
def trained(ray_cluster, small_data, tmp_path_factory) -> dict[str, Path]:
    from ray_app.train.run import run_training

    tmp = tmp_path_factory.mktemp("eval_merge")
    cfg = tiny_config(small_data, tmp, run={"name": "evalmerge"}, scaling=ONE_WORKER,
                      train={"max_steps": 6, "checkpoint_every": 6, "batch_size_per_worker": 16})
    cfg["eval"] = {"max_new_tokens": 6, "batch_size": 16}
    summary = run_training(validate_config(cfg), Console(width=120))
    assert summary["status"] == "succeeded", summary.get("error")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return {"config": config, "output": tmp / "out", "adapter": Path(summary["adapter_path"]),
            "tmp": tmp}


@pytest.fixture(scope="module")
def other_base(tmp_path_factory) -> Path:
    """A Llama of another width: the adapter's LoRA shapes do not fit it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_app.data.tokenize import load_tokenizer

    folder = tmp_path_factory.mktemp("other_base")
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    config = LlamaConfig(**{**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 176},
                         vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.ray
def test_eval_reports_lower_perplexity_for_the_trained_adapter(trained, capsys):
    code = main(["eval", str(trained["config"]), "--adapter", str(trained["adapter"])])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "base + adapter" in out and "perplexity" in out
    results = json.loads((trained["output"] / "eval" / "eval_results.json").read_text())
    base, tuned = results["models"]["base"], results["models"]["adapter"]
    assert tuned["perplexity"] < base["perplexity"]
    assert results["records"] > 0 and results["tokens"] > 0 and results["max_new_tokens"] == 6
    # alpaca and chat records have reference answers; plain text records do not
    assert 0 < results["generated"] < results["records"]
    for side in (base, tuned):
        for key in ("rouge_l", "bleu", "exact_match"):
            assert 0.0 <= side[key] <= 100.0
    lines = (trained["output"] / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == results["generated"]
    first = json.loads(lines[0])
    assert set(first) == {"prompt", "reference", "base", "adapter", "rouge_l_base",
                          "rouge_l_adapter"}
    assert first["prompt"].endswith("<|im_start|>assistant\n") and first["reference"]


@pytest.mark.ray
def test_merged_model_reproduces_base_plus_adapter(trained, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = trained["tmp"] / "merged"
    code = main(["merge", "--adapter", str(trained["adapter"]), "--out", str(merged),
                 "--max-shard-size", "200KB"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Check passed: max |logit difference|" in out
    names = {p.name for p in merged.iterdir()}
    assert "model.safetensors.index.json" in names and "config.json" in names
    assert sum(n.endswith(".safetensors") for n in names) > 1  # sharded
    assert "tokenizer.json" in names
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(trained["output"] / "base_model")
    reference = PeftModel.from_pretrained(base, trained["adapter"])
    ids = AutoTokenizer.from_pretrained(merged)("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


@pytest.mark.ray
def test_merge_that_does_not_reproduce_the_adapter_fails_and_keeps_its_files(trained, capsys):
    out = trained["tmp"] / "merged_bf16"
    code = main(["merge", "--adapter", str(trained["adapter"]), "--out", str(out),
                 "--dtype", "bfloat16", "--tolerance", "1e-9"])
    text = capsys.readouterr().out
    assert code == 2 and "does not reproduce base + adapter" in text and "Traceback" not in text
    assert not out.exists() and (out.parent / "merged_bf16.unverified" / "config.json").exists()


@pytest.mark.ray
def test_missing_adapter_folder_is_a_clear_error(trained, capsys):
    missing = str(trained["tmp"] / "no_such_adapter")
    assert main(["eval", str(trained["config"]), "--adapter", missing]) == 2
    assert main(["merge", "--adapter", missing, "--out", str(trained["tmp"] / "m")]) == 2
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert out.count("no such folder") == 2 and "Traceback" not in out


@pytest.mark.ray
def test_adapter_for_a_different_base_is_a_clear_error(trained, other_base, capsys):
    adapter = str(trained["adapter"])
    assert main(["merge", "--adapter", adapter, "--base", str(other_base),
                 "--out", str(trained["tmp"] / "m")]) == 2
    assert main(["eval", str(trained["config"]), "--adapter", adapter,
                 "--set", f"model.name_or_path={other_base}"]) == 2
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert out.count("does not fit the base model") == 2 and "Traceback" not in out
    assert "down_proj has input size 176, the adapter's lora_A expects 352" in out


def test_prompt_and_reference_split_at_the_first_trained_span():
    ids = [10, 11, 12, 13, 14, 15, 16, 17]
    labels = [IGNORE, IGNORE, IGNORE, 13, 14, IGNORE, 16, 17]
    assert prompt_and_reference(ids, labels) == ([10, 11, 12], [13, 14])
    # a plain text record: only the first label is masked
    assert prompt_and_reference(ids, [IGNORE] + ids[1:]) is None
    assert prompt_and_reference(ids, np.full(8, IGNORE)) is None


def test_generation_metrics():
    assert rouge_l("the cat sat", "the cat sat") == 100.0
    assert rouge_l("a dog", "the cat") == 0.0
    assert exact_match(" Paris\n", "Paris") and not exact_match("Paris.", "Paris")
    scores = generation_scores(["the cat sat on the mat", "the capital is Kyiv"],
                               ["the cat sat on the mat", "the capital is Kiev"])
    assert scores["exact_match"] == 50.0 and scores["rouge_l"] == pytest.approx(87.5)
    assert 0.0 < scores["bleu"] <= 100.0
    assert generation_scores([], []) == {"rouge_l": None, "bleu": None, "exact_match": None}
