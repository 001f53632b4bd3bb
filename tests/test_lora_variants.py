"""The LoRA variants (lora.use_dora, lora.use_rslora, lora.init, train.lora_plus_ratio):
each reaches PEFT, each trained adapter goes through the export and `ray-app merge` with
its logit check, and the merged model computes what the trained model computed, also for
PiSSA and OLoRA, which change the base weights at init; combinations PEFT cannot do are
refused before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from support import tiny_config

from ray_app.config import LoraSection, validate_config
from ray_app.data.tokenize import load_tokenizer
from ray_app.export.merge import SAMPLE_TEXTS, merge_adapter
from ray_app.model.adapters import INITIAL_ADAPTER, lora_plus_groups
from ray_app.model.loading import add_lora, save_builtin_base
from ray_app.quickstart import TOKENIZER_DIR
from ray_app.train.run import export_adapter

VARIANTS = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True, "r": 16},
    "gaussian": {"init": "gaussian"},
    "pissa": {"init": "pissa"},
    "pissa_fast_svd": {"init": "pissa_niter_4", "use_rslora": True},
    "olora": {"init": "olora"},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    return Path(save_builtin_base(tokenizer, str(tmp_path_factory.mktemp("base")), seed=0))


def _trained(base: Path, lora: LoraSection):
    """The base with the adapter, its weights moved as a few steps of training would."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base), lora)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(list(SAMPLE_TEXTS), return_tensors="pt", padding=True,
                       add_special_tokens=False)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    return out[inputs["attention_mask"].bool()]


def _export(model, base: Path, tmp: Path) -> Path:
    """What a run does: the checkpoint's adapter (and initial adapter) -> <output>/final."""
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    checkpoint = tmp / "checkpoint"
    model.save_pretrained(checkpoint)
    if getattr(model, "initial_adapter", None):
        save_file(model.initial_adapter, checkpoint / INITIAL_ADAPTER)
    cfg = validate_config(tiny_config(tmp / "data.jsonl", tmp, model={"name_or_path": str(base)}))
    return export_adapter(cfg, Checkpoint.from_directory(str(checkpoint)), tmp / "final")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_merges_to_the_model_it_trained(base, tmp_path, variant):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(TOKENIZER_DIR))
    tokenizer.padding_side = "right"
    lora = LoraSection(**{"r": 8, "alpha": 16, "dropout": 0.0, **VARIANTS[variant]})
    model = _trained(base, lora)
    trained = _logits(model, tokenizer)
    adapter = _export(model, base, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is lora.use_dora and config["use_rslora"] is lora.use_rslora
    assert not (adapter / INITIAL_ADAPTER).exists()
    if lora.mutates_base:  # converted for the original base: twice the rank, plain init
        assert (config["r"], config["init_lora_weights"]) == (16, True)
    else:
        assert config["init_lora_weights"] in (lora.init, True)

    result = merge_adapter(str(adapter), str(tmp_path / "merged"), str(base), "float32",
                           "5GB", None, Console(width=120))
    assert result.max_abs_diff <= result.allowed  # ray-app merge's own check
    merged = AutoModelForCausalLM.from_pretrained(result.out).eval()
    diff = float((_logits(merged, tokenizer) - trained).abs().max())
    assert diff < 1e-4, f"{variant}: merged model differs from the trained one by {diff}"
    # The base's own weights are untouched by the merge's base + adapter check.
    assert float((trained - _logits(AutoModelForCausalLM.from_pretrained(base), tokenizer))
                 .abs().max()) > 1e-3


def test_pissa_export_equals_peft_own_conversion(base, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=4, init="pissa"))
    config = model.peft_config["default"]
    config.init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain LoRA
    model.save_pretrained(tmp_path / "initial")
    config.init_lora_weights = "pissa"
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    ours = _export(model, base, tmp_path)
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(
        tmp_path / "initial"))
    want, got = (load_file(f / "adapter_model.safetensors") for f in (tmp_path / "peft", ours))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    want_cfg, got_cfg = (json.loads((f / "adapter_config.json").read_text())
                         for f in (tmp_path / "peft", ours))
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert got_cfg[key] == want_cfg[key], key


def test_fsdp_checkpoints_restore_every_adapter_tensor_of_dora(base):
    """FSDP loads a checkpoint by live parameter names; PEFT saves DoRA's magnitudes
    without the adapter name, as it saves the LoRA matrices."""
    from peft import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from ray_app.train.engines import _model_key

    model = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=4, use_dora=True))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = get_peft_model_state_dict(model)
    assert any(k.endswith(".lora_magnitude_vector") for k in saved)
    assert {_model_key(k, names) for k in saved} == names


def test_lora_plus_gives_the_b_matrices_their_own_learning_rate(base):
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(base), LoraSection(r=4))
    names = {id(p): n for n, p in model.named_parameters()}
    plain = lora_plus_groups(model, 1e-4, None)
    assert len(plain) == 1 and "lr" not in plain[0]
    a, b = lora_plus_groups(model, 1e-4, 16)
    assert b["lr"] == pytest.approx(1.6e-3) and "lr" not in a
    assert b["params"] and all(".lora_B." in names[id(p)] for p in b["params"])
    assert a["params"] and all(".lora_A." in names[id(p)] for p in a["params"])
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(a["params"]) + len(b["params"]) == trainable
    optimizer = torch.optim.AdamW(a["params"] and [a, b], lr=1e-4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1.6e-3])


@pytest.mark.parametrize("settings, message", [
    ({"lora": {"init": "pissa"}, "model": {"quantization": "nf4"}}, "lora.init: pissa"),
    ({"lora": {"init": "olora", "use_dora": True}}, "drop DoRA's magnitudes"),
    ({"lora": {"init": "loftq"}}, "lora.init"),
    # The reference (adapter disabled) would be the residual base, not the original model.
    ({"lora": {"init": "pissa_niter_4"}, "train": {"method": "dpo"}}, "wrong reference"),
    ({"lora": {"init": "olora"}, "train": {"method": "kto"}}, "wrong reference"),
])
def test_combinations_peft_cannot_do_are_refused_before_ray_starts(tmp_path, settings, message):
    from ray_app.errors import UserError

    with pytest.raises((UserError, ValueError), match=message):
        validate_config(tiny_config(tmp_path / "d.jsonl", tmp_path, **settings))


def _step_under_autocast(base: Path, lora: LoraSection, autocast: bool, ids: torch.Tensor):
    """(loss, adapter gradients, bytes autograd saved) of one forward and backward of the
    bf16 base with the adapter under CPU bf16 autocast, as the loop runs on GPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), lora,
                     autocast=autocast).train()
    saved: dict[int, torch.UntypedStorage] = {}  # held, so no address is reused

    def pack(t: torch.Tensor):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, sum(storage.nbytes() for storage in saved.values())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", ["plain", "rslora", "dora"])
def test_under_autocast_the_adapter_input_stays_bf16_and_the_step_is_the_same(base, variant):
    """Training on GPU runs under bf16 autocast, where PEFT's cast of each adapted input to
    the adapter's fp32 only adds a copy: without it the loss and every adapter gradient
    are the same and autograd keeps fewer bytes. DoRA keeps the cast (PEFT computes its
    weight norm in the input's dtype), so its step is PEFT's own."""
    extra = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}}.get(variant, {})
    lora = LoraSection(r=8, alpha=16, dropout=0.0, target_modules="all-linear", **extra)
    ids = torch.randint(3, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    loss_cast, grads_cast, saved_cast = _step_under_autocast(base, lora, False, ids)
    loss, grads, saved = _step_under_autocast(base, lora, True, ids)
    assert loss == loss_cast
    assert grads.keys() == grads_cast.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # the adapter itself stays fp32
        torch.testing.assert_close(grad, grads_cast[name], rtol=0, atol=0, msg=name)
    if variant == "dora":
        assert saved == saved_cast
    else:
        assert saved < saved_cast
