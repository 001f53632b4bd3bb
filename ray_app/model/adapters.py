"""The LoRA variants, through PEFT: DoRA, rsLoRA, the initialisations (gaussian,
orthogonal, PiSSA, OLoRA), LoRA+ learning rates, and the conversion that lets a PiSSA or
OLoRA adapter apply to the original base.

PiSSA and OLoRA start the adapter from the base weights' principal (or QR) part and
subtract it from the base: W = W_res + s B0 A0. Training changes A and B only, so what it
learned is s (B A - B0 A0) on top of the original W. PEFT turns the trained adapter into
that plain LoRA adapter of twice the rank (`save_pretrained(...,
path_initial_model_for_weight_conversion=...)`, `LoraModel.subtract_mutated_init`); it
needs the live model and the initial adapter in one process, which sharded strategies do
not give, so the same arithmetic is done here on the saved tensors: the initial adapter is
kept from set-up (`INITIAL_ADAPTER` in every checkpoint) and the export converts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_app.config import LoraSection

# The adapter at initialisation (PiSSA/OLoRA only), saved beside the trained one.
INITIAL_ADAPTER = "initial_adapter.safetensors"


def lora_config(lora_cfg: LoraSection):
    """The PEFT LoraConfig of the `lora` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM",
        use_dora=lora_cfg.use_dora, use_rslora=lora_cfg.use_rslora,
        init_lora_weights=True if lora_cfg.init == "default" else lora_cfg.init,
    )


def initial_state(peft_model) -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter as initialised, in PEFT's saved key format."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in get_peft_model_state_dict(peft_model).items()}


def lora_plus_groups(model, lr: float, ratio: float | None) -> list[dict]:
    """The trainable parameters as optimizer groups: with LoRA+ the B matrices (and
    their embedding counterparts) in a group of their own at `ratio` times `lr`, as PEFT's
    `create_loraplus_optimizer` places them (it also builds the optimizer, which each
    engine here builds itself)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not ratio:
        return [{"params": [p for _, p in trainable]}]
    b = [p for n, p in trainable if ".lora_B." in n or ".lora_embedding_B." in n]
    others = [p for n, p in trainable if not (".lora_B." in n or ".lora_embedding_B." in n)]
    return [{"params": others}, {"params": b, "lr": lr * ratio}]


def to_plain_lora(folder: Path) -> None:
    """Rewrites the PiSSA/OLoRA adapter in `folder` (adapter_config.json,
    adapter_model.safetensors and `INITIAL_ADAPTER`) as the plain LoRA adapter of the
    same change to the original base, as PEFT's conversion writes it:
    A' = [A; A0], B' = [B, -B0], rank and alpha doubled (alpha times sqrt 2 with rsLoRA),
    init_lora_weights true."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "adapter_model.safetensors")
    initial = load_file(folder / INITIAL_ADAPTER)
    converted = {}
    for key, value in weights.items():
        if ".lora_A." in key:
            converted[key] = torch.cat([value, initial[key].to(value.dtype)], dim=0)
        elif ".lora_B." in key:
            converted[key] = torch.cat([value, -initial[key].to(value.dtype)], dim=1)
        else:
            raise ValueError(f"{key}: only LoRA matrices convert (DoRA with PiSSA/OLoRA is "
                             "refused by the config)")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["init_lora_weights"] = True
    config["r"] *= 2
    config["lora_alpha"] *= 2 ** 0.5 if config.get("use_rslora") else 2
    for pattern in ("rank_pattern", "alpha_pattern"):
        config[pattern] = {k: 2 * v for k, v in (config.get(pattern) or {}).items()}
    save_file(converted, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / INITIAL_ADAPTER).unlink()
