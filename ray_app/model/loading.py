"""Builds the frozen base model and puts a PEFT LoRA adapter on it."""

from __future__ import annotations

import torch

from ray_app.config import BUILTIN_TINY_LLAMA, LoraSection, ModelSection
from ray_app.extras import installed, require

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


def load_base(model_cfg: ModelSection, use_gpu: bool, device: torch.device | None = None):
    """`from_pretrained` on a hub id or local folder, frozen; 4-bit NF4 for QLoRA."""
    from transformers import AutoModelForCausalLM

    if model_cfg.name_or_path == BUILTIN_TINY_LLAMA:
        raise ValueError("builtin:tiny-llama must be materialised with save_builtin_base first")
    dtype = resolve_dtype(model_cfg, use_gpu)
    extra = {}
    if model_cfg.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # FSDP shards the packed weights as this dtype
        )
        extra["device_map"] = {"": device or "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code, **extra,
    )
    model.requires_grad_(False)
    if model_cfg.quantization == "nf4":
        _keep_standard_4bit_layout(model)
    return model


def _keep_standard_4bit_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place the first
    time it runs without gradients (evaluation), and that repacking fails for layer sizes
    that are not a multiple of its block size. Training, checkpoints and merge all expect
    the standard layout, so the repacking is switched off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def use_liger(model_cfg: ModelSection, model_type: str, use_gpu: bool) -> bool:
    if model_cfg.liger == "off" or (model_cfg.liger == "auto" and not use_gpu):
        return False
    if model_cfg.liger == "auto" and not installed("liger_kernel"):
        return False
    patches = require("liger_kernel.transformers.monkey_patch", "model.liger: on")
    return model_type in patches.MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_speedups(model, model_cfg: ModelSection, activation_checkpointing, use_gpu: bool):
    """Liger kernels, per-layer activation checkpointing and per-layer torch.compile, in
    that order, on the base model before the adapter is added."""
    if use_liger(model_cfg, model.config.model_type, use_gpu):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
        # Read by evaluation: Liger's forward then computes the loss without full logits.
        model.fused_linear_loss = True
    layers = decoder_layers(model)
    if activation_checkpointing != "none":
        # transformers' per-layer switch keeps module names (and so adapter keys) unchanged.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        every = 1 if activation_checkpointing == "all" else int(activation_checkpointing)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i % every == 0
    if model_cfg.compile:
        for layer in layers:
            layer.compile()
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The repeated transformer blocks of a (PEFT-wrapped) causal LM."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError("cannot find the decoder layers (a ModuleList named 'layers')")


def add_lora(model, lora_cfg: LoraSection, autocast: bool = False):
    """The base wrapped by PEFT with the adapter of the `lora` section. A PiSSA/OLoRA
    adapter keeps its initial value (`initial_adapter`), which checkpoints save, so that
    the export can apply it to the original base (`ray_app.model.adapters`).

    `autocast`: the model will run under bf16 autocast (training on GPU). PEFT keeps the
    adapter in fp32 and casts each adapted linear's bf16 input to fp32 before dropout and
    lora_A; under autocast that matmul runs in bf16 anyway, so the cast only writes an
    fp32 copy of the input per adapted linear (and, in the 8B step profile, its fused
    cast + dropout kernel was the largest non-matmul kernel). The cast is turned off then
    for plain LoRA: autocast rounds the same values to bf16 either way. DoRA keeps it:
    PEFT computes DoRA's weight norm in its input's dtype, which must stay fp32."""
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ray_app.model.adapters import initial_state, lora_config

    peft_model = get_peft_model(model, lora_config(lora_cfg))
    if autocast and not lora_cfg.use_dora:
        for module in peft_model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    if lora_cfg.mutates_base:
        peft_model.initial_adapter = initial_state(peft_model)
    return peft_model


def save_builtin_base(tokenizer, folder: str, seed: int) -> str:
    """Writes the quickstart base model once, so workers and users load it with
    `from_pretrained` like any other checkpoint."""
    from pathlib import Path

    if not (Path(folder) / "config.json").exists():
        model = build_tiny_llama(tokenizer, seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
