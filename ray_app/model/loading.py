"""Builds the frozen base model and puts a PEFT LoRA adapter on it."""

from __future__ import annotations

import torch

from ray_app.config import BUILTIN_TINY_LLAMA, LoraSection, ModelSection

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(model_cfg: ModelSection, use_gpu: bool) -> torch.dtype:
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return _DTYPES[model_cfg.dtype]


def build_tiny_llama(tokenizer, seed: int):
    """The quickstart's random-init Llama; the same seed gives the same weights everywhere."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ray_app.quickstart import TINY_LLAMA

    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **TINY_LLAMA,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_base(model_cfg: ModelSection, use_gpu: bool):
    """`from_pretrained` on a hub id or local folder, frozen."""
    from transformers import AutoModelForCausalLM

    if model_cfg.name_or_path == BUILTIN_TINY_LLAMA:
        raise ValueError("builtin:tiny-llama must be materialised with save_builtin_base first")
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path,
        dtype=resolve_dtype(model_cfg, use_gpu),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    model.requires_grad_(False)
    return model


def add_lora(model, lora_cfg: LoraSection):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_builtin_base(tokenizer, folder: str, seed: int) -> str:
    """Writes the quickstart base model once, so workers and users load it with
    `from_pretrained` like any other checkpoint."""
    from pathlib import Path

    if not (Path(folder) / "config.json").exists():
        model = build_tiny_llama(tokenizer, seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
