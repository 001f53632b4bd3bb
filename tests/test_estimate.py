"""`ray-app estimate`: the memory arithmetic against what PyTorch keeps, and the CLI."""

from __future__ import annotations

import gc
import json
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ray_app.cli import main
from ray_app.estimate import GIB, Plan, adapter_params, estimate, recommend, shape_of

REPO = Path(__file__).resolve().parents[1]

LLAMA_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama_8b_folder(tmp_path_factory) -> Path:
    """A Llama-3.1-8B config (no weights): what `--model` reads from a checkpoint folder."""
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama8b")
    LlamaConfig(**LLAMA_8B).save_pretrained(folder)
    return folder


def small_llama():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def run_json(capsys, *args: str) -> tuple[int, dict]:
    """`ray-app estimate --json` on the quickstart config at 2048 tokens per sequence."""
    rc = main(["estimate", "--seq-len", "2048", *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def test_parameter_counts_match_the_model_and_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = small_llama()
    shape = shape_of(config, "small")
    model = LlamaForCausalLM(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    for targets in ("all-linear", ("q_proj", "v_proj")):
        peft = get_peft_model(LlamaForCausalLM(config), LoraConfig(
            r=8, target_modules=targets if targets == "all-linear" else list(targets)))
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert adapter_params(shape, Plan(lora_r=8, lora_targets=targets)) == trainable


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")])
def test_activations_match_what_autograd_saves_for_a_decoder_layer(targets):
    """Bytes saved for backward by one LoRA decoder layer under bf16 autocast (the GPU
    training path; HF kernels, as without Liger), against the estimate's count."""
    dora = False
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = small_llama()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)
    model = get_peft_model(model, LoraConfig(
        r=8, lora_dropout=0.0, use_dora=dora,
        target_modules=targets if targets == "all-linear" else list(targets)))
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch, seq = 2, 128
    inner = model.base_model.model.model
    x = torch.randn(batch, seq, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(seq)[None].expand(batch, seq)
    rope = inner.rotary_emb(x, positions)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        inner.layers[0](x, position_embeddings=rope, position_ids=positions)
    measured = sum(saved.values())

    shape = shape_of(config, "small")
    plan = Plan(lora_r=8, lora_targets=targets, lora_dropout=0.0, liger=False, seq_len=seq,
                batch=batch, dora=dora)
    est = estimate(shape, plan)
    per_layer = (est.parts["activations"]) / shape.layers
    copies = adapter_params(shape, plan) * 2 / shape.layers  # bf16 adapter copies
    assert measured == pytest.approx(per_layer + copies, rel=0.05)


def test_dora_adds_what_each_adapted_linear_saves_beyond_lora():
    """DoRA (PEFT) keeps more for backward in each adapted linear than LoRA does (its base
    and LoRA outputs, for the magnitude's gradient): measured per linear under bf16
    autocast, with and without `use_dora`, against the estimate's difference."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = small_llama()
    batch, seq = 2, 128

    def saved_by_linears(use_dora: bool) -> int:
        torch.manual_seed(0)
        model = get_peft_model(LlamaForCausalLM(config).to(torch.bfloat16), LoraConfig(
            r=8, lora_dropout=0.0, use_dora=use_dora, target_modules="all-linear"))
        model.train()
        layer = model.base_model.model.model.layers[0]
        total = 0
        for module in layer.modules():
            if not hasattr(module, "lora_A"):
                continue
            weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
            saved: dict[int, tuple] = {}

            def keep(t, weights=weights, saved=saved):
                if t.untyped_storage().data_ptr() not in weights:
                    saved[t.untyped_storage().data_ptr()] = (weakref.ref(t),
                                                             t.untyped_storage().nbytes())
                return t

            x = torch.randn(batch, seq, module.in_features, dtype=torch.bfloat16,
                            requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
                    torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x)
            # What the output's graph still holds for backward: PEFT's DoRA also computes
            # B @ A through the layers (an identity matrix in, saved), then detaches it, so
            # that graph and what it saved are freed as soon as the forward returns.
            gc.collect()
            total += sum(n for ref, n in saved.values() if ref() is not None)
            del y
        return total

    measured = saved_by_linears(True) - saved_by_linears(False)
    shape = shape_of(config, "small")
    plans = [Plan(lora_r=8, lora_targets="all-linear", lora_dropout=0.0, liger=False,
                  seq_len=seq, batch=batch, dora=dora) for dora in (False, True)]
    lora, dora = (estimate(shape, plan).parts["activations"] / shape.layers for plan in plans)
    assert measured > 0
    assert dora - lora == pytest.approx(measured, rel=0.05)


def test_8b_figures_follow_the_method_and_strategy(llama_8b_folder, capsys):
    rc, lora = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "1", "--batch", "1")
    assert rc == 0
    params = lora["params"]
    assert params == pytest.approx(8.03e9, rel=0.01)
    gib = lora["gib_per_gpu"]
    assert gib["weights"] == pytest.approx(params * 2 / GIB, rel=0.01)  # bf16
    _, qlora = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "1", "--batch", "1",
                        "--method", "qlora")
    # NF4 linears (~0.52 B/param) with bf16 embeddings and lm_head: 5.3 GiB for 8B.
    assert 5.0 < qlora["gib_per_gpu"]["weights"] < 5.6
    _, fsdp = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "4", "--batch", "1",
                       "--strategy", "fsdp")
    assert fsdp["gib_per_gpu"]["weights"] < gib["weights"] / 3  # a quarter + gathered layers
    _, full = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "1", "--batch", "1",
                       "--method", "full")
    assert full["gib_per_gpu"]["optimizer"] == pytest.approx(params * 8 / GIB, rel=0.01)


def test_checkpointing_and_fused_loss_shrink_their_parts():
    from transformers import LlamaConfig

    shape = shape_of(LlamaConfig(**LLAMA_8B), "8b")
    plan = Plan(batch=4, seq_len=2048, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    base = estimate(shape, plan).parts
    ckpt = estimate(shape, replace(plan, checkpointing="all")).parts
    every2 = estimate(shape, replace(plan, checkpointing=2)).parts
    assert ckpt["activations"] < every2["activations"] < base["activations"]
    assert ckpt["activations"] < base["activations"] / 10
    unfused = estimate(shape, replace(plan, liger=False)).parts
    # Full logits: bf16, fp32 copy, fp32 log-softmax and its gradient for 8192 tokens.
    assert unfused["logits"] == 4 * 2048 * 128256 * 12
    assert base["logits"] < unfused["logits"] / 10


def test_recommendation_fits_the_gpu_and_names_config_keys(llama_8b_folder, capsys):
    rc, out = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "1", "--batch", "8",
                       "--gpu-memory-gib", "80")
    rec = out["recommendation"]
    assert out["gib_per_gpu"]["peak"] > 80 * 0.9  # batch 8 without checkpointing: too big
    assert rc == 0 and rec["fits"]
    assert "train.activation_checkpointing" in rec["changes"]
    assert rec["gib_per_gpu"]["peak"] <= 80 * 0.9
    # A 16 GiB GPU cannot hold the bf16 8B base (15 GiB): it needs the 4-bit one.
    rc, out = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "1", "--batch", "4",
                       "--gpu-memory-gib", "16")
    assert rc == 0 and out["recommendation"]["changes"]["model.quantization"] == "nf4"
    # Nothing fits in 4 GiB: exit code 1 and a plain statement of it.
    rc = main(["estimate", "--model", str(llama_8b_folder), "--gpus", "1", "--seq-len", "2048",
               "--gpu-memory-gib", "4"])
    assert rc == 1
    assert "Does not fit" in capsys.readouterr().out


def test_settings_that_fit_are_kept_unless_a_faster_one_fits():
    from transformers import LlamaConfig

    shape = shape_of(LlamaConfig(**LLAMA_8B), "8b")
    rec = recommend(shape, Plan(method="qlora", batch=1), gpu_gib=80)
    assert rec.fits and rec.changes == {}
    # Recomputation that the memory does not need is turned off: it costs a third of a step.
    rec = recommend(shape, Plan(method="qlora", batch=1, checkpointing="all"), gpu_gib=80)
    assert rec.changes == {"train.activation_checkpointing": "none"}
    assert rec.why.startswith("the given settings fit; these are faster")


def test_the_quickstart_config_and_a_table(capsys):
    assert main(["estimate"]) == 0
    out = capsys.readouterr().out
    assert "builtin:tiny-llama" in out and "activations" in out and "training peak" in out


def test_a_model_that_cannot_be_read_gets_a_clear_error(tmp_path, capsys):
    assert main(["estimate", "--model", str(tmp_path / "missing")]) == 2
    assert "Cannot load the base model config" in capsys.readouterr().out
    assert main(["estimate", "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().out


def test_estimate_stays_within_15_percent_of_the_measured_training_peaks():
    """The GPU runs whose training peak was measured apart from evaluation
    (bench/results/gpu_throughput.json, H100)."""
    sys.path.insert(0, str(REPO / "bench"))
    from estimate_check import check

    rows = json.loads((REPO / "bench/results/gpu_throughput.json").read_text())
    train = [r for r in check(rows) if r["compared"] == "train peak"]
    assert len(train) >= 4
    for row in train:
        assert abs(row["error"]) <= 0.15, row


def test_each_training_method_counts_its_rows_and_logits(llama_8b_folder):
    """DPO, ORPO and SimPO hold chosen and rejected rows; KTO's reference and KL passes
    keep nothing; every preference method scores answers from their logits a chunk at a
    time, Liger or not, while SFT with Liger never holds them."""
    from transformers import AutoConfig

    from ray_app.config import validate_config
    from ray_app.estimate import plan_from_config

    shape = shape_of(AutoConfig.from_pretrained(llama_8b_folder))
    peaks = {}
    for method in ("sft", "dpo", "orpo", "simpo", "kto"):
        cfg = validate_config({"data": {"train": ["x.jsonl"], "max_seq_len": 2048},
                               "train": {"method": method, "batch_size_per_worker": 2},
                               "scaling": {"use_gpu": True, "num_workers": 1}})
        plan = plan_from_config(cfg, liger_auto=True)
        assert (plan.rows, plan.full_logits) == {"sft": (1, False), "kto": (1, True)}.get(
            method, (2, True))
        peaks[method] = estimate(shape, plan).parts
    assert peaks["dpo"] == peaks["orpo"] == peaks["simpo"]
    # One chunk of answer tokens' logits at a time (1 GiB of bf16 logits, fp32 copy and
    # log-softmax), in training also its gradient, plus every answer token's hidden state.
    chunk = (1 << 30) // (10 * shape.vocab)
    for method, tokens in (("kto", 2 * 2048), ("dpo", 4 * 2048)):
        assert peaks[method]["logits"] == pytest.approx(
            chunk * shape.vocab * 12 + tokens * shape.hidden * 2)
    assert peaks["dpo"]["logits"] < 1.3 * (1 << 30)  # whole logits: 12.6 GB
    assert peaks["sft"]["logits"] < peaks["kto"]["logits"]  # Liger: one chunk at a time
    assert peaks["dpo"]["activations"] == pytest.approx(2 * peaks["kto"]["activations"])


def test_the_fp8_base_is_counted_whole_on_every_gpu_and_turned_back_when_it_cannot_fit():
    """model.precision: fp8 keeps two e4m3 copies (2 B/param, as bf16) of the decoder linears
    with both sides >= 2048 (all but k/v_proj of these shapes) as buffers FSDP does not
    shard; a 70B base that way cannot fit 80 GB GPUs, and the recommendation says so."""
    from transformers import LlamaConfig

    shape = shape_of(LlamaConfig(**LLAMA_8B), "8b")
    h, i = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"]
    fp8_bytes = LLAMA_8B["num_hidden_layers"] * (2 * h * h + 3 * h * i) * 2  # q, o, MLP
    one, one_fp8 = (estimate(shape, Plan(batch=1, fp8=fp8)).parts["weights"]
                    for fp8 in (False, True))
    assert one_fp8 == one  # one GPU: the same bytes
    four, four_fp8 = (estimate(shape, Plan(batch=1, fp8=fp8, strategy="fsdp", gpus=4))
                      for fp8 in (False, True))
    assert four_fp8.parts["weights"] > fp8_bytes > four.parts["weights"]
    assert four_fp8.parts["weights"] < fp8_bytes + four.parts["weights"]
    assert any("held whole on every GPU" in note for note in four_fp8.notes)
    assert not four.notes

    llama_70b = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                            tie_word_embeddings=False)
    shape70 = shape_of(llama_70b, "70b")
    plan = Plan(batch=1, fp8=True, strategy="fsdp", gpus=8)
    assert estimate(shape70, plan).parts["weights"] > 80 * GIB  # 80 x 839M params x 2 B
    rec = recommend(shape70, plan, gpu_gib=80)
    assert rec.fits and rec.changes["model.precision"] == "default"
    assert rec.estimate.peak <= 80 * GIB * 0.9


def test_estimate_reads_the_fp8_setting_from_the_config(llama_8b_folder, capsys):
    rc, out = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "2", "--batch", "1",
                       "--strategy", "fsdp", "--set", "model.precision=fp8",
                       "--set", "scaling.use_gpu=true")
    assert rc == 0 and out["plan"]["fp8"] is True
    assert any("FP8 base" in note for note in out["notes"])
    # The 4-bit base replaces the FP8 one (the config refuses both at once).
    rc, out = run_json(capsys, "--model", str(llama_8b_folder), "--gpus", "2", "--batch", "1",
                       "--strategy", "fsdp", "--method", "qlora",
                       "--set", "model.precision=fp8", "--set", "scaling.use_gpu=true")
    assert rc == 0 and out["plan"]["fp8"] is False and out["plan"]["method"] == "qlora"
