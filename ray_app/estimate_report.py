"""`ray-app estimate`: resolves the model's shape and prints the memory table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ray_app.config import BUILTIN_TINY_LLAMA, Config
from ray_app.estimate import (
    GIB,
    Estimate,
    Plan,
    Recommendation,
    Shape,
    adapter_params,
    shape_of,
)

# Model types Liger patches, for liger: auto where liger-kernel is not installed here.
LIGER_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
               "gemma3", "phi3", "granite", "olmo2", "mllama"}
PART_NOTES = {
    "weights": "frozen base (bf16; NF4 for QLoRA; FP8 copies whole), per GPU after sharding",
    "adapter": "trainable parameters in fp32",
    "gradients": "fp32 gradients of the trainable parameters",
    "optimizer": "AdamW states (2 fp32, or 8-bit)",
    "activations": "kept for the backward pass (bf16)",
    "logits": "loss head: full logits, or in chunks (Liger; preference answers)",
    "buffers": "dequantization, DDP buckets, masks, +5% allocator",
}


def model_shape(cfg: Config, model: str | None) -> Shape:
    """The shape of --model, else of the config's model.name_or_path (config only, no
    weights: a hub id, a local folder, or a config.json)."""
    name = model or cfg.model.name_or_path
    if name == BUILTIN_TINY_LLAMA:
        from ray_app.data.pipeline import tokenizer_path
        from ray_app.data.tokenize import load_tokenizer
        from ray_app.model.loading import build_tiny_llama

        tokenizer = load_tokenizer(tokenizer_path(cfg))
        return shape_of(build_tiny_llama(tokenizer, seed=0).config, name)
    from ray_app.export.adapter import load_base_config

    return shape_of(load_base_config(name, cfg.model.trust_remote_code), name)


def liger_supported(model_type: str) -> bool:
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return model_type in LIGER_TYPES
    return model_type in MODEL_TYPE_TO_APPLY_LIGER_FN


def _gib(value: float) -> str:
    gib = value / GIB
    return f"{gib:.2f}" if gib >= 1 else f"{gib:.3g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def render(shape: Shape, plan: Plan, est: Estimate, rec: Recommendation, gpu_gib: float,
           console: Console) -> None:
    console.print(
        f"[bold]{shape.name}[/] ({shape.model_type}): {_count(shape.params)} parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; "
        + (f"adapter {_count(adapter_params(shape, plan))} parameters (r={plan.lora_r})"
           if plan.method != "full" else "full fine-tuning"),
        highlight=False)
    console.print(
        f"{plan.method}, {plan.strategy}"
        + (f" ZeRO-{plan.zero_stage}" if plan.strategy == "deepspeed" else "")
        + f", {plan.gpus} GPU(s), micro-batch {plan.batch} x {plan.seq_len} tokens"
        + (" (chosen + rejected)" if plan.rows == 2 else "")
        + f", activation checkpointing {plan.checkpointing}, Liger {'on' if plan.liger else 'off'}"
        + f", optimizer {plan.optimizer}", highlight=False)
    table = Table(title=f"Estimated memory per GPU (GiB), GPU of {gpu_gib:g} GiB")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    table.add_column("what")
    for name, value in est.parts.items():
        table.add_row(name, _gib(value), PART_NOTES[name])
    table.add_row("[bold]training peak[/]", f"[bold]{_gib(est.train_peak)}[/]", "")
    table.add_row("evaluation peak", _gib(est.eval_peak),
                  "answer logits in chunks" if plan.full_logits
                  else "fused loss" if plan.liger and plan.fused_eval else "full logits")
    console.print(table)
    for note in est.notes:
        console.print(f"note: {note}")
    if not rec.fits:
        console.print(f"[red]Does not fit[/]: {rec.why}.")
        return
    if not rec.changes:
        console.print(f"[green]Fits[/]: {rec.why}.")
        return
    console.print(f"Recommended: {rec.why}.")
    for key, value in rec.changes.items():
        console.print(f"  --set {key}={value}" if not str(value).startswith("x")
                      else f"  {key}: {value}", highlight=False)
    console.print(f"  -> training peak {_gib(rec.estimate.train_peak)} GiB per GPU",
                  highlight=False)
